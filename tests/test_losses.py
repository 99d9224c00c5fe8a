"""Transfer-learning losses against hand-computed values (spec §8.3-8.4, §1.7)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regionclip.losses import (box_regression_loss, classification_loss, focal_scaled_cross_entropy, mask_loss,
                               weighted_cross_entropy)
from regionclip.ops.box_coder import encode_boxes


def _softmax_row(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_focal_scaled_ce_matches_hand_computation() -> None:
    # 2 classes + background (index 2); one fg RoI, one bg RoI
    z = [[2.0, 0.5, 0.0], [0.3, -0.2, 0.0]]
    labels = [0, 2]
    expected = 0.0
    for row, y in zip(z, labels):
        p = _softmax_row(row)[y]
        w = 0.2 if y == 2 else 1.0
        expected += w * (-math.log(p)) * (1 - p) ** 0.5
    expected /= 2  # mean over all RoIs, not over the weights
    got = focal_scaled_cross_entropy(torch.tensor(z), torch.tensor(labels), gamma=0.5, bg_weight=0.2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_factor_is_not_detached() -> None:
    """Gradient must equal that of the naive formula where the focal factor stays in the graph."""
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    a = z.clone().requires_grad_(True)
    focal_scaled_cross_entropy(a, labels, gamma=0.5, bg_weight=0.2).backward()

    b = z.clone().requires_grad_(True)
    p = F.softmax(b, 1)[torch.arange(6), labels]
    w = torch.where(labels == 3, 0.2, 1.0).double()
    (w * F.cross_entropy(b, labels, reduction="none") * (1 - p) ** 0.5).mean().backward()

    c = z.clone().requires_grad_(True)  # the detached variant must give a different gradient
    pd = F.softmax(c, 1)[torch.arange(6), labels].detach()
    (w * F.cross_entropy(c, labels, reduction="none") * (1 - pd) ** 0.5).mean().backward()

    # our loss computes in float32 internally
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert (a.grad - c.grad).abs().max() > 1e-3


def test_focal_loss_gradient_finite_for_saturated_logits() -> None:
    # logits of scale 1/0.01: p == 1.0 in float32, where a naive (1 - p) ** 0.5 backpropagates NaN
    z = torch.tensor([[100.0, -100.0, 0.0]], requires_grad=True)
    loss = focal_scaled_cross_entropy(z, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss)


def test_weighted_ce_normalised_by_weight_sum() -> None:
    z = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 0.0]]
    labels = [0, 2, 2]
    ws = [1.0, 0.8, 0.8]
    ce = [-math.log(_softmax_row(r)[y]) for r, y in zip(z, labels)]
    expected = sum(w * c for w, c in zip(ws, ce)) / sum(ws)
    got = weighted_cross_entropy(torch.tensor(z), torch.tensor(labels), bg_weight=0.8)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # differs from the mean-normalised version whenever a background RoI is present
    assert got.item() != pytest.approx(sum(w * c for w, c in zip(ws, ce)) / 3, rel=1e-3)


def test_classification_loss_dispatch() -> None:
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 3, 3, 2])
    assert classification_loss(z, y, focal_gamma=0.5, bg_weight=0.2) == focal_scaled_cross_entropy(z, y, 0.5, 0.2)
    assert classification_loss(z, y, bg_weight=0.8) == weighted_cross_entropy(z, y, 0.8)
    assert classification_loss(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())
    with pytest.raises(ValueError, match="labels must lie"):
        classification_loss(z, torch.tensor([0, 1, 4, 3, 2]))


def test_box_loss_l1_sum_over_fg_divided_by_all_rois() -> None:
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 12.0], [4.0, 5.0, 24.0, 17.0], [0.0, 0.0, 4.0, 4.0]])
    labels = torch.tensor([0, 1, 2])  # K = 2: the third RoI is background and does not count
    deltas = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    # hand-computed targets with weights (10, 10, 5, 5)
    t0 = [10 * (6 - 5) / 10, 10 * (6.5 - 5) / 10, 5 * math.log(10 / 10), 5 * math.log(11 / 10)]
    t1 = [10 * (14 - 15) / 20, 10 * (11 - 10) / 10, 5 * math.log(20 / 20), 5 * math.log(12 / 10)]
    l1 = sum(abs(d - t) for d, t in zip([0.1, -0.2, 0.3, 0.0], t0)) + sum(abs(t) for t in t1)
    got = box_regression_loss(deltas, proposals, gt, labels, num_classes=2)
    assert got.item() == pytest.approx(l1 / 3, rel=1e-5)
    torch.testing.assert_close(encode_boxes(proposals[:1], gt[:1], (10, 10, 5, 5))[0], torch.tensor(t0))


def test_box_loss_without_foreground_is_zero_and_connected() -> None:
    deltas = torch.randn(4, 4, requires_grad=True)
    loss = box_regression_loss(deltas, torch.rand(4, 4), torch.rand(4, 4), torch.full((4,), 3), num_classes=3)
    loss.backward()
    assert loss.item() == 0.0 and deltas.grad is not None


def test_mask_loss_mean_bce() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = -(math.log(sig(2)) + math.log(1 - sig(-1)) + math.log(sig(0)) + math.log(1 - sig(3))) / 4
    assert mask_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert mask_loss(torch.zeros(0, 1, 2, 2), torch.zeros(0, 2, 2)).item() == 0.0
