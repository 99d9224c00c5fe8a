"""Region-classification accuracy (paper Fig. 1b): pure counting, the runner on a tiny model, the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _region_helpers import tiny_pipeline, tiny_vocab, write_tiny_checkpoint
from regionclip.data.datasets import load_annotations
from regionclip.evaluation.region_accuracy import (
    RegionAccuracyCounts,
    evaluate_region_accuracy,
    format_region_accuracy,
    summarize_region_accuracy,
    topk_hits,
)
from regionclip.pipeline import RunOptions
from test_train_support import make_rect_dataset, write_embeddings


def test_topk_hits_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2],   # order 1, 2, 0
                           [0.5, 0.3, 0.2],   # order 0, 1, 2
                           [0.2, 0.3, 0.5]])  # order 2, 1, 0
    labels = torch.tensor([1, 1, 0])
    hits = topk_hits(scores, labels, ks=(1, 2, 5))
    assert hits[1].tolist() == [True, False, False]
    assert hits[2].tolist() == [True, True, False]
    assert hits[5].tolist() == [True, True, True]  # k beyond the number of classes: every box


def test_topk_hits_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        topk_hits(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected scores"):
        topk_hits(torch.zeros(2, 3), torch.tensor([0]))


def test_counts_and_frequency_groups_by_hand() -> None:
    counts = RegionAccuracyCounts(3, ks=(1, 2))
    # class 0 (rare): 2 boxes, 1 top-1 hit; class 1 (common): 1 box, top-2 hit only; class 2 (frequent): no box
    counts.add(torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.05]]), torch.tensor([0, 0]))
    counts.add(torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([1]))
    out = summarize_region_accuracy(counts, ["r", "c", "f"])
    assert out["num_boxes"] == 3 and out["num_classes_with_boxes"] == 2
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top2"] == pytest.approx(100.0)
    assert out["mean_class_top1"] == pytest.approx((50 + 0) / 2)
    assert out["top1_r"] == pytest.approx(50.0) and out["top1_c"] == 0.0 and math.isnan(out["top1_f"])
    assert out["top2_c"] == 100.0 and out["num_boxes_r"] == 2 and out["num_boxes_f"] == 0
    other = RegionAccuracyCounts(3, ks=(1, 2))
    other.add(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([2]))
    counts.merge(other)
    assert summarize_region_accuracy(counts)["top1"] == pytest.approx(50.0)
    table = format_region_accuracy(out)
    assert "top-1 r" in table and "33.3" in table and "| 3 |" in table


def _rect_dataset(tmp_path: Path):
    json_path, img_dir = make_rect_dataset(tmp_path / "data", num_images=4)
    return json_path, img_dir, load_annotations(json_path, img_dir)


def test_runner_equals_classifying_each_gt_box(tmp_path: Path) -> None:
    _, _, ds = _rect_dataset(tmp_path)
    pipe = tiny_pipeline(0, min_size=64, max_size=96)
    vocab = tiny_vocab(3)
    opts = RunOptions(chunk_size=16)
    out = evaluate_region_accuracy(pipe, ds, vocab, opts, ks=(1, 3), progress=False)
    # independent: the public pipeline stages, box by box in the original frame
    n_hit, n = 0, 0
    for rec in ds:
        p = pipe.prepare(rec.file_name)
        for box, label in zip(rec.boxes, rec.labels):
            reg = pipe.user_regions(box[None], p)
            emb = pipe.encode(pipe.features([p], opts), [reg.boxes], opts)
            n_hit += int(pipe.classify(emb, vocab)[0].argmax()) == int(label)
            n += 1
    assert out["num_boxes"] == n == sum(len(r.boxes) for r in ds) and out["num_images"] == 4
    assert out["top1"] == pytest.approx(100.0 * n_hit / n)
    assert out["top3"] == 100.0  # 3 classes
    assert "top1_r" not in out  # COCO: no frequency groups


def test_runner_refuses_a_vocabulary_of_another_size(tmp_path: Path) -> None:
    _, _, ds = _rect_dataset(tmp_path)
    with pytest.raises(ValueError, match="vocabulary has 5 classes but dataset"):
        evaluate_region_accuracy(tiny_pipeline(0), ds, tiny_vocab(5), progress=False)


def test_cli_region_accuracy_lvis_groups(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``regionclip evaluate --metric region-accuracy`` on an LVIS-format json: per-group numbers and the JSON."""
    from regionclip.cli.main import main

    json_path, img_dir, _ = _rect_dataset(tmp_path)
    data = json.loads(json_path.read_text())
    for c, f in zip(data["categories"], ["r", "c", "f"]):
        c["frequency"] = f
    lvis_json = tmp_path / "lvis_like.json"
    lvis_json.write_text(json.dumps(data))
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pth")
    emb = write_embeddings(tmp_path / "emb.pth", 3)
    out_dir = tmp_path / "out"
    rc = main(["evaluate", "--metric", "region-accuracy", "--weights", str(ckpt), "--dataset", str(lvis_json),
               "--image-root", str(img_dir), "--concept-emb", str(emb), "-o", str(out_dir), "--no-progress",
               "--num-workers", "0"])
    assert rc == 0
    m = json.loads((out_dir / "region_accuracy.json").read_text())
    assert m["num_boxes"] == len(data["annotations"])
    assert m["num_boxes_r"] + m["num_boxes_c"] + m["num_boxes_f"] == m["num_boxes"]
    assert m["top5"] == 100.0 and 0.0 <= m["top1"] <= 100.0
    # box-weighted overall top-1 is the box-weighted mean of the groups
    groups = [(m[f"top1_{g}"], m[f"num_boxes_{g}"]) for g in "rcf" if m[f"num_boxes_{g}"]]
    assert m["top1"] == pytest.approx(sum(a * b for a, b in groups) / m["num_boxes"])
    printed = capsys.readouterr().out
    assert "top-1 r" in printed and "region_accuracy.json" in printed
    assert np.isfinite(m["top1"])
