"""Region recognition on a transformer feature map, as the zero-shot branch's ``CLIPTransformerROIHeads`` (spec §11.2).

RoIAlignV2 on the stride-16 (ViT) / stride-32 (Swin, DaViT, FocalNet) map -> 14x14 bins -> **mean over the bins**
-> the trunk's norm when the map is not normalised yet -> ``image_projection`` [C, D] -> cosine with the
L2-normalised text embeddings x ``exp(logit_scale)`` -> softmax over the K classes. **No background column.**

:class:`TransformerRegionDetector` reuses everything of :class:`~regionclip.modeling.detector.RegionCLIPDetector`
above the region embedding (preprocessing, the optional offline RPN, user boxes, post-processing, rescaling), so
every entry point that accepts a ``RegionCLIPDetector`` accepts it (see
:class:`regionclip.modeling.recognizer.RegionRecognizer`).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ...config import InputConfig, PostprocessConfig
from ..detector import RegionCLIPDetector
from .timm_trunks import TimmTrunk
from .vit import VisionTransformerTrunk

Trunk = Union[VisionTransformerTrunk, TimmTrunk]


def boxes_to_rois(boxes: Sequence[Tensor], like: Tensor) -> Tensor:
    """Per-image [R_i, 4] XYXY boxes -> [sum R_i, 5] RoIs (batch index first) on ``like``'s device/dtype."""
    if not len(boxes):
        return like.new_zeros(0, 5)
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=like.device, dtype=like.dtype),
                                 b.to(like.device, like.dtype).reshape(-1, 4)], dim=1)
                      for i, b in enumerate(boxes)], dim=0)


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
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, eps)


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


class TransformerRegionDetector(RegionCLIPDetector):
    """Zero-shot region recognition/detection with a transformer image tower (no background column).

    Args:
        encoder: :class:`TransformerRegionEncoder`.
        rpn: optional offline RPN (proposal mode); without it, regions are user / GT boxes.
        text_encoder: optional text tower used by :meth:`encode_class_names` (a
            :class:`regionclip.text.unicl.UniCLTextEncoder` for branch checkpoints, a
            :class:`regionclip.modeling.text_encoder.CLIPTextTransformer` for OpenAI / open_clip ViTs).
        logit_scale: initial log of the classifier's scale (the learned scalar is loaded from the checkpoint;
            ``log(1/0.07)`` is CLIP's initial value, 100 = exp(4.605) its trained clamp).
        templates: prompt templates for :meth:`encode_class_names` (default the branch's two).
    Other arguments as :class:`RegionCLIPDetector`.
    """

    has_background = False

    def __init__(self, encoder: TransformerRegionEncoder, rpn: Optional[nn.Module] = None, *,
                 text_encoder: Optional[nn.Module] = None, input_cfg: InputConfig = InputConfig(),
                 postprocess_cfg: PostprocessConfig = PostprocessConfig(), pooler_resolution: int = 14,
                 sampling_ratio: int = 0, region_chunk_size: int = 256, logit_scale: float = math.log(1 / 0.07),
                 templates: Optional[Sequence[str]] = None) -> None:
        super().__init__(encoder, rpn, input_cfg=input_cfg, postprocess_cfg=postprocess_cfg,  # type: ignore[arg-type]
                         pooler_resolution=pooler_resolution, sampling_ratio=sampling_ratio,
                         region_chunk_size=region_chunk_size)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.text_encoder = text_encoder
        from ...text.unicl import ZEROSHOT_BRANCH_TEMPLATES

        self.templates = list(templates) if templates is not None else list(ZEROSHOT_BRANCH_TEMPLATES)

    # ------------------------------------------------------------------ RegionRecognizer
    def compute_res4(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images -> the trunk's map [B, C, H', W'] of the padded batch (name kept from the
        ResNet detector, whose callers use it; :meth:`compute_features` is the interface name)."""
        return self.backbone.forward_dense(self.normalize_batch(images))

    def encode_regions(self, res4: Tensor, boxes: Sequence[Tensor], *, return_res5: bool = False,
                       chunk_size: Optional[int] = None) -> Any:
        """Region embeddings [sum R_i, D] (raw, unnormalised, input order) for per-image [R_i, 4] XYXY boxes in
        resized-image pixels. ``return_res5`` (mask head of the ResNet path) gives ``(emb, None)``."""
        rois = boxes_to_rois(boxes, res4)
        chunk = chunk_size or self.region_chunk_size or max(1, rois.shape[0])
        embs = [self.backbone.project(pool_regions(res4, rois[s:s + chunk], self.backbone.stride,
                                                   self.pooler_resolution, self.sampling_ratio))
                for s in range(0, rois.shape[0], chunk)]
        emb = torch.cat(embs) if embs else res4.new_zeros(0, self.embed_dim)
        return (emb, None) if return_res5 else emb

    def classify(self, region_emb: Tensor, class_embeddings: Optional[Tensor] = None) -> Tensor:
        """[R, D] region embeddings -> [R, K] softmax of ``exp(logit_scale) * cos`` (no background)."""
        emb = self.class_embeddings if class_embeddings is None else class_embeddings.to(region_emb.device)
        if emb.numel() == 0:
            raise ValueError("no vocabulary set: pass class embeddings or call set_vocabulary() "
                             "(CLI: --vocab 'cat,dog' or --concept-emb file.pth)")
        if emb.shape[-1] != region_emb.shape[-1]:
            raise ValueError(f"region embeddings are {region_emb.shape[-1]}-d but class embeddings are "
                             f"{emb.shape[-1]}-d: compute the class embeddings with this checkpoint's text encoder")
        x = F.normalize(region_emb.float(), dim=-1)
        w = F.normalize(emb.float(), dim=-1)
        return F.softmax(self.logit_scale.float().exp() * (x @ w.t()), dim=-1)

    # ------------------------------------------------------------------ vocabulary from names
    @torch.no_grad()
    def encode_class_names(self, names: Sequence[str], templates: Optional[Sequence[str]] = None) -> Tensor:
        """[K, D] class embeddings with this model's text encoder, the branch's way (spec §11.3): each name in
        every template, prompt embeddings L2-normalised, averaged, re-normalised.

        Raises:
            ValueError: the checkpoint carried no text encoder (give a concept-embedding file instead).
        """
        from ...text.unicl import UniCLTextEncoder, branch_class_embeddings, tokenize_like_hf

        enc = self.text_encoder
        if enc is None:
            raise ValueError("this checkpoint has no text encoder, so class names cannot be embedded: pass "
                             "precomputed class embeddings (--concept-emb file.pth, [K, D] rows) instead")
        device = self.device

        def encode(prompts: list[str]) -> Tensor:
            if isinstance(enc, UniCLTextEncoder):
                ids, mask = tokenize_like_hf(prompts)
                return enc.encode_text(ids.to(device), mask.to(device))
            from ...text.tokenizer import default_tokenizer

            return enc.encode_text(default_tokenizer()(prompts, enc.context_length).to(device), normalize=True)

        return branch_class_embeddings(list(names), encode, templates=templates or self.templates).to(device)
