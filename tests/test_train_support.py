"""Shared helpers of the training tests: a synthetic COCO-format dataset of coloured rectangles and a tiny
recipe. (No tests in this module.)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

COLOURS = {1: (230, 40, 40), 2: (40, 200, 40), 3: (40, 60, 230)}  # category id -> RGB
NAMES = {1: "red box", 2: "green box", 3: "blue box"}


def make_rect_dataset(root: Path, num_images: int = 8, seed: int = 0, category_ids: tuple[int, ...] = (1, 2, 3),
                      size: tuple[int, int] = (64, 80)) -> tuple[Path, Path]:
    """PNG images with 1-2 filled rectangles on a grey noisy background + a COCO json (bbox + polygon)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        h, w = size if i % 2 == 0 else size[::-1]  # both aspect-ratio groups
        arr = (rng.normal(120, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
        for j in range(1 + i % 2):
            cid = category_ids[(i + j) % len(category_ids)]
            bw, bh = int(rng.integers(18, 30)), int(rng.integers(18, 30))
            x0 = int(rng.integers(0, w - bw)) if j == 0 else max(0, w - bw - 2)
            y0 = int(rng.integers(0, h - bh)) if j == 0 else max(0, h - bh - 2)
            arr[y0:y0 + bh, x0:x0 + bw] = COLOURS[cid]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "iscrowd": 0,
                         "bbox": [x0, y0, bw, bh], "area": bw * bh,
                         "segmentation": [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]]})
        name = f"img{i:03d}.png"
        Image.fromarray(arr).save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    cats = [{"id": c, "name": NAMES[c]} for c in category_ids]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, img_dir


def tiny_arch(rpn: bool = True) -> dict[str, Any]:
    arch: dict[str, Any] = {"clip": {"layers": [1, 1, 1, 1], "width": 8, "embed_dim": 16, "heads": 2,
                                     "image_resolution": 64}}
    if rpn:
        arch["rpn"] = {"arch": "c4", "size_divisibility": 0, "pre_nms_topk": 300, "post_nms_topk": 100,
                       "resnet_layers": [1, 1, 1], "stem_out_channels": 8,
                       "width_per_group": 8, "res2_out_channels": 16}
    return arch


def write_embeddings(path: Path, rows: int, dim: int = 16, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    torch.save(torch.randn(rows, dim, generator=g), path)
    return path


def tiny_recipe(tmp: Path, *, max_iter: int = 20, rpn: bool = True, mask: bool = False, seed: int = 0,
                ims_per_batch: int = 2, num_images: int = 8) -> dict[str, Any]:
    """A complete recipe dict (YAML-equivalent) training the tiny detector on the synthetic set."""
    data_dir = tmp / "data"
    if not (data_dir / "train.json").exists():
        make_rect_dataset(data_dir, num_images=num_images)
    emb = write_embeddings(tmp / "emb.pth", 3)
    return {
        "model": {"arch": tiny_arch(rpn), "mask_head": mask,
                  "input": {"min_size": 64, "max_size": 96},
                  "postprocess": {"score_thresh": 0.05, "detections_per_image": 20, "apply_box_deltas": True}},
        "data": {"train": {"json": str(data_dir / "train.json"), "image_root": str(data_dir / "images")},
                 "test": {"json": str(data_dir / "train.json"), "image_root": str(data_dir / "images")},
                 "classes": {"train_embeddings": str(emb), "test_embeddings": str(emb)},
                 "min_sizes": [56, 64, 72], "max_size": 96},
        "roi": {"batch_size_per_image": 32},
        "solver": {"ims_per_batch": ims_per_batch, "base_lr": 0.005, "warmup_iters": 5, "steps": [max_iter * 3 // 4],
                   "max_iter": max_iter},
        "train": {"output_dir": str(tmp / "run"), "seed": seed, "device": "cpu", "checkpoint_period": max_iter,
                  "eval_period": 0, "eval_at_end": False, "log_period": 1, "progress": False, "num_workers": 0},
    }
