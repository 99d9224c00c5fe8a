"""RoI matching and foreground/background sampling of detectron2's ``ROIHeads`` (docs/DESIGN.md#transfer-learning), as pure functions.

Proposals (offline RPN, test-mode top-k) get the GT boxes appended, are matched to GT at IoU 0.5 without
low-quality matches, and ``batch_size_per_image`` of them are sampled with at most ``positive_fraction``
foreground (detectron2 ``subsample_labels``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..ops.sampling import subsample_labels

__all__ = ["SampledRoIs", "match_proposals", "subsample_labels", "sample_rois"]


@dataclass
class SampledRoIs:
    """The RoIs of one image chosen for the loss.

    ``boxes`` [S, 4] XYXY (resized-image pixels); ``labels`` [S] in ``0..K`` (K = background);
    ``gt_index`` [S] index of the matched GT box (meaningless for background: 0); ``gt_boxes`` [S, 4] the matched
    GT boxes (the RoI itself for background, so box encodings stay finite); ``index`` [S] position of each RoI
    among the candidates ``[proposals; appended GT boxes]`` (detectron2's ``sampled_idxs``).
    """

    boxes: Tensor
    labels: Tensor
    gt_index: Tensor
    gt_boxes: Tensor
    index: Tensor

    def fg_mask(self, num_classes: int) -> Tensor:
        """[S] bool: foreground RoIs (label below the background label ``num_classes``)."""
        return self.labels < num_classes


def match_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int,
                    iou_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Label each proposal with the class of its highest-IoU GT box, or background below ``iou_threshold``.

    Returns ``(labels [P] in 0..K, matched_gt [P])`` (detectron2 ``Matcher([0.5], [0, 1])``: IoU exactly at the
    threshold is foreground; ties go to the first GT box, as ``max`` does; an image without GT is all background).
    """
    p = proposals.shape[0]
    if gt_boxes.shape[0] == 0 or p == 0:
        return (torch.full((p,), num_classes, dtype=torch.int64, device=proposals.device),
                torch.zeros(p, dtype=torch.int64, device=proposals.device))
    iou = box_iou(gt_boxes.float(), proposals.float())  # [G, P]
    best, matched = iou.max(dim=0)
    labels = gt_labels.to(torch.int64)[matched].clone()
    labels[best < iou_threshold] = num_classes
    return labels, matched


def sample_rois(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int, *,
                batch_size_per_image: int = 512, positive_fraction: float = 0.25, iou_threshold: float = 0.5,
                append_gt: bool = True, generator: Optional[torch.Generator] = None) -> SampledRoIs:
    """Append GT to the proposals, match, and sample (detectron2 ``label_and_sample_proposals``).

    Args:
        proposals: [P, 4] XYXY proposals of one image (resized-image pixels).
        gt_boxes: [G, 4] XYXY GT boxes in the same frame; gt_labels: [G] in ``0..K-1``.
        num_classes: K; background label is K.
    Returns the sampled RoIs, foreground first (the order detectron2 concatenates them).
    """
    boxes = torch.cat([proposals.float(), gt_boxes.float().to(proposals.device)]) if append_gt else proposals.float()
    labels, matched = match_proposals(boxes, gt_boxes.to(boxes.device), gt_labels.to(boxes.device), num_classes,
                                      iou_threshold)
    pos, neg = subsample_labels(labels, batch_size_per_image, positive_fraction, num_classes, generator)
    idx = torch.cat([pos, neg])
    sel_labels, sel_matched, sel_boxes = labels[idx], matched[idx], boxes[idx]
    if gt_boxes.shape[0]:
        sel_gt = gt_boxes.float().to(boxes.device)[sel_matched]
        sel_gt = torch.where((sel_labels < num_classes)[:, None], sel_gt, sel_boxes)
    else:
        sel_gt = sel_boxes.clone()
    return SampledRoIs(sel_boxes, sel_labels, sel_matched, sel_gt, idx)
