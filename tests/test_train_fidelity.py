"""Details of the training step that must be the original's (CPU, tiny models): the train mapper's box
arithmetic, the RoI draws, the trained/frozen parameter names and the step's intermediate outputs.
The full-size comparison with the original's step is tests/parity/test_train_coco_step.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionclip.config import from_dict
from regionclip.data.datasets import load_coco_json
from regionclip.data.train_data import TrainingDataset
from regionclip.engine.roi_sampling import match_proposals, sample_rois
from regionclip.engine.transfer import TransferConfig, build_task
from test_train_support import tiny_recipe


def _one_image_json(tmp_path: Path, bboxes: list[list]) -> tuple[Path, Path]:
    Image.fromarray(np.full((23, 37, 3), 128, np.uint8)).save(tmp_path / "a.png")
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "iscrowd": 0, "area": 1.0}
            for i, b in enumerate(bboxes)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 23, "width": 37}],
                                "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path, tmp_path


def test_integer_bboxes_are_truncated_like_the_original_mapper(tmp_path: Path) -> None:
    """detectron2's train mapper resizes a bbox written with integers in an integer array (truncation toward
    zero) and drops boxes narrower than 1e-5 px; float bboxes are scaled in float64."""
    json_path, root = _one_image_json(tmp_path, [[3, 5, 11, 7], [3.0, 5.0, 11.0, 7.0], [3.0, 5.0, 1e-6, 4.0]])
    rec = load_coco_json(json_path, root).records[0]
    for flip in (False, True):
        ds = TrainingDataset([rec], min_sizes=(50,), max_size=1000, flip=flip)
        s = next(ds[(0, seed)] for seed in range(50) if (flip == (float(ds[(0, seed)].boxes[0, 0]) > 37)))
        w = s.image.shape[2]
        scale = np.array([w / 37, 50 / 23] * 2)
        exact = np.array([3, 5, 14, 12], np.float64) * scale
        trunc = np.trunc(exact)
        if flip:
            exact = np.array([w - exact[2], exact[1], w - exact[0], exact[3]])
            trunc = np.array([w - trunc[2], trunc[1], w - trunc[0], trunc[3]])
        assert len(s.boxes) == 2  # the 1e-6-wide box is empty for detectron2 (Boxes.nonempty(1e-5))
        assert s.boxes[0].tolist() == trunc.astype(np.float32).tolist()  # integer bbox
        assert s.boxes[1].tolist() == exact.astype(np.float32).tolist()  # float bbox


def _original_sample(labels_per_image: list[torch.Tensor], bg: int, num: int, frac: float) -> list[torch.Tensor]:
    """The original's ROIHeads._sample_proposals + subsample_labels draws, on the global RNG seeded with 0."""
    torch.manual_seed(0)
    out = []
    for labels in labels_per_image:
        positive = torch.nonzero((labels != -1) & (labels != bg), as_tuple=True)[0]
        negative = torch.nonzero(labels == bg, as_tuple=True)[0]
        num_pos = min(positive.numel(), int(num * frac))
        num_neg = min(negative.numel(), num - num_pos)
        perm1 = torch.randperm(positive.numel())[:num_pos]
        perm2 = torch.randperm(negative.numel())[:num_neg]
        out.append(torch.cat([positive[perm1], negative[perm2]]))
    return out


@pytest.mark.parametrize("num", [512, 16])  # every candidate sampled / a real subsample
def test_sampling_draws_equal_the_originals_for_the_same_seed(num: int) -> None:
    """A generator seeded like the original's global RNG picks the same RoIs in the same order, image by image."""
    g = torch.Generator().manual_seed(5)
    gts, props = [], []
    for n_gt in (3, 4):
        gt = torch.rand(n_gt, 2, generator=g) * 200
        gts.append(torch.cat([gt, gt + 40 + torch.rand(n_gt, 2, generator=g) * 60], 1))
        p = torch.rand(120, 2, generator=g) * 250
        props.append(torch.cat([p, p + 20 + torch.rand(120, 2, generator=g) * 80], 1))
    classes = [torch.tensor([0, 5, 2]), torch.tensor([1, 1, 4, 3])]
    labels = [match_proposals(torch.cat([p, gt]), gt, c, 6)[0] for p, gt, c in zip(props, gts, classes)]
    expected = _original_sample(labels, 6, num, 0.25)
    gen = torch.Generator().manual_seed(0)
    for p, gt, c, lab, exp in zip(props, gts, classes, labels, expected):
        s = sample_rois(p, gt, c, 6, batch_size_per_image=num, generator=gen)
        assert torch.equal(s.index, exp)
        assert torch.equal(s.boxes, torch.cat([p, gt])[exp]) and torch.equal(s.labels, lab[exp])


