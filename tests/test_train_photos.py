"""`regionclip train` end to end on CPU on a COCO json of ordinary photos (JPEG and PNG, grayscale, palette,
EXIF-rotated, odd sizes): the tests' real-photo corpus (tests/assets/photos) when present, else a few crops of the
demo images written to a temporary folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from regionclip.cli.main import main
from regionclip.factory import load_detector
from test_train_support import tiny_arch, write_embeddings

PHOTOS = Path(__file__).resolve().parent / "assets" / "photos"


def photo_dataset(tmp: Path) -> tuple[Path, Path, int]:
    """(annotation json, image folder, number of categories)."""
    ann = PHOTOS / "annotations.json"
    if ann.exists():
        return ann, PHOTOS, len(json.loads(ann.read_text())["categories"])
    from regionclip.assets import demo_image_paths

    root = tmp / "photos"
    root.mkdir()
    images, anns = [], []
    for i, (src, box, size, mode) in enumerate([(0, (0, 0, 960, 720), (320, 240), "RGB"),
                                                (1, (400, 100, 1500, 900), (275, 200), "L"),
                                                (0, (600, 300, 1400, 1080), (200, 190), "P")]):
        with Image.open(demo_image_paths()[src]) as im:
            photo = im.convert("RGB").crop(box).resize(size).convert(mode)
        name = f"photo{i}.{'png' if mode == 'P' else 'jpg'}"
        photo.save(root / name)
        images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
        w, h = size
        for j, (fx, fy, fw, fh) in enumerate([(0.1, 0.2, 0.4, 0.5), (0.55, 0.1, 0.35, 0.3)]):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + (i + j) % 2, "iscrowd": 0,
                         "bbox": [fx * w, fy * h, fw * w, fh * h], "area": fw * w * fh * h})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]}))
    return path, root, 2


def test_regionclip_train_runs_on_photos(tmp_path: Path, capsys) -> None:
    ann, root, num_classes = photo_dataset(tmp_path)
    emb = write_embeddings(tmp_path / "emb.pth", num_classes)
    recipe = {
        "model": {"arch": tiny_arch(), "input": {"min_size": 96, "max_size": 160}},
        "data": {"train": {"json": str(ann), "image_root": str(root)},
                 "test": {"json": str(ann), "image_root": str(root)},
                 "classes": {"train_embeddings": str(emb), "test_embeddings": str(emb)},
                 "min_sizes": [80, 96], "max_size": 160},
        "roi": {"batch_size_per_image": 64},
        "solver": {"ims_per_batch": 2, "base_lr": 0.005, "warmup_iters": 2, "steps": [5], "max_iter": 6},
        "train": {"output_dir": str(tmp_path / "run"), "device": "cpu", "checkpoint_period": 3, "eval_period": 0,
                  "eval_at_end": True, "log_period": 1, "progress": False, "num_workers": 0},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["iteration"] == 6 and math.isfinite(last["total_loss"])
    run = tmp_path / "run"
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [m["total_loss"] for m in lines if "total_loss" in m]
    assert len(losses) == 6 and all(np.isfinite(losses))
    evals = [m["eval"] for m in lines if "eval" in m]
    assert len(evals) == 1 and "AP50" in evals[0]
    ckpt = run / json.loads((run / "last_checkpoint").read_text())["model"]
    det, loaded = load_detector(ckpt)  # the checkpoint loads strictly in detect/evaluate
    assert loaded.report.ok and det.bbox_pred is not None
