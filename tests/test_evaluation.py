"""COCO / LVIS evaluators and the resumable inference loop on synthetic data with known answers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from regionclip.assets import coco_ovd_categories
from regionclip.data.datasets import load_coco_json
from regionclip.evaluation import (ResultsError, batch_predictor, evaluate_coco, evaluate_dataset, evaluate_lvis,
                                   format_metrics, load_results, ovd_split_category_ids, run_inference,
                                   write_metrics_json)
from regionclip.structures import Detections

# The real COCO ids of the 65 OV-COCO classes, as in the OVR-CNN jsons (the split table numbers them 1..80).
_COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                 88, 89, 90]


def _box(i: int) -> list[float]:
    """Non-overlapping 40x40 XYWH boxes on a 10-column grid of a 1000x1000 image."""
    return [float(100 * (i % 10) + 10), float(100 * (i // 10) + 10), 40.0, 40.0]


def _coco_gt(cat_ids: list[int], names: list[str], boxes_per_cat: int = 2, num_images: int = 2) -> dict:
    anns, aid = [], 1
    for img in range(1, num_images + 1):
        for k, cid in enumerate(cat_ids):
            for j in range(boxes_per_cat):
                anns.append({"id": aid, "image_id": img, "category_id": cid, "bbox": _box(k * boxes_per_cat + j),
                             "area": 1600.0, "iscrowd": 0})
                aid += 1
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 1000, "width": 1000}
                       for i in range(1, num_images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, names)]}


def _perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]


def test_perfect_predictions_give_ap_1() -> None:
    gt = _coco_gt([1, 2, 3], ["a", "b", "c"])
    m = evaluate_coco(gt, _perfect(gt))
    for k in ("AP", "AP50", "AP75", "AP-a", "AP-b", "AP-c"):
        assert m[k] == pytest.approx(100.0), k


def test_shuffled_classes_give_ap_0() -> None:
    gt = _coco_gt([1, 2, 3], ["a", "b", "c"])
    shift = {1: 2, 2: 3, 3: 1}  # a derangement: every box gets a class it is not annotated with
    dets = [dict(d, category_id=shift[d["category_id"]]) for d in _perfect(gt)]
    m = evaluate_coco(gt, dets)
    assert m["AP"] == 0.0 and m["AP50"] == 0.0
    assert all(m[f"AP-{n}"] == 0.0 for n in "abc")


def test_hand_computed_ap50() -> None:
    # One class, one image, 2 GT boxes; 3 detections by score: TP (0.9), FP far away (0.8), TP (0.7).
    # Cumulative (precision, recall): (1, .5), (.5, .5), (2/3, 1). COCO makes precision monotone from the right:
    # [1, 2/3, 2/3], then samples it at the 101 recall points 0, .01, ..., 1 (first detection with recall >= r):
    # r in [0, .5] (51 points) -> 1; r in [.51, 1] (50 points) -> 2/3. AP50 = (51 + 50 * 2/3) / 101 = 0.834983.
    # The TPs are exact copies of the GT, so every IoU threshold gives the same value and AP = AP50.
    gt = _coco_gt([7], ["x"], boxes_per_cat=2, num_images=1)
    g = gt["annotations"]
    dets = [{"image_id": 1, "category_id": 7, "bbox": g[0]["bbox"], "score": 0.9},
            {"image_id": 1, "category_id": 7, "bbox": [900.0, 900.0, 40.0, 40.0], "score": 0.8},
            {"image_id": 1, "category_id": 7, "bbox": g[1]["bbox"], "score": 0.7}]
    expected = (51 + 50 * 2 / 3) / 101 * 100
    m = evaluate_coco(gt, dets)
    assert m["AP50"] == pytest.approx(expected, abs=1e-6)
    assert m["AP"] == pytest.approx(expected, abs=1e-6)


def _ovcoco_gt() -> dict:
    cats = coco_ovd_categories()
    return _coco_gt([_COCO80_TO_91[c["coco_id"] - 1] for c in cats], [c["name"] for c in cats], 1, 1)


def test_ovd_split_uses_the_right_category_ids() -> None:
    gt = _ovcoco_gt()
    split = ovd_split_category_ids(gt["categories"])
    assert split is not None and len(split["novel"]) == 17 and len(split["base"]) == 48
    names = {c["id"]: c["name"] for c in gt["categories"]}
    # Real COCO ids from spec §10.2 (its numbers are 1..80 ranks): airplane 5, bus 6, cat 17, ..., scissors 87.
    assert split["novel"] == [5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87]
    assert {names[i] for i in split["novel"]} >= {"airplane", "cat", "umbrella", "scissors", "couch"}
    assert "person" in {names[i] for i in split["base"]}


def test_ovd_split_ap50_novel_only_correct() -> None:
    gt = _ovcoco_gt()
    split = ovd_split_category_ids(gt["categories"])
    novel = set(split["novel"])
    # Perfect on the novel classes, wrong class on the base ones -> novel 1, base 0, all = 17/65.
    base_ids = split["base"]
    dets = [dict(d, category_id=d["category_id"] if d["category_id"] in novel else
                 base_ids[(base_ids.index(d["category_id"]) + 1) % len(base_ids)]) for d in _perfect(gt)]
    m = evaluate_coco(gt, dets)
    assert m["AP50_split_target"] == pytest.approx(1.0)
    assert m["AP50_split_base"] == pytest.approx(0.0)
    assert m["AP50_split_all"] == pytest.approx(17 / 65)
    assert m["novel_AP50"] == pytest.approx(100.0)
    table = format_metrics(m)
    assert "Novel AP50" in table and "100.0" in table and "26.2" in table


def test_no_split_for_non_65_class_datasets() -> None:
    gt = _coco_gt([1, 2], ["person", "airplane"])
    assert "novel_AP50" not in evaluate_coco(gt, _perfect(gt))


def _lvis_gt() -> dict:
    freqs = {1: "r", 2: "r", 3: "c", 4: "c", 5: "f", 6: "f"}
    gt = _coco_gt(list(freqs), [f"cat{i}" for i in freqs], boxes_per_cat=1, num_images=2)
    for c in gt["categories"]:
        c["frequency"] = freqs[c["id"]]
        c["synonyms"] = [c["name"]]
    for img in gt["images"]:
        img["neg_category_ids"] = []
        img["not_exhaustive_category_ids"] = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return gt


def test_lvis_ap_split_by_frequency() -> None:
    gt = _lvis_gt()
    rare = {1, 2}
    common = [3, 4]
    # rare: perfect; common: each box labelled as the other common class (AP 0); frequent: perfect.
    dets = [dict(d, category_id=(common[1 - common.index(d["category_id"])] if d["category_id"] in common
                                 else d["category_id"])) for d in _perfect(gt)]
    m = evaluate_lvis(gt, dets)["bbox"]
    assert m["APr"] == pytest.approx(100.0)
    assert m["APc"] == pytest.approx(0.0)
    assert m["APf"] == pytest.approx(100.0)
    assert m["AP"] == pytest.approx(100 * 4 / 6)
    assert rare  # (documenting which ids are rare)
    assert "APr" in format_metrics({"bbox": m})


def test_lvis_segm_when_masks_exist() -> None:
    gt = _lvis_gt()
    from pycocotools import mask as mask_util

    dets = []
    for d in _perfect(gt):
        m = np.zeros((1000, 1000), np.uint8)
        x, y, w, h = (int(v) for v in d["bbox"])
        m[y:y + h, x:x + w] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        dets.append(dict(d, segmentation=rle))
    out = evaluate_lvis(gt, dets)
    assert set(out) == {"bbox", "segm"}
    assert out["bbox"]["AP"] == pytest.approx(100.0)
    assert out["segm"]["AP50"] == pytest.approx(100.0)


# ---- bad input ------------------------------------------------------------------------------------------------

def test_unknown_image_and_category_ids_are_named() -> None:
    gt = _coco_gt([1, 2], ["a", "b"])
    with pytest.raises(ResultsError, match=r"image id.*\[99\]"):
        evaluate_coco(gt, [dict(_perfect(gt)[0], image_id=99)])
    with pytest.raises(ResultsError, match=r"category id.*\[42\]"):
        evaluate_coco(gt, [dict(_perfect(gt)[0], category_id=42)])
    with pytest.raises(ResultsError, match=r"category id"):
        evaluate_lvis(_lvis_gt(), [dict(_perfect(_lvis_gt())[0], category_id=1203)])
    with pytest.raises(ResultsError, match="bbox must be 4 finite numbers"):
        evaluate_coco(gt, [dict(_perfect(gt)[0], bbox=[1, 2, 3])])


def test_empty_results() -> None:
    gt = _coco_gt([1, 2], ["a", "b"])
    with pytest.raises(ResultsError, match="empty"):
        evaluate_coco(gt, [])
    with pytest.raises(ResultsError, match="empty"):
        evaluate_lvis(_lvis_gt(), [])
    assert evaluate_coco(gt, [], allow_empty=True)["AP"] == 0.0


def test_truncated_results_json(tmp_path: Path) -> None:
    gt = _coco_gt([1], ["a"])
    p = tmp_path / "coco_instances_results.json"
    p.write_text(json.dumps(_perfect(gt))[:-30])
    with pytest.raises(ResultsError, match="truncated"):
        load_results(p)
    with pytest.raises(ResultsError, match="not valid JSON"):
        evaluate_coco(gt, p)
    p.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ResultsError, match="list"):
        load_results(p)


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    p = write_metrics_json({"AP": 1.0, "bbox": {"APr": float("nan")}}, tmp_path / "m.json")
    assert json.loads(p.read_text()) == {"AP": 1.0, "bbox": {"APr": None}}


# ---- inference loop with a fake predictor -----------------------------------------------------------------------

class _GTPredictor:
    """Returns each image's non-crowd GT boxes as detections; counts calls."""

    def __init__(self, num_classes: int, fail_after: int = -1) -> None:
        self.calls, self.num_classes, self.fail_after = 0, num_classes, fail_after

    def __call__(self, records):
        if self.calls == self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        out = []
        for r in records:
            boxes, labels = r.region_boxes()
            out.append(Detections(torch.from_numpy(boxes), torch.linspace(0.9, 0.5, len(boxes)),
                                  torch.from_numpy(labels), (r.height, r.width)))
        return out