def test_trained_and_frozen_parameters_under_the_originals_names(tmp_path: Path) -> None:
    task = build_task(from_dict(TransferConfig, tiny_recipe(tmp_path))).task
    names = task.checkpoint_parameter_names()
    trained = {n for n, t in names.items() if t}
    frozen = {n for n, t in names.items() if not t}
    assert {"roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
            "backbone.layer2.0.conv1.weight", "backbone.layer4.0.conv1.weight",
            "backbone.attnpool.c_proj.weight", "backbone.attnpool.positional_embedding"} <= trained
    assert {"backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "roi_heads.box_predictor.cls_score.weight",
            "roi_heads.box_predictor.cls_bg_score.weight", "roi_heads.box_predictor.test_cls_score.weight"} <= frozen
    assert all(n.startswith(("offline_", "backbone.conv", "backbone.layer1.", "roi_heads.box_predictor.cls",
                             "roi_heads.box_predictor.test")) for n in frozen)
    assert not any(".bn" in n or "downsample.1" in n for n in names)  # FrozenBN statistics are buffers
    assert all(n.startswith(("backbone.", "roi_heads.")) for n in trained)


def test_step_outputs_are_what_the_losses_use(tmp_path: Path) -> None:
    built = build_task(from_dict(TransferConfig, tiny_recipe(tmp_path)))
    task = built.task.train()
    batch = [built.train_set[(0, 1)], built.train_set[(1, 2)]]
    out = task.step(batch, torch.Generator().manual_seed(3))
    losses = task(batch, generator=torch.Generator().manual_seed(3))
    assert {k: float(v.detach()) for k, v in out.losses.items()} == {k: float(v.detach()) for k, v in losses.items()}
    for prop, s, sample in zip(out.proposals, out.sampled, batch):
        assert torch.equal(s.boxes, torch.cat([prop.boxes, sample.boxes])[s.index])
        fg = s.fg_mask(task.num_classes)
        assert not fg[int(fg.sum()):].any()  # foreground first
    assert out.region_emb.shape == (sum(len(s.index) for s in out.sampled), task.detector.embed_dim)
    assert torch.equal(out.logits[:, -1], torch.zeros(len(out.logits)))  # background logit: zero embedding
    assert out.deltas is not None and task.detector.bbox_pred is not None
    torch.testing.assert_close(out.deltas, task.detector.bbox_pred(out.region_emb))  # raw, unnormalised input


def test_training_rpn_pads_the_whole_batch_like_the_original(tmp_path: Path) -> None:
    """The original's training forward runs the offline RPN on one ImageList padded to the batch's largest image,
    so a smaller image's proposals depend on its batch-mates; ours must do the same during training."""
    built = build_task(from_dict(TransferConfig, tiny_recipe(tmp_path)))
    task = built.task.train()
    batch = [built.train_set[(0, 0)], built.train_set[(1, 2)]]  # two scales: different sizes
    assert batch[0].image.shape != batch[1].image.shape
    out = task.step(batch, torch.Generator().manual_seed(3))
    images = [s.image.float() for s in batch]
    padded = task.detector.rpn(images, batch_padding=True)
    alone = task.detector.rpn(images, batch_padding=False)
    for got, want in zip(out.proposals, padded):
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.objectness_logits, want.objectness_logits)
    # the setting is visible here: padding with the batch changes the smaller image's proposals
    assert any(not torch.equal(a.objectness_logits, p.objectness_logits) for a, p in zip(alone, padded))
