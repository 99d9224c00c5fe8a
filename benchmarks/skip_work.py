"""Exact work skipping in the raw-logit RPN presets (docs/DESIGN.md#work-skipping): fraction of proposals skipped
and seconds per image with and without skipping, on the same images, in one run. Prints a table; asserts nothing
about speed (the detections must be identical, which it checks).

    python benchmarks/skip_work.py [--shift -0.95] [--images 1] [--threads 2]

``--shift`` moves the random RPN's objectness logits down (the shared parity generator's objshift option), which
gives the mostly-negative logits of a trained RPN on background (70-87 % negative at -0.95).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_checkpoints  # noqa: E402  (the official-format random checkpoints of the tests)

from regionclip.api import RegionCLIP  # noqa: E402
from regionclip.assets import demo_image_paths  # noqa: E402
from regionclip.inference.hardware import cpu_flags_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shift", type=float, default=-0.95, help="objectness logit shift of the random RPN")
    ap.add_argument("--images", type=int, default=1, help="demo images to run (1 or 2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ck = random_checkpoints("rn50", 0, rpn_objectness_shift=args.shift)
    model = RegionCLIP.from_pretrained(ck["regionclip"], ck["rpn"], preset="lvis-rpn")
    model.set_vocabulary(class_embeddings=torch.randn(1203, 1024, generator=torch.Generator().manual_seed(0)))
    print(f"# {cpu_flags_line()}; torch threads {torch.get_num_threads()}; RN50 random official-format weights, "
          f"RPN objectness shift {args.shift}, preset lvis-rpn (score > 0.02, raw-logit multiplication)", flush=True)
    pipe, vocab = model.pipeline, model.vocabulary
    assert vocab is not None
    print("image  proposals  skipped  t_full_s  t_skip_s  speedup  identical")
    for path in demo_image_paths()[: args.images]:
        prepared = [pipe.prepare(path)]
        props = pipe.proposals(prepared, model.run_options())
        thresh = model.settings.postprocess.score_thresh
        n = len(props[0].boxes)
        skipped = int((~(props[0].objectness_logits.float() ** 0.5 > thresh)).sum())
        times: dict[bool, list[float]] = {True: [], False: []}
        outs = {}
        for _ in range(args.repeats):
            for skip in (False, True):  # interleaved, so machine load hits both alike
                t0 = time.perf_counter()
                outs[skip] = pipe.detect_prepared(prepared, vocab, model.run_options(skip_unreachable=skip),
                                                  regions=props)[0]
                times[skip].append(time.perf_counter() - t0)
        same = all(torch.equal(getattr(outs[True], f), getattr(outs[False], f))
                   for f in ("boxes", "scores", "labels", "region_index"))
        tf, ts = statistics.median(times[False]), statistics.median(times[True])
        print(f"{path.name:14s} {n:5d}  {skipped:5d} ({100 * skipped / max(n, 1):.0f}%)  {tf:8.1f}  {ts:8.1f}  "
              f"{tf / max(ts, 1e-9):5.2f}x  {same}", flush=True)


if __name__ == "__main__":
    main()
