"""``regionclip search``: the regions of an indexed collection most similar to a text, an image region or an
embedding (cosine similarity), as a table, JSON and an HTML contact sheet.

Examples::

    regionclip search feats-index/ "a red forklift" --top-k 50 --html forklifts.html
    regionclip search feats-index/ --image query.jpg --box 10,20,200,220 --json hits.json
    regionclip search feats-index/ --query-embedding vec.pt       # a saved [D] tensor

The text / image-region query is embedded with the checkpoint the regions were extracted with (recorded in the
index; --weights overrides it). Text goes through the same prompt ensemble as classification.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from ..search import RegionIndex
from ..search import query as q
from ..search.html import contact_sheet
from ..utils import write_json_atomic
from .argtypes import positive_int


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="open-vocabulary region search over an index (text / image region / vector)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="index folder of `regionclip index`")
    p.add_argument("query", nargs="?", help="text query, e.g. 'a red forklift'")
    p.add_argument("--image", help="image-as-query: the image file (with --box; without: the whole image)")
    p.add_argument("--box", help="image-as-query: the region x1,y1,x2,y2 in original pixels")
    p.add_argument("--query-embedding", help="a saved [D] tensor (torch.save / .safetensors) as the query")
    p.add_argument("--top-k", type=positive_int, default=50)
    p.add_argument("--nprobe", type=positive_int, help="faiss IVF: lists scanned (more: slower, better recall)")
    p.add_argument("--html", help="write an HTML contact sheet of the hits (opens from disk, no server)")
    p.add_argument("--json", help="write the hits as JSON")
    p.add_argument("--image-root", help="folder the images' file names are relative to (for --html crops)")
    p.add_argument("--weights", help="checkpoint for the query (default: the one the regions were extracted with)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def query_vector(args: argparse.Namespace, index: Any) -> Any:
    """[D] unit query from exactly one of text / --image / --query-embedding."""

    given = [x for x in (args.query, args.image, args.query_embedding) if x]
    if len(given) != 1:
        raise ValueError("give exactly one query: a text, --image IMG [--box x1,y1,x2,y2], or --query-embedding FILE")
    if args.box and not args.image:
        raise ValueError("--box needs --image (the image the box is in)")
    if args.query_embedding:
        return q.load_query_embedding(args.query_embedding)
    weights = args.weights or index.weights
    if not weights:
        raise ValueError(f"{args.index} does not record the checkpoint its regions came from; pass --weights")
    if not args.weights and not Path(weights).is_file():
        raise FileNotFoundError(f"the regions of {args.index} were extracted with {weights}, which is not there "
                                "any more; pass --weights with the same checkpoint")
    model = q.load_model(weights, device=args.device)
    q.check_same_checkpoint(model, index.source_meta)
    if args.query:
        return q.embed_text(model, args.query)
    return q.embed_image_region(model, args.image, q.parse_box(args.box) if args.box else None)


def format_table(hits: Sequence[Any]) -> str:
    """Fixed-width table: rank, score, image, box (and class / scores when the store has them)."""
    rows = [f"{'rank':>4}  {'score':>7}  {'box (x1,y1,x2,y2)':<27}  image"]
    for h in hits:
        box = ",".join(f"{v:.0f}" for v in h.box)
        extra = f"  [{h.class_name}]" if h.class_name else ""
        rows.append(f"{h.rank:>4}  {h.score:7.4f}  {box:<27}  {h.file_name}{extra}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:

    index = RegionIndex.open(args.index)
    vec = query_vector(args, index)
    index.load()  # not part of the search time below
    t0 = time.perf_counter()
    hits = index.search(vec, args.top_k, nprobe=args.nprobe)
    ms = (time.perf_counter() - t0) * 1e3
    if not args.quiet:
        print(format_table(hits))
    print(f"{len(hits)} hits of {index.num_regions} regions in {ms:.1f} ms ({index.backend})")
    label = args.query or (f"{args.image} {args.box or ''}".strip() if args.image else args.query_embedding)
    if args.json:
        write_json_atomic({"query": label, "index": str(args.index), "hits": [h.to_dict() for h in hits]},
                          args.json, indent=1)
        print(f"wrote {args.json}")
    if args.html:

        contact_sheet(hits, args.html, title=f"regionclip search: {label}", image_root=args.image_root)
        print(f"wrote {args.html}")
    return 0
