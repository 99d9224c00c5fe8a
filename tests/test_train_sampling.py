"""RoI matching/sampling (detectron2 semantics), training samplers and augmentation."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from regionclip.data.datasets import ImageRecord, load_coco_json
from regionclip.data.train_data import (GroupedBatchSampler, TrainingDataset, TrainingSampler, load_segmentations,
                                        polygons_to_roi_masks, repeat_factors)
from regionclip.engine.roi_sampling import match_proposals, sample_rois, subsample_labels
from regionclip.engine.schedule import SolverConfig, lr_factor
from test_train_support import make_rect_dataset


def test_match_threshold_and_background() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 5.0],  # IoU 0.5 exactly -> foreground
                          [0.0, 0.0, 10.0, 4.9],  # just below -> background
                          [20.0, 20.0, 30.0, 30.0]])
    labels, matched = match_proposals(props, gt, torch.tensor([1]), num_classes=3)
    assert labels.tolist() == [1, 3, 3] and matched.tolist() == [0, 0, 0]
    labels, _ = match_proposals(props, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), num_classes=3)
    assert labels.tolist() == [3, 3, 3]


def test_subsample_caps_foreground_fraction() -> None:
    labels = torch.tensor([0] * 300 + [5] * 1000)
    pos, neg = subsample_labels(labels, 512, 0.25, bg_label=5, generator=torch.Generator().manual_seed(0))
    assert len(pos) == 128 and len(neg) == 384
    assert (labels[pos] == 0).all() and (labels[neg] == 5).all() and len(set(pos.tolist())) == 128
    few = torch.tensor([0] * 10 + [5] * 20)  # fewer than asked: take everything
    pos, neg = subsample_labels(few, 512, 0.25, bg_label=5)
    assert len(pos) == 10 and len(neg) == 20


def test_sample_rois_appends_gt_and_is_deterministic_per_generator() -> None:
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    props = torch.rand(200, 2) * 60
    props = torch.cat([props, props + 5 + torch.rand(200, 2) * 30], 1)
    a = sample_rois(props, gt, torch.tensor([2]), 3, batch_size_per_image=64,
                    generator=torch.Generator().manual_seed(1))
    b = sample_rois(props, gt, torch.tensor([2]), 3, batch_size_per_image=64,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.boxes, b.boxes)
    fg = a.fg_mask(3)
    assert fg.sum() >= 1 and fg.sum() <= 16 and len(a.labels) == 64
    assert any(torch.equal(bx, gt[0]) for bx in a.boxes[fg])  # the GT box is a proposal
    assert torch.equal(a.gt_boxes[fg], gt.expand(int(fg.sum()), 4))


def test_training_sampler_shards_and_repeats() -> None:
    s0 = TrainingSampler(10, seed=3, rank=0, world_size=2)
    s1 = TrainingSampler(10, seed=3, rank=1, world_size=2)
    take = lambda s, n: [next(it) for it in [iter(s)] for _ in range(n)]  # noqa: E731
    a, b = take(s0, 5), take(s1, 5)
    assert sorted(i for i, _ in a + b) == list(range(10))  # one epoch split across ranks, no overlap
    assert [p for _, p in a] == [0, 2, 4, 6, 8] and [p for _, p in b] == [1, 3, 5, 7, 9]
    rf = np.array([1.0] * 9 + [3.0])
    counts = Counter(i for i, _ in take(TrainingSampler(10, seed=0, repeat_factors=rf), 1200))
    assert counts[9] > 2.5 * np.mean([counts[i] for i in range(9)])


def test_repeat_factors_lvis_formula() -> None:
    recs = [ImageRecord(i, "x", 10, 10, boxes=[[0, 0, 1, 1]], labels=[0 if i < 999 else 1], iscrowd=[False]) for i in range(1000)]
    rf = repeat_factors(recs, 2, threshold=0.001)
    assert rf[0] == 1.0 and rf[-1] == pytest.approx(np.sqrt(0.001 / 0.001))
    rf = repeat_factors(recs, 2, threshold=0.01)
    assert rf[-1] == pytest.approx(np.sqrt(0.01 / 0.001)) and rf[0] == 1.0


def test_grouped_batches_skip_exactly() -> None:
    groups = np.array([0, 1] * 8)
    full = GroupedBatchSampler(TrainingSampler(16, seed=0), 2, groups, seed=0)
    it = iter(full)
    batches = [next(it) for _ in range(7)]
    for b in batches:
        assert len({groups[i] for i, _ in b}) == 1  # same aspect group
    resumed = iter(GroupedBatchSampler(TrainingSampler(16, seed=0), 2, groups, seed=0, start_batch=4))
    assert [next(resumed) for _ in range(3)] == batches[4:]


def test_augmentation_flips_boxes_and_polygons(tmp_path: Path) -> None:
    json_path, images = make_rect_dataset(tmp_path, num_images=2)
    ds = load_coco_json(json_path, images)
    segs = load_segmentations(ds)
    train = TrainingDataset(ds.records, min_sizes=(128,), max_size=1000, flip=True, segmentations=segs)
    rec = ds.records[0]
    seen = set()
    for seed in range(12):
        s = train[(0, seed)]
        h, w = s.image.shape[1:]
        scale = 128 / min(rec.height, rec.width)
        ref = rec.boxes[0] * scale
        flipped = bool(abs(float(s.boxes[0, 0]) - ref[0]) > 1e-3)
        seen.add(flipped)
        exp = np.array([w - ref[2], ref[1], w - ref[0], ref[3]]) if flipped else ref
        np.testing.assert_allclose(s.boxes[0].numpy(), exp, atol=1e-3)
        # the box's pixels carry the rectangle colour (image and boxes transformed together)
        x0, y0, x1, y1 = (int(round(v)) for v in s.boxes[0].tolist())
        patch = s.image[:, y0 + 3:y1 - 3, x0 + 3:x1 - 3].float().mean((1, 2))
        assert patch.max() > 180
        # polygon target of the GT box itself is a full mask
        m = polygons_to_roi_masks(s.polygons, torch.tensor([0]), s.boxes[:1], 8)
        assert m.mean() > 0.9
    assert seen == {True, False}


def test_lr_schedule_warmup_and_steps() -> None:
    cfg = SolverConfig(warmup_iters=100, warmup_factor=0.001, steps=(200, 300), gamma=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(50, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(100, cfg) == 1.0 and lr_factor(199, cfg) == 1.0
    assert lr_factor(200, cfg) == pytest.approx(0.1) and lr_factor(300, cfg) == pytest.approx(0.01)
