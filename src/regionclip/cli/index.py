"""``regionclip index``: a vector index over the regions of an ``extract-regions`` folder, for ``regionclip search``.

Examples::

    regionclip extract-regions photos/ --regions rpn --topk 100 -o feats/
    regionclip index feats/ -o feats-index/                    # faiss (pip install 'regionclip[search]')
    regionclip index feats/ -o feats-index/ --backend exact    # brute force, no extra dependency
    regionclip index feats/ -o feats-index/                    # again after extracting more: adds the new shards

Re-running adds only the shards not indexed yet; an interrupted run leaves the previous index intact.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..search import FaissOptions, RegionIndex
from ..search.features import list_shards
from .argtypes import positive_int


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("index", help="index region features for `regionclip search` (incremental)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features_dir", help="output folder of `regionclip extract-regions`")
    p.add_argument("-o", "--output-dir", required=True, help="index folder (created, or extended when it exists)")
    p.add_argument("--backend", choices=["faiss", "exact"], default="faiss",
                   help="faiss: IVF inverted file for large collections, exact below --ivf-min-rows (needs "
                   "faiss-cpu); exact: brute-force matmul over memory-mapped vectors (default faiss)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="exact back-end: stored vector dtype (float16 halves disk and memory; cosine error < 1e-3)")
    p.add_argument("--nlist", type=positive_int, help="faiss: inverted lists per segment (default 2*sqrt(N), power of two)")
    p.add_argument("--nprobe", type=positive_int, help="faiss: lists scanned per query by default (default max(16, nlist/16))")
    p.add_argument("--ivf-min-rows", type=positive_int, default=50_000,
                   help="faiss: segments with fewer regions use an exact flat index (default 50000)")
    p.add_argument("--rebuild", action="store_true", help="index everything again (the old index stays usable "
                   "until the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    if not list_shards(args.features_dir):  # also names a damaged shard, before anything is written
        raise ValueError(f"{Path(args.features_dir) / 'shards'} holds no shards: nothing to index; extract regions "
                         f"first (regionclip extract-regions IMAGES -o {args.features_dir}) and let it finish at "
                         "least one shard")

    opts = FaissOptions(ivf_min_rows=args.ivf_min_rows, nlist=args.nlist, nprobe=args.nprobe)
    t0 = time.perf_counter()
    before = 0
    try:
        before = RegionIndex.open(args.output_dir).num_regions if not args.rebuild else 0
    except FileNotFoundError:
        pass
    idx = RegionIndex.build(args.features_dir, args.output_dir, backend=args.backend, dtype=args.dtype,
                            faiss_options=opts, rebuild=args.rebuild, progress=not args.quiet)
    added = idx.num_regions - before
    print(f"{added} regions added in {time.perf_counter() - t0:.1f} s; {idx.num_regions} regions "
          f"({idx.embed_dim}-d, {idx.backend}) in {len(idx.manifest['segments'])} segment(s) at {args.output_dir}")
    return 0
