"""Turning per-region class probabilities into detections, exactly as the original
(docs/DESIGN.md#post-processing)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import PostprocessConfig
from ..ops.boxes import classwise_nms, clip_boxes, nonempty, scale_boxes, soft_nms


def combine_rpn_scores(probs: Tensor, objectness_logits: Optional[Tensor], mode: str) -> Tensor:
    """Apply ``MULTIPLY_RPN_SCORE``.

    ``mode="raw"`` is the original's behaviour: ``sqrt(p * logit)`` with the *raw* objectness logit, so a
    negative logit gives NaN (the proposal is then dropped by the finite filter) and scores can exceed 1.
    ``"sigmoid"`` uses ``sigmoid(logit)`` instead (what was probably meant; not faithful). ``"none"``: unchanged.
    """
    if mode == "none":
        return probs
    if objectness_logits is None:
        raise ValueError("RPN score multiplication needs RPN proposals (objectness logits); it is not available for "
                         "user/GT boxes — set rpn_score='none' (the GT presets do)")
    o = objectness_logits.to(probs.dtype)
    if mode == "raw":
        return (probs * o[:, None]) ** 0.5
    if mode == "sigmoid":
        return (probs * o.sigmoid()[:, None]) ** 0.5
    raise ValueError(f"rpn_score must be 'none', 'raw' or 'sigmoid', got {mode!r}")


def reachable_by_rpn_score(objectness_logits: Tensor, score_thresh: float) -> Tensor:
    """[R] bool: proposals whose ``"raw"``-multiplied score ``sqrt(p * logit)`` can still exceed ``score_thresh``.

    ``p <= 1`` (a softmax probability), so ``sqrt(p * logit) <= sqrt(logit)``; the threshold is strict (``>``),
    so a proposal with ``sqrt(logit) <= score_thresh`` (negative logits give NaN) is never reported, whatever its
    region embedding. Computed with the same float32 ``** 0.5`` as :func:`combine_rpn_scores` (monotone rounding:
    ``fl(p * o) <= o``), so skipping these proposals gives identical detections (docs/DESIGN.md#work-skipping).
    """
    return objectness_logits.float() ** 0.5 > score_thresh


def postprocess_detections(boxes: Tensor, scores: Tensor, resized_hw: tuple[int, int], cfg: PostprocessConfig,
                           probs: Optional[Tensor] = None, has_background: bool = True) -> dict[str, Tensor]:
    """Per-image selection: finite filter, drop background, clip, threshold, class-wise (soft-)NMS, top-k.

    Args:
        boxes: [R, 4] predicted boxes (one class-agnostic box per region), resized-image pixels.
        scores: [R, K+1] scores (background last), after optional RPN multiplication; [R, K] when
            ``has_background`` is False (the zero-shot branch's transformer classifier, docs/DESIGN.md#zero-shot-branch).
        resized_hw: (H, W) of the resized image, for clipping.
        probs: [R, K+1] probabilities before RPN multiplication (used for ``report_unmultiplied_scores``).
        has_background: whether the last score column is background (dropped before selection).

    Returns dict with ``boxes`` [N,4] (resized frame), ``scores`` [N], ``labels`` [N], ``region_index`` [N].
    """
    region_index = torch.arange(boxes.shape[0], device=boxes.device)
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not bool(valid.all()):
        boxes, scores, region_index = boxes[valid], scores[valid], region_index[valid]
    if has_background:
        scores = scores[:, :-1]
    boxes = clip_boxes(boxes, resized_hw[0], resized_hw[1])
    filter_mask = scores > cfg.score_thresh  # strict >, as the original
    filter_inds = filter_mask.nonzero()
    cand_boxes = boxes[filter_inds[:, 0]]
    cand_scores = scores[filter_mask]
    labels = filter_inds[:, 1]
    if cfg.soft_nms:
        keep, decayed = soft_nms(cand_boxes, cand_scores, labels, cfg.soft_nms, cfg.soft_nms_sigma,
                                 cfg.nms_thresh, cfg.soft_nms_prune)
        keep = keep.to(boxes.device)
        cand_scores = cand_scores.clone()
        cand_scores[keep] = decayed.to(cand_scores)
    else:
        keep = classwise_nms(cand_boxes, cand_scores, labels, cfg.nms_thresh)
    if cfg.detections_per_image >= 0:
        keep = keep[: cfg.detections_per_image]
    out_scores = cand_scores[keep]
    rows = region_index[filter_inds[keep, 0]]
    if cfg.report_unmultiplied_scores and not cfg.soft_nms and probs is not None:
        out_scores = probs[rows, labels[keep]]
    return {"boxes": cand_boxes[keep], "scores": out_scores, "labels": labels[keep], "region_index": rows}


def rescale_to_original(dets: dict[str, Tensor], resized_hw: tuple[int, int],
                        original_hw: tuple[int, int]) -> dict[str, Tensor]:
    """detectron2 ``detector_postprocess``: scale to the original size, clip, drop empty boxes."""
    sy = original_hw[0] / resized_hw[0]
    sx = original_hw[1] / resized_hw[1]
    boxes = clip_boxes(scale_boxes(dets["boxes"], sx, sy), original_hw[0], original_hw[1])
    keep = nonempty(boxes)
    out = {k: v[keep] for k, v in dets.items() if isinstance(v, Tensor) and v.shape[:1] == keep.shape}
    out["boxes"] = boxes[keep]
    out["keep"] = keep  # which input detections survived (to filter per-detection extras such as masks)
    return out
