"""Proposal recall (COCO AR@100/300/1000, class-agnostic): hand-computed cases, the runner, the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from regionclip.evaluation.proposals import coco_proposal_recall, format_proposal_recall, proposal_results

pytest.importorskip("pycocotools")

IOU_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def _gt(anns: list[dict], lvis: bool = False) -> dict:
    cats = [{"id": 7, "name": "thing"}] + ([{"id": 9, "name": "other"}] if not lvis else [])
    if lvis:
        cats[0]["frequency"] = "f"
    out = []
    for i, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        ann = {"id": i + 1, "image_id": 1, "category_id": a.get("category_id", 7), "bbox": [x, y, w, h],
               "area": w * h}
        if not lvis:
            ann["iscrowd"] = a.get("iscrowd", 0)
        out.append(ann)
    return {"images": [{"id": 1, "file_name": "a.png", "height": 400, "width": 400}], "annotations": out,
            "categories": cats}


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_recall_by_hand_per_size_and_budget() -> None:
    # GT 0: small 20x20 at (10,10); GT 1: medium 50x50 at (100,100), other category (useCats=0 ignores classes)
    gt = _gt([{"bbox": [10, 10, 20, 20]}, {"bbox": [100, 100, 50, 50], "category_id": 9}])
    exact = [10.0, 10.0, 30.0, 30.0]
    shifted = [100.0, 100.0, 150.0, 162.0]  # IoU 50*50 / (50*62) = 0.806
    iou1 = _iou(shifted, [100, 100, 150, 150])
    # 150 junk proposals far away score higher than the shifted one: it is the 152nd proposal
    junk = [[300.0 + i % 5, 300.0, 320.0 + i % 5, 320.0] for i in range(150)]
    boxes = torch.tensor([exact] + junk + [shifted])
    scores = torch.tensor([10.0] + [5.0] * 150 + [1.0])
    res = proposal_results(1, boxes, scores, category_id=7)
    assert res[0]["bbox"] == [10.0, 10.0, 20.0, 20.0]
    ar = coco_proposal_recall(gt, res)
    ok1 = sum(iou1 >= t - 1e-12 for t in IOU_THRESHOLDS) / 10  # fraction of thresholds where GT 1 is found
    assert ar["ARs@100"] == pytest.approx(100.0) and ar["ARs@1000"] == pytest.approx(100.0)
    assert ar["ARm@100"] == pytest.approx(0.0)  # GT 1's proposal is beyond the first 100
    assert ar["ARm@300"] == pytest.approx(100.0 * ok1)
    assert ar["AR@100"] == pytest.approx(50.0)
    assert ar["AR@300"] == ar["AR@1000"] == pytest.approx(100.0 * (1 + ok1) / 2)
    assert math.isnan(ar["ARl@1000"])  # no large GT
    table = format_proposal_recall(ar)
    assert "AR@100" in table and "ARs@1000" in table and "nan" in table


def test_crowd_gt_is_ignored_and_lvis_json_reads() -> None:
    gt = _gt([{"bbox": [10, 10, 20, 20]}, {"bbox": [100, 100, 50, 50], "iscrowd": 1}])
    res = proposal_results(1, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([1.0]))
    assert coco_proposal_recall(gt, res)["AR@100"] == pytest.approx(100.0)  # the crowd box is not a miss
    lvis = _gt([{"bbox": [10, 10, 20, 20]}, {"bbox": [100, 100, 50, 50]}], lvis=True)
    assert coco_proposal_recall(lvis, res)["AR@1000"] == pytest.approx(50.0)


def test_no_proposals_is_zero_recall() -> None:
    gt = _gt([{"bbox": [10, 10, 20, 20]}])
    ar = coco_proposal_recall(gt, [])
    assert ar["AR@100"] == 0.0 and ar["ARs@1000"] == 0.0 and math.isnan(ar["ARm@100"])


def test_proposal_results_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="image 3"):
        proposal_results(3, torch.zeros(2, 4), torch.zeros(3))


def _write_tiny_rpn(path: Path, post_nms_topk: int = 1000) -> Path:
    from _region_helpers import TINY_RPN
    from regionclip.modeling.rpn import build_offline_rpn

    torch.manual_seed(0)
    torch.save({"model": build_offline_rpn(TINY_RPN).state_dict()}, path)
    return path


def test_cli_proposals_on_a_tiny_rpn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``regionclip evaluate --metric proposals`` = evaluate_proposals on the same RPN; the table is printed."""
    from regionclip.cli.evaluate_metrics import load_rpn_for_recall
    from regionclip.cli.main import main
    from regionclip.config import InputConfig
    from regionclip.data.datasets import load_annotations
    from regionclip.evaluation.proposals import evaluate_proposals
    from test_train_support import make_rect_dataset

    json_path, img_dir = make_rect_dataset(tmp_path / "data", num_images=3)
    rpn_file = _write_tiny_rpn(tmp_path / "rpn_tiny.pth")
    out = tmp_path / "out"
    rc = main(["evaluate", "--metric", "proposals", "--rpn-weights", str(rpn_file), "--dataset", str(json_path),
               "--image-root", str(img_dir), "-o", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "proposals.json").read_text())
    direct = evaluate_proposals(load_rpn_for_recall(str(rpn_file)), load_annotations(json_path, img_dir),
                                InputConfig(), progress=False)
    for k in ("AR@100", "AR@300", "AR@1000", "ARs@1000", "ARm@1000"):
        assert m[k] == (None if math.isnan(direct[k]) else pytest.approx(direct[k])), k
        assert m[k] is None or 0.0 <= m[k] <= 100.0
    assert m["num_images"] == 3 and m["AR@100"] <= m["AR@300"] <= m["AR@1000"]
    assert "AR@300" in capsys.readouterr().out


def test_cli_proposals_needs_an_rpn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from regionclip.cli.main import main
    from test_train_support import make_rect_dataset

    json_path, img_dir = make_rect_dataset(tmp_path / "data", num_images=1)
    rc = main(["evaluate", "--metric", "proposals", "--dataset", str(json_path), "--image-root", str(img_dir)])
    assert rc == 2 and "--rpn-weights" in capsys.readouterr().err
