"""Reduced precision users can trust: a 16-bit scan of every region, then float32 for the regions that decide the
detections (docs/DESIGN.md#cpu-speed, "Trusted bfloat16").

Why not bfloat16 by stage alone: the classifier divides cosines by the temperature 0.01, so a region-embedding
direction error of 1e-3 (what any bf16 rounding inside the region head gives) moves the logits by ~0.1 and the
probabilities by ~10 %; with 1000 proposals x K classes competing for 300 detections, enough near-ties sit at the
cut that 4-12 % of the float32 detections change (benchmarks/bf16_stages.py measures every stage on its own). The
margin argument below makes the result float32's wherever the scan's logit error stays below
:data:`SCAN_LOGIT_ERROR`:

A detection's selection score is ``p`` or ``sqrt(p * o)`` (RPN multiplication). If every logit of a region moves by
at most ``d``, its softmax probabilities move by a factor within ``exp(+-2d)``, so its scores by ``exp(+-2d * k)``
(``k`` = 1, or 1/2 with RPN multiplication). Let ``c`` be the scan's cut (the lowest reported score when an image
reports the maximum number of detections, else the score threshold); float32's cut is within ``exp(+-2dk)`` of it.
So with ``m = 4dk``, a (region, class) pair whose scan score is below ``c * exp(-m)`` is reported by neither, and one
above ``c * exp(m)`` by both (class-wise NMS aside: if the order of two overlapping boxes of one class swaps, the
other box is kept, which is the same class at IoU >= 0.5). Only regions with a pair inside the band can change
what is reported: those are encoded again in float32 and their scan results replaced. The reported classes and
boxes then match float32's (same class at IoU >= 0.5; scores of pairs above the band keep the scan's ~1 % error) -
measured, not assumed: benchmarks/bf16_stages.py.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..config import PostprocessConfig
from .postprocess import combine_rpn_scores, postprocess_detections

# Bound on |logit(bf16 scan) - logit(float32)| the margin assumes, after the 1/0.01 temperature. Measured on the
# seed-0 random RN50 checkpoint, demo images, 1000 proposals each (benchmarks/bf16_stages.py): layer4 in bf16 on a
# float32 res4 map: max 0.12 (median ~0.02); ~3x headroom.
SCAN_LOGIT_ERROR = 0.35

__all__ = ["SCAN_LOGIT_ERROR", "decisive_regions", "refine_in_float32"]


def decisive_regions(scores: Tensor, boxes: Tensor, resized_hw: tuple[int, int], cfg: PostprocessConfig, *,
                     has_background: bool, score_power: float, logit_error: float = SCAN_LOGIT_ERROR) -> Tensor:
    """[R] bool: the regions of one image whose float32 result could change what is reported (a class score in
    the band around the cut, see the module docstring).

    Args:
        scores: [R, K(+1)] selection scores of the 16-bit scan (after RPN multiplication).
        boxes: [R, 4] the boxes the scores belong to (resized frame).
        score_power: how a score scales with the probability: 1 (``p``) or 0.5 (``sqrt(p * o)``).
        logit_error: the bound on the scan's logit error the margin assumes.
    """
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    # the cut of the scan: its lowest selected score when the image is full, else the threshold (selection scores:
    # with report_unmultiplied_scores the reported ones are not what was selected on)
    dets = postprocess_detections(boxes, scores, resized_hw, replace(cfg, report_unmultiplied_scores=False),
                                  has_background=has_background)
    full = 0 <= cfg.detections_per_image <= len(dets["scores"])
    cut = float(dets["scores"].min()) if full and len(dets["scores"]) else cfg.score_thresh
    fg = torch.nan_to_num((scores[:, :-1] if has_background else scores).float(), nan=-math.inf)
    # both the scan and float32 may be off by the bound, each side: 2 x 2d in log-probability
    m = 4.0 * logit_error * score_power
    return ((fg > cut * math.exp(-m)) & (fg < cut * math.exp(m))).any(dim=1)


@torch.no_grad()
def refine_in_float32(model: Any, features: Tensor, boxes: Sequence[Tensor], logits: Sequence[Optional[Tensor]],
                      emb: Tensor, probs: Tensor, class_embeddings: Tensor, cfg: PostprocessConfig,
                      resized_hws: Sequence[tuple[int, int]], chunk_size: int) -> tuple[Tensor, Tensor, int]:
    """Replace the 16-bit scan's embeddings and probabilities of the decisive regions by float32 ones.

    Args:
        model: the recognizer (``encode_regions`` / ``classify`` / ``has_background``).
        features: the float32 feature map the scan pooled from (the trunk stays float32: see modeling.detector.BF16_STAGES).
        boxes / logits: per image, the encoded regions' boxes and RPN logits (None: user boxes).
        emb, probs: [sum R_i, D] / [sum R_i, K(+1)] of the scan, in region order.
    Returns (embeddings, probabilities, number of regions encoded again).
    """
    has_bg = bool(model.has_background)
    picks, start = [], 0
    for b, lg, hw in zip(boxes, logits, resized_hws):
        n = len(b)
        sel = combine_rpn_scores(probs[start:start + n], lg, cfg.rpn_score if lg is not None else "none")
        power = 0.5 if (lg is not None and cfg.rpn_score != "none") else 1.0
        picks.append(decisive_regions(sel, b.to(sel.device), hw, cfg, has_background=has_bg,
                                      score_power=power).nonzero().flatten() + start)
        start += n
    rows = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
    if rows.numel() == 0:
        return emb, probs, 0
    all_boxes = torch.cat([b.to(features.device).float().reshape(-1, 4) for b in boxes])
    image_of = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
    sub_boxes = [all_boxes[rows[image_of[rows] == i]] for i in range(len(boxes))]
    with torch.autocast(device_type=features.device.type, enabled=False):
        exact, _ = model.encode_regions(features.float(), sub_boxes, chunk_size=chunk_size)
        # sub_boxes lists image by image, in the same order as rows (rows are sorted within and across images)
        exact_probs = model.classify(exact.float(), class_embeddings)
    emb, probs = emb.clone(), probs.clone()
    emb[rows] = exact.float().to(emb.dtype)
    probs[rows] = exact_probs.to(probs.dtype)
    return emb, probs, int(rows.numel())
