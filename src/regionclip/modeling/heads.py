"""Region heads: the text-embedding classifier, class-agnostic box regression, class-agnostic mask head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def text_classifier_logits(region_emb: Tensor, class_embeddings: Tensor, temperature: float = 0.01) -> Tensor:
    """RegionCLIP's classifier (docs/DESIGN.md#classifier): ``[cos(x, t_1..t_K), 0] / T``.

    Args:
        region_emb: [R, D] raw attnpool embeddings (normalized here).
        class_embeddings: [K, D] text embeddings, any norm (rows are normalized here, so stored norms never matter).
        temperature: 0.01 in every released config (``MODEL.CLIP.CLSS_TEMP``).

    Returns [R, K+1] logits, background last. The background "embedding" of the original is a frozen zero
    vector, so its logit is exactly 0 — nothing about background is learned.
    """
    if region_emb.shape[-1] != class_embeddings.shape[-1]:
        raise ValueError(f"region embeddings are {region_emb.shape[-1]}-d but class embeddings are "
                         f"{class_embeddings.shape[-1]}-d: the concept-embedding file was made with another CLIP model "
                         "(1024-d = RN50, 640-d = RN50x4)")
    x = F.normalize(region_emb, p=2.0, dim=1)
    w = F.normalize(class_embeddings.to(x.dtype), p=2.0, dim=1)
    cls = x @ w.t()
    bg = torch.zeros(cls.shape[0], 1, dtype=cls.dtype, device=cls.device)
    return torch.cat([cls, bg], dim=1) / temperature


class MaskHead(nn.Module):
    """LVIS fine-tuned class-agnostic mask head on the res5 RoI map (docs/DESIGN.md#mask-head): deconv 2x + ReLU + 1x1."""

    def __init__(self, in_channels: int, conv_dim: int = 256) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, 1)
        assert self.deconv.bias is not None and self.predictor.bias is not None  # both built with bias=True
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, res5: Tensor) -> Tensor:
        """res5: [N, C, S, S] -> mask logits [N, 1, 2S, 2S]."""
        return self.predictor(F.relu(self.deconv(res5)))


def paste_masks(mask_logits: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """Paste [N, 1, M, M] mask logits into [N, H, W] bool image masks at ``boxes`` (XYXY, image pixels).

    Bilinear resampling of the probability map inside each box (detectron2 ``paste_masks_in_image``
    semantics via ``grid_sample``), thresholded at ``threshold``.
    """
    n = mask_logits.shape[0]
    if n == 0:
        return torch.zeros(0, height, width, dtype=torch.bool, device=mask_logits.device)
    probs = mask_logits.sigmoid()
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.float().unbind(1)
    gy = (ys[None, :] - y0[:, None]) / (y1 - y0)[:, None] * 2 - 1  # [N, H]
    gx = (xs[None, :] - x0[:, None]) / (x1 - x0)[:, None] * 2 - 1  # [N, W]
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], dim=3)
    pasted = F.grid_sample(probs.float(), grid, align_corners=False)[:, 0]
    return pasted >= threshold
