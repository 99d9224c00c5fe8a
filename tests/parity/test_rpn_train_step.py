"""One RPN training step against detectron2's (``fixtures/rpn_step.pt``, written by
``scripts/fixtures/make_rpn_step.py`` from the original's ``ProposalNetwork`` with ``rpn_R_50_FPN_1x.yaml`` and the
seed-0 random R50-FPN RPN).

The fixture's inputs go through the code ``regionclip train-rpn`` runs: :class:`RPNTask` (preprocess, trunk + FPN,
head, anchors, :func:`label_and_sample_anchors` with the global RNG seeded 0 as the driver seeds it,
:func:`rpn_losses`) and backward. Compared: the training resize of the images (bitwise), the sampled anchors of each
image (exact), both losses, full gradients of the head's 1x1 convs and of ``backbone.fpn_output5.bias``, every
parameter's gradient norm and sum, and the trainable / frozen parameter sets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import regionclip.engine.rpn_train as rpn_train_module
from regionclip.assets import demo_image_paths
from regionclip.checkpoint.io import load_state_dict
from regionclip.checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from regionclip.data.datasets import load_annotations
from regionclip.data.train_data import TrainingDataset, TrainSample
from regionclip.engine.rpn_train import RPNLossConfig, RPNTask
from regionclip.modeling.rpn import build_offline_rpn

pytestmark = pytest.mark.parity
FIXTURE = Path(__file__).parent / "fixtures" / "rpn_step.pt"

# float32 sums over a full R50-FPN on 2 images: a few 1e-7 relative on the losses, ~1e-5 on gradients (summation
# order of the conv backward kernels); tolerances 10-100x that. A wrong label, normaliser or delta moves them by %.
LOSS_REL = 1e-5
GRAD_REL = 2e-4


@pytest.fixture(scope="module")
def fixture() -> dict:
    if not FIXTURE.exists():
        pytest.fail(f"{FIXTURE} missing: run /work/orig/venv/bin/python scripts/fixtures/make_rpn_step.py")
    return torch.load(FIXTURE, weights_only=True)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_training_resize_matches_detectron2(fixture: dict, shared_dir: Path, tmp_path: Path) -> None:
    gt = json.loads((shared_dir / "parity" / "gt_boxes.json").read_text())
    for a in gt["annotations"]:
        a["category_id"] = 1
    gt["categories"] = [{"id": 1, "name": "object"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ds = load_annotations(path, demo_image_paths()[0].parent)
    train = TrainingDataset(ds.records, (320,), 569, flip=False)
    for i, inp in enumerate(fixture["inputs"]):
        s = train[(i, 0)]
        assert _sha(s.image[[2, 1, 0]]) == inp["image_sha256"], inp["file_name"]
        torch.testing.assert_close(s.boxes, inp["gt_boxes"].float(), rtol=0, atol=1e-4)


def test_rpn_training_step_equals_detectron2(fixture: dict, rn50_ckpts: dict, monkeypatch) -> None:
    sd, _ = rpn_state_dict_from_checkpoint(load_state_dict(rn50_ckpts["rpn"]))
    rpn = build_offline_rpn(infer_rpn_config(sd))
    rpn.load_state_dict(sd)
    s = fixture["rpn_settings"]
    assert tuple(rpn.cfg.pixel_mean) == tuple(s["pixel_mean"]) and tuple(rpn.cfg.pixel_std) == tuple(s["pixel_std"])
    loss_cfg = RPNLossConfig(iou_thresholds=tuple(s["iou_thresholds"]), batch_size_per_image=s["batch_size_per_image"],
                             positive_fraction=s["positive_fraction"], smooth_l1_beta=s["smooth_l1_beta"])
    task = RPNTask(rpn, loss_cfg, freeze_at=s["freeze_at"])
    sampled: list = []
    real = rpn_train_module.label_and_sample_anchors

    def record(*a, **k):
        labels, boxes = real(*a, **k)
        sampled.append(labels.clone())
        return labels, boxes

    monkeypatch.setattr(rpn_train_module, "label_and_sample_anchors", record)
    batch = [TrainSample(inp["image_bgr"][[2, 1, 0]].contiguous(), inp["gt_boxes"].float(), torch.zeros(0), i)
             for i, inp in enumerate(fixture["inputs"])]
    task.train()
    task.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the driver's seed: subsampling draws the same torch.randperm sequence
    losses = task(batch, generator=None)
    (losses["loss_rpn_cls"] + losses["loss_rpn_loc"]).backward()

    assert sampled[0].numel() == fixture["num_anchors"]
    for lab, pos, neg in zip(sampled, fixture["sampled_pos"], fixture["sampled_neg"]):
        assert torch.equal(torch.nonzero(lab == 1).flatten().int(), pos)
        assert torch.equal(torch.nonzero(lab == 0).flatten().int(), neg)
    for k, ref in fixture["losses"].items():
        assert float(losses[k].detach()) == pytest.approx(ref, rel=LOSS_REL), k

    params = {n[len("rpn."):]: p for n, p in task.named_parameters()}
    assert sorted(n for n, p in params.items() if p.requires_grad) == sorted(fixture["requires_grad"])
    assert sorted(n for n, p in params.items() if not p.requires_grad) == sorted(fixture["frozen"])
    for name, ref in fixture["grads_full"].items():
        g = params[name].grad
        assert g is not None, name
        err = float((g - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        assert err < GRAD_REL, (name, err)
    worst = 0.0
    for name, ref in fixture["grad_norms"].items():
        g = params[name].grad
        assert g is not None, name
        worst = max(worst, abs(float(g.double().norm()) - ref) / max(ref, 1e-12))
        ref_sum = fixture["grad_sums"][name]
        # sums cancel: compare them relative to the gradient's L1 mass
        assert abs(float(g.double().sum()) - ref_sum) <= GRAD_REL * float(g.double().abs().sum()) + 1e-12, name
    assert set(fixture["grad_norms"]) == {n for n, p in params.items() if p.grad is not None}
    print(f"\nlosses ours {[round(float(losses[k].detach()), 7) for k in fixture['losses']]} vs "
          f"{[round(v, 7) for v in fixture['losses'].values()]}; worst grad-norm rel diff {worst:.2e}")
    assert worst < GRAD_REL
