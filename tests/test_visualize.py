"""Visualisation: the original's selection rules, boxes drawn where the JSON says, the CLI on the demo images."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionclip.evaluation.results import ResultsError
from regionclip.structures import Detections
from regionclip.evaluation.visualize import class_color, draw_detections, draw_results, render_results, select_predictions


def _p(bbox, score, cid=1):
    return {"image_id": 1, "category_id": cid, "bbox": bbox, "score": score}


def test_select_predictions_without_unique_boxes() -> None:
    preds = [_p([0, 0, 10, 10], 0.9), _p([0, 0, 10, 10], 0.4), _p([5, 5, 1, 1], 0.6)]
    # plain threshold (strict >); max_boxes / small_region_px have no effect in this mode
    assert select_predictions(preds, conf_threshold=0.5, max_boxes=1, small_region_px=1e9) == [preds[0], preds[2]]
    assert select_predictions(preds, conf_threshold=0.6) == [preds[0]]


def test_select_predictions_unique_boxes() -> None:
    preds = [_p([0, 0, 100, 100], 0.9, 1), _p([0, 0, 100, 100], 0.8, 2),  # same box, second class dropped
             _p([0, 0, 10, 10], 0.7), _p([200, 0, 100, 100], 0.3), _p([400, 0, 100, 100], 0.6)]
    got = select_predictions(preds, conf_threshold=0.5, show_unique_boxes=True, max_boxes=30, small_region_px=8100)
    assert got == [preds[0], preds[4]]  # small box skipped (10*10 < 8100), low score thresholded
    # max_boxes cuts in JSON order *before* any filtering: the 5th prediction is never seen
    got = select_predictions(preds, conf_threshold=0.5, show_unique_boxes=True, max_boxes=4, small_region_px=8100)
    assert got == [preds[0]]


def test_boxes_are_drawn_where_the_json_says() -> None:
    gray = (128, 128, 128)
    img = Image.new("RGB", (400, 300), gray)
    out = np.asarray(draw_results(img, [_p([100, 120, 150, 100], 0.9, cid=7)], {7: "cat"}))
    color = class_color(7)
    # left / right / bottom edges (x = 100, x = 250, y = 220) carry the class colour
    for x, y in [(100, 170), (250, 170), (175, 220), (101, 200)]:
        assert tuple(out[y, x]) == color, (x, y)
    # the interior and the outside stay untouched
    for x, y in [(175, 170), (130, 200), (20, 280), (350, 20)]:
        assert tuple(out[y, x]) == gray, (x, y)
    # the label tag sits above the box, filled with the class colour
    assert tuple(out[118, 102]) == color
    assert tuple(np.asarray(img)[170, 100]) == gray  # input not modified


def test_draw_detections() -> None:
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    det = Detections(torch.tensor([[10.0, 40.0, 60.0, 90.0]]), torch.tensor([0.8]), torch.tensor([2]), (100, 100),
                     class_names=["a", "b", "c"])
    out = np.asarray(draw_detections(img, det))
    assert tuple(out[65, 10]) == class_color(2) and tuple(out[65, 35]) == (0, 0, 0)
    assert (np.asarray(draw_detections(img, det, conf_threshold=0.9)) == 0).all()


def _gt_results(shared_dir: Path) -> tuple[Path, dict]:
    gt = json.loads((shared_dir / "parity" / "gt_boxes.json").read_text())
    return shared_dir / "parity" / "gt_boxes.json", gt


def _cli(argv: list[str]) -> int:
    from regionclip.cli import visualize

    parser = argparse.ArgumentParser()
    visualize.register(parser.add_subparsers())
    args = parser.parse_args(["visualize", *argv])
    return args.func(args)


def test_cli_renders_demo_images(tmp_path: Path, shared_dir: Path, demo_images: list[Path]) -> None:
    gt_path, gt = _gt_results(shared_dir)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(results))
    out = tmp_path / "vis"
    assert _cli(["--input", str(tmp_path / "res.json"), "--output", str(out), "--dataset", str(gt_path),
                 "--image-root", str(demo_images[0].parent), "--format", "png", "--grid", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_img1.png", "sample_img2.png"]
    a = gt["annotations"][1]  # a box on sample_img1: check its left edge vs the original picture
    x, y, w, h = a["bbox"]
    drawn = np.asarray(Image.open(out / "sample_img1.png"))
    orig = np.asarray(Image.open(demo_images[0]).convert("RGB"))
    assert drawn.shape == orig.shape
    assert tuple(drawn[y + h // 2, x]) == class_color(a["category_id"])
    centre = (y + h // 2, x + w // 2)
    np.testing.assert_array_equal(drawn[centre], orig[centre])


def test_side_by_side(tmp_path: Path, demo_images: list[Path]) -> None:
    images = [(1, demo_images[0])]
    a = [_p([100, 100, 300, 300], 0.9, 1)]
    b = [_p([600, 100, 300, 300], 0.9, 2)]
    written = render_results([a, b], images, {1: "x", 2: "y"}, tmp_path, image_format="png",
                             titles=["ours", "original"])
    w, h = Image.open(written[0]).size
    assert w > 2 * 1920 and h > 1080  # two full-width panels plus titles


def test_bad_results_inputs(tmp_path: Path, demo_images: list[Path]) -> None:
    images = [(1, demo_images[0])]
    with pytest.raises(ResultsError, match="image id"):
        render_results([dict(_p([0, 0, 5, 5], 0.9), image_id=5)], images, {1: "x"}, tmp_path)
    with pytest.raises(ResultsError, match="category id"):
        render_results([_p([0, 0, 5, 5], 0.9, cid=3)], images, {1: "x"}, tmp_path)
    trunc = tmp_path / "t.json"
    trunc.write_text(json.dumps([_p([0, 0, 5, 5], 0.9)])[:-5])
    with pytest.raises(ResultsError, match="truncated"):
        render_results(trunc, images, {1: "x"}, tmp_path)
    # an empty results file is fine here: the image is drawn without boxes
    (tmp_path / "e.json").write_text("[]")
    [p] = render_results(tmp_path / "e.json", images, {1: "x"}, tmp_path / "o", image_format="png")
    assert Image.open(p).size == (1920, 1080)
