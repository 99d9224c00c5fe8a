"""Accuracy cost of 16-bit autocast (``--dtype bfloat16|float16``) against float32, on random RN50 weights.

Encodes R random boxes of a demo image in float32 and in the 16-bit dtype (same code path as extract-regions) and
prints the region-embedding error (cosine similarity, relative L2), the class-probability error over a random
K-class vocabulary and the top-1 agreement, plus the time of both runs.

    python benchmarks/dtype_accuracy.py                 # bfloat16 on CPU
    python benchmarks/dtype_accuracy.py --device cuda --dtype float16
    python benchmarks/dtype_accuracy.py --boxes 8         # quick check that it runs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="rn50", choices=["rn50", "rn50x4"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--boxes", type=int, default=100)
    args = ap.parse_args()

    if args.dtype == "float16" and not args.device.startswith("cuda"):
        ap.error("--dtype float16 needs --device cuda (CPU autocast has no fast float16; use bfloat16)")
    import logging

    from regionclip.inference.hardware import cpu_flags_line, resolve_dtype

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    resolve_dtype(args.dtype, args.device)  # warns once where bfloat16 is emulated (slow) on this CPU
    print(f"# {cpu_flags_line()}")

    from _region_helpers import random_boxes
    from conftest import random_checkpoints

    from regionclip import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.engine.extract import ExtractConfig, extract_batch
    from regionclip.pipeline import RunOptions

    ckpts = random_checkpoints(args.variant, 0)
    # GT mode (no RPN file); the fused model is what every front end runs
    model = RegionCLIP.from_pretrained(ckpts["regionclip"], preset="lvis-gt", device=args.device)
    vocab = model.make_vocabulary(class_embeddings=ckpts["concept_emb"])  # [65, D] random, validated
    pipe = model.pipeline
    prepared = pipe.prepare(demo_image_paths()[0])
    boxes = random_boxes(args.boxes, *prepared.original_hw, seed=0)
    regions = [pipe.user_regions(boxes, prepared)]
    out, secs = {}, {}
    for dtype in ("float32", args.dtype, "float32"):  # float32 twice: the first run is a warm-up
        t0 = time.perf_counter()
        out[dtype] = extract_batch(pipe, [prepared], ExtractConfig(regions="boxes", run=RunOptions(dtype=dtype)), regions=regions,
                                   vocabulary=vocab)[0]
        secs[dtype] = time.perf_counter() - t0
    ref, low = out["float32"], out[args.dtype]
    cos = F.cosine_similarity(ref["feats"], low["feats"], dim=1)
    rel = (ref["feats"] - low["feats"]).norm(dim=1) / ref["feats"].norm(dim=1)
    dp = (ref["probs"] - low["probs"]).abs()
    top1 = (ref["classes"] == low["classes"]).float().mean().item()
    k = len(vocab.names)
    print(f"{args.variant}, {args.boxes} boxes, {k} classes, {args.device}, {args.dtype} vs float32")
    print(f"region embeddings: cosine similarity min {cos.min():.5f} mean {cos.mean():.5f}; relative L2 error "
          f"mean {rel.mean():.4f} max {rel.max():.4f}")
    print(f"class probabilities: max |diff| {dp.max():.4f}, mean |diff| {dp.mean():.2e}; top-1 class agreement "
          f"{100 * top1:.1f}%")
    print(f"time: float32 {secs['float32']:.1f} s, {args.dtype} {secs[args.dtype]:.1f} s")


if __name__ == "__main__":
    main()