def _write_gt(tmp_path: Path, gt: dict) -> Path:
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    return p


def test_evaluate_dataset_perfect_and_resumable(tmp_path: Path) -> None:
    gt = _coco_gt([3, 9], ["a", "b"], num_images=3)
    ds = load_coco_json(_write_gt(tmp_path, gt), tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_inference(ds, batch_predictor(_GTPredictor(2, fail_after=2)), out, progress=False)
    # Simulate a kill in the middle of writing a line.
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"image_id": 3, "instan')
    pred = _GTPredictor(2)
    metrics = evaluate_dataset(ds, batch_predictor(pred), out, progress=False)
    assert pred.calls == 1  # only the third image was left
    assert metrics["AP"] == pytest.approx(100.0)
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert len(results) == len(gt["annotations"])
    assert {r["category_id"] for r in results} == {3, 9}  # contiguous labels mapped back to the json's ids
    assert json.loads((out / "metrics.json").read_text())["AP50"] == pytest.approx(100.0)
    with pytest.raises(ResultsError, match="other settings"):
        run_inference(ds, batch_predictor(pred), out, progress=False, meta={"score_thresh": 0.5})


def test_predictor_labels_out_of_range(tmp_path: Path) -> None:
    ds = load_coco_json(_write_gt(tmp_path, _coco_gt([1], ["a"])), tmp_path)
    def predict(records):
        return [Detections(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.ones(1), torch.tensor([3]), (9, 9))
                for _ in records]

    with pytest.raises(ResultsError, match="vocabulary"):
        run_inference(ds, batch_predictor(predict), tmp_path / "o", progress=False)


# ---- end to end with the real detector --------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_evaluate_gt_mode_end_to_end(tmp_path: Path, rn50_ckpts: dict, shared_dir: Path,
                                         demo_images: list[Path]) -> None:
    """Full-size RN50 (random official-format weights) on the two demo images with the hand-placed GT boxes."""
    from regionclip.cli.main import main

    gt_path = shared_dir / "parity" / "gt_boxes.json"
    out = tmp_path / "eval"
    argv = ["evaluate", "--dataset", str(gt_path), "--image-root", str(demo_images[0].parent), "--preset", "coco-gt",
            "--weights", str(rn50_ckpts["regionclip"]), "--concept-emb", str(rn50_ckpts["concept_emb"]),
            "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "novel_AP50", "base_AP50", "all_AP50"} <= set(metrics)
    results = json.loads((out / "coco_instances_results.json").read_text())
    gt = json.loads(gt_path.read_text())
    assert results and {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    assert {r["image_id"] for r in results} <= {1, 2}
    # per image, descending score (spec §4.9)
    for img in (1, 2):
        s = [r["score"] for r in results if r["image_id"] == img]
        assert s == sorted(s, reverse=True)
    # a second run resumes: nothing left to predict, same results
    assert main(argv) == 0
    assert json.loads((out / "coco_instances_results.json").read_text()) == results
    # GT mode reproduces the original's detections on the parity fixtures (same regions, same classes/scores)
    ref = torch.load(shared_dir / "parity" / "refs" / "rn50_gt.pt", weights_only=True)["images"]
    ids = sorted(c["id"] for c in gt["categories"])
    for img, name in ((1, "sample_img1.jpg"), (2, "sample_img2.jpg")):
        ours = [r for r in results if r["image_id"] == img]
        assert [r["category_id"] for r in ours] == [ids[c] for c in ref[name]["final_classes"].tolist()]
        torch.testing.assert_close(torch.tensor([r["score"] for r in ours]), ref[name]["final_scores"],
                                   atol=1e-5, rtol=1e-4)


def test_cli_evaluate_stops_at_an_unreadable_image_and_resumes(tmp_path: Path, tiny_ckpt: Path, emb_file: Path,
                                                                monkeypatch, capsys) -> None:
    """Evaluation scores every image, so an unreadable one (met in a decoding worker) stops the run naming it; the
    images finished before it stay in the journal, and the same command after the fix does only the rest and
    writes what a fresh run writes."""
    from PIL import Image

    from regionclip.cli.main import main
    from regionclip.pipeline import Pipeline

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    sizes = [(60, 80), (64, 64), (70, 50)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    gt = {"images": [{"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(sizes)],
          "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i, "bbox": [2, 3, 30, 25], "area": 750,
                           "iscrowd": 0} for i in range(3)],
          "categories": [{"id": c, "name": n} for c, n in zip((1, 2, 3), "abc")]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    good = (imgs / "1.png").read_bytes()
    (imgs / "1.png").write_bytes(b"not an image")
    seen = []
    orig = Pipeline.iter_batches

    def spy(self, items, options, **kw):
        seen.append([it.file_name for it in items])
        return orig(self, items, options, **kw)

    monkeypatch.setattr(Pipeline, "iter_batches", spy)

    def evaluate(out: str, *extra: str) -> int:
        return main(["evaluate", "--dataset", str(tmp_path / "gt.json"), "--image-root", str(imgs), "--regions", "gt",
                     "--weights", str(tiny_ckpt), "--concept-emb", str(emb_file), "--score-thresh", "0",
                     "--no-progress", "-o", str(tmp_path / out), *extra])

    assert evaluate("out", "--num-workers", "2") == 2
    err = capsys.readouterr().err
    assert "1.png" in err and "every image" in err
    journal = [json.loads(ln) for ln in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[1:]]
    assert [e["key"] for e in journal] == ["1"]  # the image before the bad one is kept
    assert not (tmp_path / "out" / "coco_instances_results.json").exists()
    assert not (tmp_path / "out" / "metrics.json").exists()

    (imgs / "1.png").write_bytes(good)
    assert evaluate("out", "--num-workers", "2") == 0
    assert [Path(f).name for f in seen[-1]] == ["1.png", "2.png"]  # resumed: only the rest
    assert evaluate("fresh", "--num-workers", "0") == 0
    for name in ("coco_instances_results.json", "metrics.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
