"""Fast R-CNN losses of RegionCLIP's open-vocabulary transfer learning (docs/DESIGN.md#transfer-learning).

All functions are pure: they take logits / deltas / labels and return a scalar tensor. Labels follow the
classifier layout of :func:`regionclip.modeling.heads.text_classifier_logits`: ``0..K-1`` are the (base) classes
and ``K`` (the last logit column) is background.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.box_coder import encode_boxes

__all__ = ["focal_scaled_cross_entropy", "weighted_cross_entropy", "classification_loss", "box_regression_loss",
           "mask_loss"]


def _check_labels(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits [N, K+1] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}] (background = {logits.shape[1] - 1}), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")


def focal_scaled_cross_entropy(logits: Tensor, labels: Tensor, gamma: float = 0.5, bg_weight: float = 0.2) -> Tensor:
    """COCO transfer loss: ``(1/N) Σ_i w_i · CE_i · (1 - p_i)^γ`` (``FOCAL_SCALED_LOSS``, ``BG_CLS_LOSS_WEIGHT``).

    ``p_i`` is the softmax probability of the true class and ``w_i = bg_weight`` for background RoIs, else 1.
    The focal factor is deliberately *not* detached: the original lets the gradient flow through ``p_i``.
    The mean is over all N RoIs (not over the weights), unlike :func:`weighted_cross_entropy`.

    Args:
        logits: [N, K+1] classifier logits, background last.
        labels: [N] int64 in ``0..K``.
    """
    _check_labels(logits, labels)
    if labels.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph (DDP needs every trainable parameter in the graph)
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    ce = lse - z.gather(1, labels[:, None]).squeeze(1)
    # (1 - p)^γ computed as exp(γ · log(1 - p)) with log(1 - p) = logsumexp over the *other* classes - logsumexp:
    # identical value and gradient, but with logits of scale 1/0.01 a confident RoI has p == 1.0 in float32 and
    # the naive pow would backpropagate 0 · inf = NaN.
    is_target = F.one_hot(labels, z.shape[1]).bool()
    log_one_minus_p = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=1) - lse
    focal = torch.exp(gamma * log_one_minus_p)
    w = torch.ones_like(ce)
    w[labels == logits.shape[1] - 1] = bg_weight
    return (w * ce * focal).mean()


def weighted_cross_entropy(logits: Tensor, labels: Tensor, bg_weight: float = 0.8) -> Tensor:
    """LVIS transfer loss: PyTorch's class-weighted CE with weights ``[1, ..., 1, bg_weight]``.

    Normalised by the *sum of the weights* of the N targets (``Σ w_{y_i} CE_i / Σ w_{y_i}``), which is what
    ``F.cross_entropy(weight=...)`` does with ``reduction="mean"``.
    """
    _check_labels(logits, labels)
    if labels.numel() == 0:
        return logits.sum() * 0.0
    weight = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
    weight[-1] = bg_weight
    return F.cross_entropy(logits.float(), labels, weight=weight)


def classification_loss(logits: Tensor, labels: Tensor, *, focal_gamma: Optional[float] = None,
                        bg_weight: Optional[float] = None) -> Tensor:
    """The original's dispatch: focal-scaled (COCO), bg-weighted CE (LVIS), or plain mean CE (neither set)."""
    if focal_gamma is not None:
        return focal_scaled_cross_entropy(logits, labels, focal_gamma, 1.0 if bg_weight is None else bg_weight)
    if bg_weight is not None:
        return weighted_cross_entropy(logits, labels, bg_weight)
    _check_labels(logits, labels)
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def box_regression_loss(pred_deltas: Tensor, proposals: Tensor, gt_boxes: Tensor, labels: Tensor, num_classes: int,
                        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Tensor:
    """Class-agnostic L1 box loss (smooth-L1 with β = 0), summed over foreground RoIs / number of sampled RoIs.

    Args:
        pred_deltas: [N, 4] predicted deltas (``bbox_pred`` on the raw attnpool embedding).
        proposals: [N, 4] XYXY RoI boxes the deltas refer to.
        gt_boxes: [N, 4] XYXY matched GT box per RoI (anything for background RoIs; ignored).
        labels: [N] class labels, ``num_classes`` = background.
        num_classes: K (the background label).
        weights: box-coder weights, detectron2's (10, 10, 5, 5) for the box head.

    The normaliser is N (all sampled RoIs, foreground and background), detectron2's ``"smooth_l1"`` reduction.
    """
    n = labels.shape[0]
    if n == 0:
        return pred_deltas.sum() * 0.0
    fg = (labels >= 0) & (labels < num_classes)
    if not bool(fg.any()):
        return pred_deltas.sum() * 0.0
    targets = encode_boxes(proposals[fg].float(), gt_boxes[fg].float(), weights)
    return F.l1_loss(pred_deltas[fg].float(), targets, reduction="sum") / n


def mask_loss(mask_logits: Tensor, gt_masks: Tensor) -> Tensor:
    """Class-agnostic mask loss: mean per-pixel BCE over the foreground RoIs' [M, M] targets (detectron2).

    Args:
        mask_logits: [F, 1, M, M] (or [F, M, M]) logits of the foreground RoIs.
        gt_masks: [F, M, M] binary targets (the GT mask cropped to each RoI and resized).
    """
    logits = mask_logits[:, 0] if mask_logits.ndim == 4 else mask_logits
    if logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    if logits.shape != gt_masks.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(gt_masks.shape)} differ in shape")
    return F.binary_cross_entropy_with_logits(logits.float(), gt_masks.to(torch.float32), reduction="mean")
