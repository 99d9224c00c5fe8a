"""detectron2 RPN head and test-time proposal selection. docs/DESIGN.md#architecture.6 "d2 RPN inference details".

Only eval behaviour exists: the offline RPN is frozen and in eval mode even while RegionCLIP trains, so the
*test* top-k settings are always the ones used.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from regionclip.ops.box_coder import decode_boxes

from .anchors import anchors_for_features, generate_cell_anchors
from .resnet import Conv2dNorm

__all__ = ["StandardRPNHead", "RPN", "find_top_rpn_proposals"]


class StandardRPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then 1x1 objectness (A ch) and 1x1 anchor deltas (4A ch) on every level.

    Args:
        in_channels: feature width (256 FPN, 1024 C4).
        num_anchors: cell anchors per location (3 FPN, 15 C4).
        num_convs: 1 (keys ``conv.weight/bias``) or more (LSJ: 2, keys ``conv.conv0.*``, ``conv.conv1.*``),
            mirroring detectron2's ``RPN.CONV_DIMS`` = [-1] / [-1, -1].
    """

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        if num_convs == 1:
            self.conv: nn.Module = Conv2dNorm(in_channels, in_channels, 3, padding=1, relu=True)
        else:
            self.conv = nn.Sequential()
            for k in range(num_convs):
                self.conv.add_module(f"conv{k}", Conv2dNorm(in_channels, in_channels, 3, padding=1, relu=True))
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """features: per level [N, C, Hi, Wi] -> (logits [N, A, Hi, Wi], deltas [N, 4A, Hi, Wi]) per level."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def find_top_rpn_proposals(
    proposals: Sequence[Tensor],
    logits: Sequence[Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_size: float = 0.0,
) -> List[Tuple[Tensor, Tensor]]:
    """detectron2 ``find_top_rpn_proposals`` (test mode).

    Per level: sort logits descending, keep the first ``pre_nms_topk``; concatenate levels; per image drop
    non-finite boxes/logits, clip to the image, drop boxes with w or h <= ``min_size``, NMS within each level
    (level id = NMS category, so overlaps *across* levels survive), keep the first ``post_nms_topk``.

    Args:
        proposals: per level [N, Hi*Wi*A, 4] decoded boxes.
        logits: per level [N, Hi*Wi*A] objectness logits.
        image_sizes: per image (h, w) of the unpadded image.

    Returns:
        Per image ``(boxes [R, 4] float32, logits [R])``, sorted by logit, descending.
    """
    num_images = len(image_sizes)
    device = proposals[0].device
    batch_idx = torch.arange(num_images, device=device)
    topk_scores, topk_proposals, level_ids = [], [], []
    for level_id, (proposals_i, logits_i) in enumerate(zip(proposals, logits)):
        k = min(int(logits_i.shape[1]), pre_nms_topk)
        # detectron2 uses sort (not topk); keeping the same op keeps the order of tied logits identical.
        logits_i, idx = logits_i.sort(descending=True, dim=1)
        topk_scores.append(logits_i.narrow(1, 0, k))
        topk_idx = idx.narrow(1, 0, k)
        topk_proposals.append(proposals_i[batch_idx[:, None], topk_idx])
        level_ids.append(torch.full((k,), level_id, dtype=torch.int64, device=device))
    scores_all = torch.cat(topk_scores, dim=1)
    boxes_all = torch.cat(topk_proposals, dim=1)
    levels_all = torch.cat(level_ids, dim=0)

    results: List[Tuple[Tensor, Tensor]] = []
    for n, (h, w) in enumerate(image_sizes):
        boxes, scores, lvl = boxes_all[n], scores_all[n], levels_all
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes = torch.stack((boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h),
                             boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)), dim=-1)
        keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
        if not bool(keep.all()):
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes.float(), scores, lvl, nms_thresh)  # sorted by score, descending
        keep = keep[:post_nms_topk]
        results.append((boxes[keep], scores[keep]))
    return results


class RPN(nn.Module):
    """Region proposal network (``proposal_generator``): head + anchors + decoding + selection.

    Args:
        in_features: names of the backbone features it reads (``p2..p6`` or ``res4``).
        strides: stride of each feature.
        in_channels: their width.
        sizes: anchor sizes per feature (FPN: one per level; C4: all five on the single level).
        aspect_ratios: anchor ratios h/w (0.5, 1, 2).
        anchor_offset: 0.0 (detectron2 default).
        num_convs: head convs (1, or 2 for LSJ).
        nms_thresh, pre_nms_topk, post_nms_topk, min_size: test-time selection (see
            :func:`find_top_rpn_proposals`).
    """

    def __init__(self, in_features: Sequence[str], strides: Sequence[int], in_channels: int,
                 sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float], anchor_offset: float = 0.0,
                 num_convs: int = 1, nms_thresh: float = 0.7, pre_nms_topk: int = 1000,
                 post_nms_topk: int = 1000, min_size: float = 0.0) -> None:
        super().__init__()
        if len(sizes) != len(in_features) or len(strides) != len(in_features):
            raise ValueError("RPN: need one anchor-size list and one stride per input feature")
        self.in_features = list(in_features)
        self.strides = [int(s) for s in strides]
        cells = [generate_cell_anchors(s, aspect_ratios) for s in sizes]
        if len({c.shape[0] for c in cells}) != 1:
            raise ValueError("RPN: every level must have the same number of cell anchors")
        # Non-persistent, like detectron2's cell_anchors: never in checkpoints, but follow .to(device).
        for i, c in enumerate(cells):
            self.register_buffer(f"cell_anchors_{i}", c, persistent=False)
        self.anchor_offset = float(anchor_offset)
        self.rpn_head = StandardRPNHead(in_channels, cells[0].shape[0], num_convs)
        self.nms_thresh = float(nms_thresh)
        self.pre_nms_topk = int(pre_nms_topk)
        self.post_nms_topk = int(post_nms_topk)
        self.min_size = float(min_size)

    @property
    def cell_anchors(self) -> List[Tensor]:
        """Per level [A, 4] anchors centred on (0, 0)."""
        return [getattr(self, f"cell_anchors_{i}") for i in range(len(self.in_features))]

    def forward(self, features: Dict[str, Tensor], image_sizes: Sequence[Tuple[int, int]]
                ) -> List[Tuple[Tensor, Tensor]]:
        """features: name -> [N, C, Hi, Wi]; image_sizes: per image unpadded (h, w).

        Returns:
            per image (boxes [R, 4] float32 XYXY, raw objectness logits [R]), logits descending.
        """
        logits, deltas = self.rpn_head([features[f] for f in self.in_features])
        return self.select_proposals(logits, deltas, image_sizes)

    def select_proposals(self, logits: Sequence[Tensor], deltas: Sequence[Tensor],
                         image_sizes: Sequence[Tuple[int, int]]) -> List[Tuple[Tensor, Tensor]]:
        """Test-time selection from the head's raw outputs (per level logits [N, A, Hi, Wi], deltas
        [N, 4A, Hi, Wi]): anchors, box decoding, top-k + NMS. Shared with the exported-graph backends, whose RPN
        graph stops at the head (regionclip.export.runtime)."""
        grid_sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in logits]
        anchors = anchors_for_features(self.cell_anchors, grid_sizes, self.strides, self.anchor_offset)
        n = int(logits[0].shape[0])
        # [N, A, Hi, Wi] -> [N, Hi*Wi*A]: location-major, anchor-minor, same order as the anchors.
        flat_logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        # [N, 4A, Hi, Wi] -> [N, A, 4, Hi, Wi] -> [N, Hi, Wi, A, 4] -> [N, Hi*Wi*A, 4]
        flat_deltas = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                       for x in deltas]
        proposals = []
        for anchors_i, deltas_i in zip(anchors, flat_deltas):
            anchors_rep = anchors_i.unsqueeze(0).expand(n, -1, -1).reshape(-1, 4)
            proposals.append(decode_boxes(deltas_i.reshape(-1, 4), anchors_rep).view(n, -1, 4))
        return find_top_rpn_proposals(proposals, flat_logits, image_sizes, self.nms_thresh, self.pre_nms_topk,
                                      self.post_nms_topk, self.min_size)
