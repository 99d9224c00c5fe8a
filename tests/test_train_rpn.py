"""``regionclip train-rpn``: the RPN losses by hand (detectron2's Matcher / subsample_labels / RPN.losses read line by
line), training a tiny FPN RPN on coloured rectangles, exact resume, and the result used as ``--rpn-weights``.
The step-level equality with detectron2 itself is tests/parity/test_rpn_train_step.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

from regionclip.config import from_dict
from regionclip.engine.rpn_train import RPNTrainConfig, build_rpn_for_training, run_rpn_training
from regionclip.engine.train import TrainingInterrupted
from regionclip.losses.rpn import label_and_sample_anchors, match_anchors, pairwise_iou, rpn_losses, smooth_l1_sum
from test_train_support import make_rect_dataset

TINY_FPN = {"arch": "fpn", "resnet_layers": [1, 1, 1, 1], "stem_out_channels": 8, "width_per_group": 4,
            "res2_out_channels": 16, "fpn_out_channels": 16, "post_nms_topk": 1000}


# ------------------------------------------------------------------------------------------------ pure functions
def test_pairwise_iou_zero_for_disjoint_and_degenerate_boxes() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])  # the second is empty
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 5.0, 5.0]])
    iou = pairwise_iou(a, b)
    assert iou[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert iou[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # torchvision would give 0/0 = nan for the empty pair
    torch.testing.assert_close(iou[0], box_iou(a[:1], b)[0].nan_to_num(0.0))


def test_match_anchors_thresholds_and_low_quality_matches_by_hand() -> None:
    iou = torch.tensor([[0.80, 0.50, 0.20, 0.10, 0.00],
                        [0.10, 0.25, 0.29, 0.65, 0.65]])
    matches, labels = match_anchors(iou, allow_low_quality_matches=False)
    assert matches.tolist() == [0, 0, 1, 1, 1]
    assert labels.tolist() == [1, -1, 0, -1, -1]  # >= 0.7 pos, [0.3, 0.7) ignore, < 0.3 neg
    _, labels = match_anchors(iou)
    assert labels.tolist() == [1, -1, 0, 1, 1]  # GT 1's best IoU 0.65 is tied by anchors 3 and 4: both positive
    exact = torch.tensor([[0.3, 0.7]])
    assert match_anchors(exact, allow_low_quality_matches=False)[1].tolist() == [-1, 1]  # intervals are [low, high)
    m, lab = match_anchors(torch.zeros(0, 3))
    assert m.tolist() == [0, 0, 0] and lab.tolist() == [0, 0, 0]  # no GT: all negative


def test_sampling_caps_positives_and_fills_with_negatives() -> None:
    # 400 anchors: 200 exactly on the GT box (positive), 200 far away (negative)
    on = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(200, 1)
    off = torch.tensor([[200.0, 200.0, 240.0, 240.0]]).repeat(200, 1)
    anchors = torch.cat([on, off])
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    g = torch.Generator().manual_seed(3)
    labels, matched = label_and_sample_anchors(anchors, gt, (300, 300), generator=g)
    assert int((labels == 1).sum()) == 128 and int((labels == 0).sum()) == 128
    assert bool((labels[:200] != 0).all()) and bool((labels[200:] != 1).all())
    torch.testing.assert_close(matched[labels == 1], gt.expand(128, 4))
    again, _ = label_and_sample_anchors(anchors, gt, (300, 300), generator=torch.Generator().manual_seed(3))
    assert torch.equal(labels, again)  # a pure function of the generator
    few = label_and_sample_anchors(anchors[190:210], gt, (300, 300), generator=g)[0]
    assert int((few == 1).sum()) == 10 and int((few == 0).sum()) == 10  # fewer than 256 labelled: all of them
    # boundary_thresh 0: the anchor reaching outside the 300x300 image is ignored
    edge = torch.tensor([[10.0, 10.0, 50.0, 50.0], [280.0, 280.0, 320.0, 320.0]])
    lab = label_and_sample_anchors(edge, gt, (300, 300), boundary_thresh=0.0, generator=g)[0]
    assert lab.tolist() == [1, -1]


def test_sampling_with_the_global_rng_draws_detectron2s_permutations() -> None:
    """detectron2 subsample_labels: randperm over the positives, then over the negatives, from the global RNG."""
    iou_row = torch.linspace(0.0, 1.0, 1000)  # one GT box, 1000 anchors: 300 positives, 300 negatives
    labels = match_anchors(iou_row[None], allow_low_quality_matches=False)[1].long()
    torch.manual_seed(0)
    positive = torch.nonzero((labels != -1) & (labels != 0)).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(positive.numel(), 128)
    ref_pos = positive[torch.randperm(positive.numel())[:num_pos]]
    ref_neg = negative[torch.randperm(negative.numel())[:256 - num_pos]]
    from regionclip.engine.roi_sampling import subsample_labels

    torch.manual_seed(0)
    pos, neg = subsample_labels(labels, 256, 0.5, 0, None)
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)
    assert len(pos) == 128 and len(neg) == 128


def test_rpn_losses_by_hand() -> None:
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]]), torch.tensor([[5.0, 5.0, 15.0, 25.0]])]
    logits = [torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5]])]
    deltas = [torch.tensor([[[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])]
    labels = [torch.tensor([1, 0, -1], dtype=torch.int8)]
    gt = [torch.tensor([[1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])]
    out = rpn_losses(anchors, logits, deltas, labels, gt, batch_size_per_image=4)
    # positive anchor 0: target deltas (0.1, 0, 0, 0) -> L1 0; objectness BCE(2, 1) + BCE(-1, 0)
    bce = float(np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)))
    assert float(out["loss_rpn_cls"]) == pytest.approx(bce / 4)
    assert float(out["loss_rpn_loc"]) == pytest.approx(0.0, abs=1e-7)
    deltas[0][0, 0, 2] = 0.5  # dw off by 0.5
    out = rpn_losses(anchors, logits, deltas, labels, gt, batch_size_per_image=4)
    assert float(out["loss_rpn_loc"]) == pytest.approx(0.5 / 4)
    assert float(out["num_pos_anchors"]) == 1 and float(out["num_neg_anchors"]) == 1
    assert float(smooth_l1_sum(torch.tensor([0.05, 2.0]), torch.zeros(2), beta=0.1)) == pytest.approx(
        0.5 * 0.05 ** 2 / 0.1 + (2.0 - 0.05))


# ------------------------------------------------------------------------------------------------ training runs
def _recipe(tmp: Path, max_iter: int, sub: str = "run", **train: object) -> dict:
    data = tmp / "data"
    if not (data / "train.json").exists():
        make_rect_dataset(data, num_images=6)
    ds = {"json": str(data / "train.json"), "image_root": str(data / "images")}
    return {"model": {"arch": dict(TINY_FPN), "input": {"min_size": 128, "max_size": 160}},
            "data": {"train": ds, "min_sizes": [112, 128], "max_size": 160},
            "solver": {"ims_per_batch": 2, "base_lr": 0.005, "warmup_iters": 5, "steps": [max_iter], "max_iter": max_iter},
            "train": {"output_dir": str(tmp / sub), "device": "cpu", "checkpoint_period": max_iter, "eval_period": 0,
                      "eval_at_end": False, "log_period": 1, "progress": False, "num_workers": 0, **train}}


def _losses(run: Path) -> dict[int, float]:
    return {m["iteration"]: m["total_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "total_loss" in m}


def test_training_lowers_the_loss_and_the_result_is_an_rpn_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from regionclip.cli.evaluate_metrics import load_rpn_for_recall
    from regionclip.cli.main import main

    r = _recipe(tmp_path, 30)
    cfg_file = tmp_path / "rpn.yaml"
    cfg_file.write_text(yaml.safe_dump(r))
    assert main(["train-rpn", "--config", str(cfg_file), "--set", "solver.base_lr=0.005"]) == 0
    run = tmp_path / "run"
    losses = list(_losses(run).values())
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"\nRPN loss (mean of 5 iterations): first {first:.3f} -> last {last:.3f}")
    assert last < 0.6 * first
    ckpt = run / json.loads((run / "last_checkpoint").read_text())["model"]
    rpn = load_rpn_for_recall(str(ckpt))  # architecture read off the detectron2 keys, strict load
    assert rpn.cfg.arch == "fpn" and rpn.cfg.fpn_out_channels == 16
    # the trained file is an --rpn-weights for detect
    from _region_helpers import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "tiny.pth")
    img = next((tmp_path / "data" / "images").glob("*.png"))
    capsys.readouterr()
    rc = main(["detect", "--weights", str(tiny), "--rpn-weights", str(ckpt), "--vocab", "red box,green box",
               "--score-thresh", "0.0", "--rpn-score", "sigmoid", "--max-proposals", "20", "--no-vis", "-o", str(tmp_path / "det"), str(img)])
    assert rc == 0
    assert len(json.loads((tmp_path / "det" / "results.json").read_text())) > 0


def test_resume_after_crash_reproduces_the_losses(tmp_path: Path) -> None:
    run_rpn_training(from_dict(RPNTrainConfig, _recipe(tmp_path, 6, "straight")))

    def crash(iteration: int, losses: dict) -> None:
        if iteration == 5:
            raise TrainingInterrupted("simulated crash")

    cfg = from_dict(RPNTrainConfig, _recipe(tmp_path, 6, "crashed", checkpoint_period=3))
    with pytest.raises(TrainingInterrupted):
        run_rpn_training(cfg, hooks=[crash])
    run_rpn_training(cfg, resume=True)
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "crashed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=1e-6, abs=1e-7), i


def test_init_from_a_released_layout_file_and_from_a_trunk(tmp_path: Path) -> None:
    from regionclip.engine.rpn_train import RPNModelSection, RPNTask
    from regionclip.modeling.rpn import build_offline_rpn

    src = build_offline_rpn(from_dict(RPNTrainConfig, {"model": {"arch": TINY_FPN}}).model.arch)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "rpn_released_layout.pth"
    torch.save({"model": src.state_dict()}, path)
    rpn = build_rpn_for_training(RPNModelSection(weights=str(path)))
    for k, v in src.state_dict().items():
        assert torch.equal(rpn.state_dict()[k], v), k
    task = RPNTask(rpn, freeze_at=2)
    frozen = {n for n, p in task.named_parameters() if not p.requires_grad}
    assert frozen and all(".stem." in n or ".res2." in n for n in frozen)
    # trunk_weights: detectron2-named ResNet keys (here from the same file, under backbone.bottom_up.)
    trunk_only = {k: v for k, v in src.state_dict().items() if k.startswith("backbone.bottom_up.")}
    tpath = tmp_path / "trunk.pth"
    torch.save(trunk_only, tpath)
    fresh = build_rpn_for_training(RPNModelSection(arch=src.cfg, trunk_weights=str(tpath)))
    for k, v in trunk_only.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    head = fresh.proposal_generator.rpn_head.objectness_logits
    assert float(head.weight.std()) == pytest.approx(0.01, rel=0.5) and float(head.bias.abs().max()) == 0.0


def test_clip_trunk_rpn_is_refused_with_a_clear_error() -> None:
    from types import SimpleNamespace

    from regionclip.engine.rpn_train import RPNTask

    with pytest.raises(ValueError, match="'clip' trunk .* start from rpn_lvis_866"):
        RPNTask(SimpleNamespace(cfg=SimpleNamespace(trunk="clip", arch="fpn")))  # type: ignore[arg-type]
