"""`regionclip train-rpn` end to end on a tiny synthetic set: AR@100/300/1000 on held-out images before and after
training a tiny FPN RPN (docs/RPN.md, "Measured"). Prints the logged losses and the two AR rows; CPU, minutes.

    .venv/bin/python benchmarks/train_rpn_tiny.py [--iters 200] [--out /tmp/train_rpn_tiny]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic coloured-rectangle dataset of the training tests

from test_train_support import make_rect_dataset  # noqa: E402

from regionclip.config import from_dict  # noqa: E402
from regionclip.engine.rpn_train import RPNTrainConfig, run_rpn_training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="/tmp/train_rpn_tiny")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train_json, train_imgs = make_rect_dataset(out / "train", num_images=16, seed=0)
    test_json, test_imgs = make_rect_dataset(out / "test", num_images=8, seed=1)
    arch = {"arch": "fpn", "resnet_layers": [1, 1, 1, 1], "stem_out_channels": 8, "width_per_group": 4,
            "res2_out_channels": 16, "fpn_out_channels": 16, "post_nms_topk": 1000}
    recipe = {
        "model": {"arch": arch, "input": {"min_size": 128, "max_size": 160}},
        "data": {"train": {"json": str(train_json), "image_root": str(train_imgs)},
                 "test": {"json": str(test_json), "image_root": str(test_imgs)},
                 "min_sizes": [112, 128, 144], "max_size": 180},
        "solver": {"ims_per_batch": 4, "base_lr": 0.005, "warmup_iters": 10, "steps": [args.iters * 3 // 4],
                   "max_iter": args.iters},
        "train": {"output_dir": str(out / "run"), "device": "cpu", "checkpoint_period": args.iters, "eval_period": 0,
                  "eval_at_start": True, "eval_at_end": True, "log_period": 20, "progress": False, "num_workers": 0}}
    t0 = time.perf_counter()
    run_rpn_training(from_dict(RPNTrainConfig, recipe))
    print(f"trained {args.iters} iterations in {time.perf_counter() - t0:.0f} s")
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "eval" in m:
            ar = {k: round(m["eval"][k], 1) for k in ("AR@100", "AR@300", "AR@1000")}
            print(f"iteration {m['iteration']:4d}  held-out {ar}")
        elif "total_loss" in m:
            print(f"iteration {m['iteration']:4d}  loss {m['total_loss']:.4f}")


if __name__ == "__main__":
    main()
