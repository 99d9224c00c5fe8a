"""``regionclip convert``: any supported checkpoint -> ``.safetensors`` with metadata, and its sha256.

Examples::

    regionclip convert regionclip_pretrained-cc_rn50.pth -o regionclip_pretrained-cc_rn50.safetensors
    regionclip convert lvis_1203_cls_emb.pth --names lvis1203 -o lvis_1203_cls_emb.safetensors
    regionclip convert --info regionclip_pretrained-cc_rn50.safetensors

Inputs: RegionCLIP pretrained / fine-tuned checkpoints, detectron2 RPN files, class-embedding files [K, D], OpenAI
CLIP ResNet state dicts (and transformer region-encoder checkpoints). Keys are kept exactly, so every loader reads
the output; the metadata records format, architecture, embedding width, RPN kind, checkpoint kind, class names
(``--names``) and the source file's name and sha256. The output's own sha256 is written to ``<output>.sha256``
and checked whenever the file is loaded. Put the output into ``$REGIONCLIP_HOME`` under the released name and
``--weights <name>`` picks it before the ``.pth``. docs/WEIGHTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..checkpoint.io import file_sha256, read_metadata
from ..text.vocabulary import resolve_names
from ..weights.hub import convert_file
from ..weights.pretrained import resolve_weights

NAME = "convert"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(NAME, help="convert a checkpoint / RPN / class-embedding file to safetensors with "
                                         "metadata and a sha256", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="weight file (path or released name), or with --info a converted file")
    p.add_argument("-o", "--output", help="output .safetensors file (a <output>.sha256 sidecar is written beside it)")
    p.add_argument("--names", help="class names of a class-embedding file (row i = name i): coco65, lvis1203, ..., a "
                                   "text file (one per line) or a comma list; recorded in the metadata")
    p.add_argument("--info", action="store_true", help="print the metadata and sha256 of a file and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _info(path: str) -> int:
    meta = read_metadata(path)
    shown = {k: (v if len(v) <= 200 else v[:200] + f"... ({len(v)} chars)") for k, v in sorted(meta.items())}
    print(json.dumps({"file": path, "sha256": file_sha256(path), "metadata": shown}, indent=1, ensure_ascii=False))
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the process exit code (2 for a usage error)."""
    if args.info:
        return _info(str(resolve_weights(args.input)))
    if not args.output or not str(args.output).endswith(".safetensors"):
        print(f"regionclip {NAME}: error: -o/--output must name a .safetensors file, got {args.output!r}",
              file=sys.stderr)
        return 2
    names, ids = resolve_names(args.names) if args.names else (None, None)
    src = resolve_weights(args.input)
    t0 = time.perf_counter()
    out, meta = convert_file(src, args.output, class_names=names, category_ids=ids)
    g = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("regionclip.")}
    what = ", ".join(f"{k} {g[k]}" for k in ("format", "architecture", "embed_dim", "rpn", "checkpoint_kind",
                                             "num_classes") if k in g)
    print(f"wrote {out} ({what}{', names recorded' if names else ''}) in {time.perf_counter() - t0:.1f} s")
    print(f"sha256 {file_sha256(out)}  (recorded in {out.name}.sha256; source {src.name} sha256 "
          f"{g.get('source_sha256', '?')})")
    return 0
