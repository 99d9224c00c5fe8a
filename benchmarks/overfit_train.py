"""Does `regionclip train` learn? Overfit a handful of images and print the loss falling and AP50 on the same
images rising (docs/TRAINING.md#does-it-learn). Prints numbers; asserts nothing.

    python benchmarks/overfit_train.py [--data photos|rects] [--iters 200] [--arch tiny|rn50] [--regions gt|rpn]

``photos``: the tests' real-photo corpus (tests/assets/photos, 8 photos, 4 classes), ``rects``: the synthetic
coloured-rectangle set of the training tests. ``tiny``: a width-8 CLIP ResNet + tiny C4 RPN from random weights
(CPU, minutes); ``rn50``: the full RN50 detector from the seed-0 random official-format checkpoints of the tests
(realistic cost, meant for a GPU). The class embeddings are random (fixed seed): nothing is known about the
classes beforehand, so everything AP50 gains is learned. ``--regions gt`` evaluates on the GT boxes
(classification); ``rpn`` on the offline RPN's proposals (random weights: poor localisation).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_train_support import make_rect_dataset, tiny_arch, write_embeddings  # noqa: E402

from regionclip.config import from_dict  # noqa: E402
from regionclip.engine.transfer import TransferConfig, run_transfer  # noqa: E402
from regionclip.inference.hardware import cpu_flags_line  # noqa: E402


def dataset(kind: str, tmp: Path) -> tuple[Path, Path, int]:
    if kind == "photos":
        ann = REPO / "tests" / "assets" / "photos" / "annotations.json"
        if not ann.exists():
            raise SystemExit(f"{ann} not found: use --data rects")
        return ann, ann.parent, len(json.loads(ann.read_text())["categories"])
    ann, images = make_rect_dataset(tmp / "rects", num_images=8)
    return ann, images, 3


def recipe(args: argparse.Namespace, tmp: Path) -> dict:
    ann, root, k = dataset(args.data, tmp)
    model: dict = {"input": {"min_size": args.size, "max_size": int(args.size * 5 / 3)},
                   "postprocess": {"score_thresh": 0.001, "detections_per_image": 100, "apply_box_deltas": True}}
    if args.arch == "tiny":
        model["arch"] = tiny_arch()
        emb = write_embeddings(tmp / "emb.pth", k, dim=16)
    else:
        from conftest import random_checkpoints

        ck = random_checkpoints("rn50", 0)
        model.update(weights=str(ck["regionclip"]), rpn_weights=str(ck["rpn"]), export_text_encoder=False,
                     rpn_overrides={"nms_thresh": 0.7, "post_nms_topk": 200})
        emb = write_embeddings(tmp / "emb.pth", k, dim=1024)
    return {
        "model": model,
        "data": {"train": {"json": str(ann), "image_root": str(root)},
                 "test": {"json": str(ann), "image_root": str(root)},
                 "classes": {"train_embeddings": str(emb), "test_embeddings": str(emb)},
                 "min_sizes": [args.size], "max_size": int(args.size * 5 / 3), "flip": False,
                 "eval_regions": args.regions},
        "roi": {"batch_size_per_image": 128},
        "solver": {"ims_per_batch": args.batch, "base_lr": args.lr, "warmup_iters": min(20, args.iters // 5),
                   "steps": [int(args.iters * 0.8)], "max_iter": args.iters},
        "train": {"output_dir": str(tmp / "run"), "device": args.device, "seed": 0,
                  "checkpoint_period": args.iters, "eval_period": args.eval_every, "eval_at_start": True,
                  "eval_at_end": True, "log_period": 1, "progress": False, "num_workers": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["photos", "rects"], default="photos")
    ap.add_argument("--arch", choices=["tiny", "rn50"], default="tiny")
    ap.add_argument("--regions", choices=["gt", "rpn"], default="gt")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--size", type=int, default=128, help="shorter side of the images (train and test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = from_dict(TransferConfig, recipe(args, tmp))
        print(f"# {cpu_flags_line()}; torch threads {torch.get_num_threads()}; data {args.data}, arch {args.arch}, "
              f"{args.iters} iterations of {args.batch} images, lr {args.lr}, shorter side {args.size}, "
              f"AP on the training images with {args.regions} regions")
        t0 = time.perf_counter()
        run_transfer(cfg)
        seconds = time.perf_counter() - t0
        lines = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = {m["iteration"]: m for m in lines if "total_loss" in m}
    window = max(1, args.eval_every // 5)
    print(f"\n{'iterations':>14} {'total_loss':>10} {'loss_cls':>9} {'loss_box_reg':>12}   (means over the window)")
    its = sorted(losses)
    for start in range(0, len(its), args.eval_every):
        chunk = its[start:start + window]
        mean = {k: float(np.mean([losses[i][k] for i in chunk])) for k in ("total_loss", "loss_cls", "loss_box_reg")}
        print(f"{chunk[0]:>6}-{chunk[-1]:<7} {mean['total_loss']:10.4f} {mean['loss_cls']:9.4f} "
              f"{mean['loss_box_reg']:12.4f}")
    last = its[-window:]
    mean = {k: float(np.mean([losses[i][k] for i in last])) for k in ("total_loss", "loss_cls", "loss_box_reg")}
    print(f"{last[0]:>6}-{last[-1]:<7} {mean['total_loss']:10.4f} {mean['loss_cls']:9.4f} {mean['loss_box_reg']:12.4f}")
    print(f"\n{'iteration':>9} {'AP50':>6} {'AP':>6}")
    for m in lines:
        if "eval" in m:
            print(f"{m['iteration']:>9} {m['eval'].get('AP50', float('nan')):6.1f} {m['eval'].get('AP', float('nan')):6.1f}")
    print(f"\n{seconds:.0f} s in all ({seconds / args.iters:.2f} s/iteration incl. evaluations)")


if __name__ == "__main__":
    main()
