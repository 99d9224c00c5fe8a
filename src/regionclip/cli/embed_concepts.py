"""``regionclip embed-concepts``: concept / class embeddings like the original's ``extract_concept_features.py``.

Example::

    regionclip embed-concepts concepts.txt -o emb.pth --weights regionclip_pretrained-cc_rn50.pth
    regionclip embed-concepts lvis1203 -o lvis_1203_cls_emb.safetensors --weights RN50_sd.pth

Output: ``.pth`` = bare float32 tensor [N, D] (unnormalised), loadable as the original's ``TEXT_EMB_PATH``;
``.safetensors`` = ``{"embeddings": [N, D]}``. A single concept gives [1, D] (the original wrote [D]).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional, Sequence

import torch

from regionclip.checkpoint.embedding_files import save_concept_embeddings
from regionclip.factory import load_text_tower
from regionclip.modeling.text_encoder import CLIPTextTransformer
from regionclip.text.embeddings import DEFAULT_BATCH_SIZE, concept_embeddings
from regionclip.text.vocabulary import resolve_names
from regionclip.weights.pretrained import resolve_weights  # a path as is, or a released name -> cached file

from .argtypes import positive_int

NAME = "embed-concepts"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``embed-concepts`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        NAME, help="compute concept/class text embeddings with a RegionCLIP or OpenAI CLIP text encoder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("concepts", help="text file with one concept per line (UTF-8), a built-in vocabulary "
                                    "(coco65, coco48, coco17, lvis1203, lvis866) or a comma-separated list")
    p.add_argument("-o", "--output", required=True, help="output file, .pth (bare tensor) or .safetensors")
    p.add_argument("--weights", required=True,
                   help="RegionCLIP pretrained checkpoint (path or released name; uses its lang_encoder.*) or an "
                        "OpenAI CLIP RN50/RN50x4 state dict; RN50 vs RN50x4 is detected from the shapes")
    p.add_argument("--templates", default="regionclip",
                   help="'regionclip' (the 81 templates, default), 'zeroshot' (2), or a file with one template "
                        "per line containing {}")
    p.add_argument("--average", choices=("mean", "normalized"), default="mean",
                   help="mean: plain mean of unnormalised template features (the original, default); "
                        "normalized: normalise, average, renormalise")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"prompts per forward pass; they span names (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--allow-jit", action="store_true",
                   help="allow reading an OpenAI TorchScript archive (executes code stored in the file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the process exit code."""
    problem = None
    if args.batch_size < 1:
        problem = f"--batch-size must be >= 1, got {args.batch_size}"
    elif not str(args.output).endswith((".pth", ".pt", ".safetensors")):
        problem = f"--output must end in .pth, .pt or .safetensors, got {args.output}"
    if problem:
        print(f"regionclip {NAME}: error: {problem}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        names = resolve_names(args.concepts)[0]  # the one vocabulary resolver (names part)
        weights = resolve_weights(args.weights)
        encoder = load_text_tower(weights, allow_jit=args.allow_jit, device=device)
        if not isinstance(encoder, CLIPTextTransformer):
            raise ValueError(f"{weights} has a {type(encoder).__name__} text tower (a zero-shot-branch transformer "
                             "checkpoint): embed-concepts computes the original's procedure with a CLIP text tower; "
                             "use a RegionCLIP / OpenAI CLIP file, or set_vocabulary(names) on the model")
        t1 = time.perf_counter()
        emb = concept_embeddings(names, encoder, templates=args.templates, average=args.average,
                                 batch_size=args.batch_size, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # bad vocabulary / templates / weights (CheckpointError too)
        print(f"regionclip {NAME}: error: {e}", file=sys.stderr)
        return 2
    out = save_concept_embeddings(emb, args.output)
    t2 = time.perf_counter()
    print(f"{NAME}: {len(names)} concepts x {emb.shape[1]} dims -> {out} (text encoder width {encoder.width}, "
          f"load {t1 - t0:.1f}s, encode {t2 - t1:.1f}s, {args.average} over templates)", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m regionclip.cli.embed_concepts ...``."""
    parser = argparse.ArgumentParser(prog=f"regionclip {NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
