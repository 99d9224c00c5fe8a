"""Region-text losses against hand computations (explicit loops over math.exp/log, not torch's loss functions)."""
from __future__ import annotations

import math

import pytest
import torch

from regionclip.engine.pretrain import install_per_parameter_clipping
from regionclip.losses.region_text import (clip_grad_norm_per_parameter_, image_text_contrastive_loss,
                                           region_concept_contrastive_loss, region_concept_distillation_loss,
                                           teacher_pseudo_labels)

T = 0.5  # a mild temperature keeps the hand computations readable; the code path is the same as for 0.01


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    out = []
    for x in a.tolist():
        nx = math.sqrt(sum(v * v for v in x))
        row = []
        for y in b.tolist():
            ny = math.sqrt(sum(v * v for v in y))
            row.append(sum(p * q for p, q in zip(x, y)) / (nx * ny))
        out.append(row)
    return out


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_image_text_contrastive_is_symmetric_cross_entropy():
    img = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 2.0]])
    txt = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.3, 0.0, 1.0]])
    s = [[c / T for c in row] for row in _cos_rows(img, txt)]
    rows = sum(-math.log(_softmax(s[i])[i]) for i in range(3)) / 3
    cols = sum(-math.log(_softmax([s[j][i] for j in range(3)])[i]) for i in range(3)) / 3
    got = image_text_contrastive_loss(img * 7.0, txt, temperature=T, gather=False)  # scale-invariant (cosines)
    assert got.item() == pytest.approx((rows + cols) / 2, rel=1e-5)


def test_image_text_contrastive_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="both be"):
        image_text_contrastive_loss(torch.randn(3, 4), torch.randn(2, 4))


def test_distillation_is_kl_batchmean():
    concepts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    student = torch.tensor([[1.0, 0.2], [-0.5, 1.0]])
    q = torch.tensor([[0.7, 0.1, 0.2], [0.0, 0.6, 0.4]])  # a zero entry contributes 0 (0 log 0 := 0)
    s = [_softmax([c / T for c in row]) for row in _cos_rows(student, concepts)]
    expected = sum(qi * (math.log(qi) - math.log(si)) for qrow, srow in zip(q.tolist(), s)
                   for qi, si in zip(qrow, srow) if qi > 0) / 2
    got = region_concept_distillation_loss(student, concepts * 3.0, q, temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_and_contrastive_of_no_region_are_zero_with_gradient():
    emb = torch.randn(0, 4, requires_grad=True)
    for loss in (region_concept_distillation_loss(emb, torch.randn(3, 4), torch.zeros(0, 3)),
                 region_concept_contrastive_loss(emb, torch.randn(3, 4), torch.zeros(0, dtype=torch.long))):
        assert loss.item() == 0.0 and loss.requires_grad


def test_multi_positive_contrastive_sums_positive_probabilities():
    concepts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    regions = torch.tensor([[1.0, 0.3, 0.0], [0.8, -0.2, 0.4], [0.1, 1.0, 0.2], [0.2, 0.1, 1.0]])
    targets = [0, 0, 1, 0]
    e = concepts[targets]
    m = [[c / T for c in row] for row in _cos_rows(regions, e)]
    expected = 0.0
    for i in range(4):
        p = _softmax(m[i])
        expected += -math.log(sum(p[j] for j in range(4) if targets[j] == targets[i]))
    expected /= 4
    got = region_concept_contrastive_loss(regions, concepts, torch.tensor(targets), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a single positive per row reduces to ordinary cross-entropy over the matrix
    distinct = torch.tensor([0, 1, 2])
    m3 = [[c / T for c in row] for row in _cos_rows(regions[:3], concepts)]
    ce = sum(-math.log(_softmax(m3[i])[i]) for i in range(3)) / 3
    assert region_concept_contrastive_loss(regions[:3], concepts, distinct, T).item() == pytest.approx(ce, rel=1e-5)


def test_pseudo_labels_threshold_and_fallback():
    concepts = torch.eye(3)
    teacher = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    lab = teacher_pseudo_labels(teacher, concepts, temperature=0.01, threshold=0.5)
    # row 1 is uniform (max 1/3 < 0.5): dropped; rows 0 and 2 are confident
    assert lab.keep.tolist() == [True, False, True] and not lab.fallback
    assert lab.targets[[0, 2]].tolist() == [0, 2]
    hand = _softmax([c / 0.01 for c in _cos_rows(teacher[1:2], concepts)[0]])
    assert lab.probs[1].tolist() == pytest.approx(hand, abs=1e-6)
    # nothing passes 0.9 -> the original's fallback keeps every region (max > 0)
    flat = teacher_pseudo_labels(torch.ones(2, 3), concepts, temperature=0.01, threshold=0.9)
    assert flat.fallback and flat.keep.all()
    with pytest.raises(ValueError, match="teacher"):
        teacher_pseudo_labels(torch.ones(2, 4), concepts)


def test_per_parameter_clipping_clips_each_tensor_separately():
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([6.0, 8.0]), torch.tensor([0.0, 0.6, 0.8])  # norms 10 and 1
    norms = clip_grad_norm_per_parameter_([big, small], 5.0)
    assert norms.tolist() == pytest.approx([10.0, 1.0])
    assert big.grad.tolist() == pytest.approx([3.0, 4.0], rel=1e-5)  # scaled to norm 5
    assert small.grad.tolist() == pytest.approx([0.0, 0.6, 0.8])  # untouched (a global clip would shrink it)
    frozen = torch.nn.Parameter(torch.zeros(1))
    assert clip_grad_norm_per_parameter_([frozen], 5.0) is None
    with pytest.raises(ValueError):
        clip_grad_norm_per_parameter_([big], 0.0)


def test_clipping_runs_before_each_optimizer_step():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    install_per_parameter_clipping(opt, 1.0)
    w.grad = torch.tensor([30.0, 40.0])
    opt.step()
    assert w.detach().tolist() == pytest.approx([-0.6, -0.8], rel=1e-5)
