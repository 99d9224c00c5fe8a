"""Region recognition on a transformer feature map, as the zero-shot branch's ``CLIPTransformerROIHeads`` (docs/DESIGN.md#zero-shot-branch).

RoIAlignV2 on the stride-16 (ViT) / stride-32 (Swin, DaViT, FocalNet) map -> 14x14 bins -> **mean over the bins**
-> the trunk's norm when the map is not normalised yet -> ``image_projection`` [C, D] -> cosine with the
L2-normalised text embeddings x ``exp(logit_scale)`` -> softmax over the K classes. **No background column.**

:class:`TransformerRegionDetector` implements the same
:class:`regionclip.modeling.recognizer.RegionRecognizer` interface as the CLIP-ResNet detector, so the one
pipeline (:mod:`regionclip.pipeline`) drives both.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ...config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from ...structures import Proposals
from ..detector import RegionOutputs, boxes_to_rois, forward_regions, normalize_and_pad, run_rpn
from .timm_trunks import TimmTrunk
from .vit import VisionTransformerTrunk

Trunk = Union[VisionTransformerTrunk, TimmTrunk]


def pool_regions(feature_map: Tensor, rois: Tensor, stride: int, output_size: int = 14,
                 sampling_ratio: int = 0) -> Tensor:
    """RoIAlignV2 (``aligned=True``) at ``1/stride``, then the mean over the ``output_size``^2 bins.

    Args:
        feature_map: [B, C, H, W].
        rois: [R, 5] (batch index, x1, y1, x2, y2) in input pixels.
    Returns [R, C].
    """
    pooled = roi_align(feature_map, rois, output_size=output_size, spatial_scale=1.0 / stride,
                       sampling_ratio=sampling_ratio, aligned=True)
    return pooled.mean(dim=(2, 3))


def apply_layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """Apply a LayerNorm-like module (``nn.LayerNorm`` or timm's ``LayerNorm2d``) over the last dim of [R, C]."""
    eps = float(getattr(norm, "eps", 1e-5))
    weight, bias = norm.weight, norm.bias
    if isinstance(weight, nn.Module) or isinstance(bias, nn.Module):
        raise TypeError(f"{type(norm).__name__}: weight and bias must be tensors (or None) to be applied as a "
                        "LayerNorm, found submodules")
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class TransformerRegionEncoder(nn.Module):
    """Trunk + region pooling + ``image_projection``: the detector's ``backbone`` for the transformer path.

    Keys: ``trunk.*`` (the ViT or timm model) and ``image_projection`` [C, D].
    """

    def __init__(self, trunk: Trunk, embed_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        c = trunk.num_channels
        self.image_projection = nn.Parameter(torch.randn(c, embed_dim) * c ** -0.5)

    @property
    def output_dim(self) -> int:
        return int(self.image_projection.shape[1])

    @property
    def stride(self) -> int:
        return int(self.trunk.stride)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> [B, C, H', W'] map at ``stride``."""
        return self.trunk.forward_dense(x)

    def project(self, pooled: Tensor) -> Tensor:
        """Mean-pooled region features [R, C] -> raw (unnormalised) region embeddings [R, D]."""
        norm = self.trunk.region_norm
        if norm is not None:
            pooled = apply_layer_norm(norm, pooled)
        return pooled @ self.image_projection.to(pooled.dtype)


class TransformerRegionDetector(nn.Module):
    """Zero-shot region recognition/detection with a transformer image tower (no background column).

    Implements :class:`regionclip.modeling.recognizer.RegionRecognizer` next to the CLIP-ResNet detector (no
    inheritance; the pipeline drives both the same way).

    The checkpoint's text tower is not part of the detector (as for the CLIP-ResNet one): the factory builds it
    from the file when names are embedded (:func:`regionclip.factory.load_text_tower`).

    Args:
        encoder: :class:`TransformerRegionEncoder` (keys ``backbone.*``).
        rpn: optional offline RPN (proposal mode); without it, regions are user / GT boxes.
        logit_scale: initial log of the classifier's scale (the learned scalar is loaded from the checkpoint;
            ``log(1/0.07)`` is CLIP's initial value, 100 = exp(4.605) its trained clamp).
    """

    has_background = False
    bbox_pred = None  # the zero-shot branch has no box regression and no mask head
    mask_head = None
    # non-persistent buffers registered in __init__, declared for typing ([3, 1, 1] each)
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, encoder: TransformerRegionEncoder, rpn: Optional[nn.Module] = None, *,
                 pooler_resolution: int = 14, sampling_ratio: int = 0,
                 logit_scale: float = math.log(1 / 0.07),
                 pixel_mean: Sequence[float] = CLIP_PIXEL_MEAN, pixel_std: Sequence[float] = CLIP_PIXEL_STD) -> None:
        super().__init__()
        self.backbone = encoder
        self.rpn = rpn
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.backbone.output_dim

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, images: Tensor, class_embeddings: Tensor, rois: Optional[Tensor] = None,
                image_sizes: Optional[Tensor] = None, *, chunk_size: int) -> RegionOutputs:
        """The whole model on one batch, as :meth:`regionclip.modeling.detector.RegionCLIPDetector.forward` (same
        inputs and :class:`~regionclip.modeling.detector.RegionOutputs`; ``class_probs`` [R, K], no background)."""
        return forward_regions(self, images, class_embeddings, rois, image_sizes, chunk_size)

    # ------------------------------------------------------------------ RegionRecognizer
    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images -> the trunk's map [B, C, H', W'] of the padded batch."""
        return self.trunk_features(normalize_and_pad(images, self.pixel_mean, self.pixel_std))

    def trunk_features(self, batch: Tensor) -> Tensor:
        """A CLIP-normalised padded batch [B, 3, H, W] -> the trunk's map (the trunk of :meth:`compute_features`)."""
        return self.backbone.forward_dense(batch)

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]:
        return run_rpn(self.rpn, images, self.device)

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int,
                       return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Region embeddings [sum R_i, D] (raw, unnormalised, input order) for per-image [R_i, 4] XYXY boxes in
        resized-image pixels; no res5 maps on this path (second element None)."""
        # RoIs in float32 always: 16-bit box coordinates would move by up to several pixels
        return self.encode_rois(features, boxes_to_rois(boxes, features.new_zeros((), dtype=torch.float32)),
                                chunk_size=chunk_size)

    def encode_rois(self, features: Tensor, rois: Tensor, *, chunk_size: int,
                    return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """:meth:`encode_regions` for [R, 5] RoIs (batch index, x1, y1, x2, y2) instead of per-image boxes."""
        pool_in = features if features.dtype == torch.float32 else features.float()  # the pooled map: float32
        rois = rois.to(pool_in.device, pool_in.dtype)
        chunk = max(1, int(chunk_size))
        embs = [self.backbone.project(pool_regions(pool_in, rois[s:s + chunk], self.backbone.stride,
                                                   self.pooler_resolution, self.sampling_ratio).to(features.dtype))
                for s in range(0, rois.shape[0], chunk)]
        emb = torch.cat(embs) if embs else features.new_zeros(0, self.embed_dim)
        return emb, None

    def classify(self, region_emb: Tensor, class_embeddings: Tensor) -> Tensor:
        """[R, D] region embeddings -> [R, K] softmax of ``exp(logit_scale) * cos`` (no background)."""
        emb = class_embeddings.to(region_emb.device)
        if emb.shape[-1] != region_emb.shape[-1]:
            raise ValueError(f"region embeddings are {region_emb.shape[-1]}-d but class embeddings are "
                             f"{emb.shape[-1]}-d: compute the class embeddings with this checkpoint's text encoder")
        with torch.autocast(device_type=region_emb.device.type, enabled=False):
            x = F.normalize(region_emb.float(), dim=-1)
            w = F.normalize(emb.float(), dim=-1)
            return F.softmax(self.logit_scale.float().exp() * (x @ w.t()), dim=-1)

    def predict_boxes(self, region_emb: Tensor, proposal_boxes: Tensor) -> Tensor:
        return proposal_boxes

    def predict_masks(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int) -> list[Tensor]:
        raise RuntimeError("transformer region detectors have no mask head")
