"""RegionCLIP detector, a pure model: CLIP res4 once per image, every region through RoIAlign -> CLIP res5 ->
attnpool, and the text-embedding classifier.

It works on tensors only (docs/DESIGN.md#model-boundary): uint8 resized images in, res4 maps, proposals, region
embeddings and class probabilities out. Image decoding, vocabularies, the compute dtype, chunk sizes and
post-processing belong to :mod:`regionclip.pipeline`, which passes them per call; nothing here changes between
calls.

Composition (docs/DESIGN.md#architecture): ``backbone`` (CLIP ModifiedResNet, frozen BN), optional ``rpn``
(offline detectron2 RPN, localization only), optional ``bbox_pred`` (class-agnostic regression of fine-tuned
checkpoints), optional ``mask_head`` (LVIS fine-tuned).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from ..ops.box_coder import decode_boxes
from ..inference.hardware import BF16_STAGES
from ..structures import Proposals
from .clip_resnet import ModifiedResNet
from .heads import MaskHead, text_classifier_logits

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # detectron2 ROI_BOX_HEAD.BBOX_REG_WEIGHTS
RES4_STRIDE = 16  # declared res4 stride: RoIAlign always uses exactly 1/16 even though res4 is floor-divided


def run_rpn(rpn: Optional[nn.Module], images: Sequence[Tensor], device: torch.device) -> list[Proposals]:
    """A recognizer's ``propose``: the offline RPN on uint8 resized images, in float32 on ``device`` (its boxes
    must stay exact; it has its own BGR / caffe-mean preprocessing). Shared by both recognizers."""
    if rpn is None:
        raise RuntimeError("this model has no region proposal network: pass boxes (GT/user-box mode), or load "
                           "RPN weights (e.g. --rpn-weights rpn_lvis_866.pth)")
    return rpn([x.to(device).float() for x in images])


def normalize_and_pad(images: Sequence[Tensor], mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [3, h_i, w_i] images -> CLIP-normalised float batch [B, 3, H, W] (/255, -mean, /std), zero padded at
    the bottom/right to the largest size, as the original's ImageList (docs/DESIGN.md#preprocessing)."""
    normed = [((x.to(mean.device).float() / 255.0) - mean) / std for x in images]
    h = max(x.shape[1] for x in normed)
    w = max(x.shape[2] for x in normed)
    batch = normed[0].new_zeros(len(normed), 3, h, w)
    for i, x in enumerate(normed):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch


def boxes_to_rois(boxes: Sequence[Tensor], like: Tensor) -> Tensor:
    """Per-image [R_i, 4] XYXY boxes -> [sum R_i, 5] RoIs (batch index first) on ``like``'s device/dtype."""
    if not len(boxes):
        return like.new_zeros(0, 5)
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=like.device, dtype=like.dtype),
                                 b.to(like.device, like.dtype).reshape(-1, 4)], dim=1)
                      for i, b in enumerate(boxes)], dim=0)


def _autocast_on(device: torch.device) -> bool:
    """Whether an autocast region is active for ``device`` (False for device types autocast does not know: meta)."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except RuntimeError:
        return False


def _stage_autocast(stage: str, device: torch.device) -> AbstractContextManager:
    """Inside a 16-bit autocast region, turn autocast off for ``stage`` unless it is one of
    :data:`regionclip.inference.hardware.BF16_STAGES` (mixed precision by stage); a no-op outside autocast."""
    if stage in BF16_STAGES or not _autocast_on(device):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class RegionCLIPDetector(nn.Module):
    """The CLIP-ResNet region detector. Implements :class:`regionclip.modeling.recognizer.RegionRecognizer`."""

    has_background = True  # classify() returns [R, K+1], background last
    # non-persistent buffers registered in __init__, declared for typing ([3, 1, 1] each)
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, backbone: ModifiedResNet, rpn: Optional[nn.Module] = None, *,
                 bbox_pred: Optional[nn.Linear] = None, mask_head: Optional[MaskHead] = None,
                 pooler_resolution: int = 14, sampling_ratio: int = 0, temperature: float = 0.01,
                 pixel_mean: Sequence[float] = CLIP_PIXEL_MEAN, pixel_std: Sequence[float] = CLIP_PIXEL_STD) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.bbox_pred = bbox_pred
        self.mask_head = mask_head
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.temperature = temperature
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.backbone.output_dim

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ stages (tensors only)
    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images [3, h_i, w_i] -> res4 map [B, C4, ~H/16, ~W/16] of the padded batch.

        Under a 16-bit autocast the trunk runs in it only if "trunk" is in :data:`regionclip.inference.hardware.BF16_STAGES`
        (it is not: a bf16 res4 map alone moves the classifier logits by ~0.1, and the float32 refinement of
        :mod:`regionclip.inference.precision` needs the float32 map; docs/DESIGN.md#cpu-speed)."""
        batch = normalize_and_pad(images, self.pixel_mean, self.pixel_std)
        with _stage_autocast("trunk", batch.device):
            return self.backbone.forward_res4(batch)

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]:
        """Offline-RPN proposals per image (resized frame, sorted by objectness). The RPN has its own
        preprocessing (BGR, caffe mean) and always runs in float32: its boxes must stay exact."""
        return run_rpn(self.rpn, images, self.device)

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int = 256,
                       return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Region embeddings: RoIAlignV2 on res4 -> CLIP layer4 -> attnpool, ``chunk_size`` regions at a time.

        Every region is computed independently, so the chunk size bounds memory and never changes a result.

        Args:
            features: [B, C, H, W] from :meth:`compute_features`.
            boxes: per image [R_i, 4] XYXY in resized-image pixels.
            chunk_size: regions per layer4 call.
            return_res5: also return the [R, C5, S, S] res5 maps (mask head).
        Returns ([sum R_i, D] raw (unnormalized) embeddings in input order, res5 maps or None).
        """
        # RoIs in float32 always: a 16-bit res4 (autocast) would round box coordinates by up to 1 px (float16) or
        # 8 px (bfloat16) at 1000+ px; RoIAlign then pools a float32 map (as torchvision's autocast rule does)
        pool_in = features if features.dtype == torch.float32 else features.float()
        rois = boxes_to_rois(boxes, pool_in)
        chunk = max(1, int(chunk_size))
        embs, res5s = [], []
        for start in range(0, rois.shape[0], chunk):
            pooled = roi_align(pool_in, rois[start:start + chunk], output_size=self.pooler_resolution,
                               spatial_scale=1.0 / RES4_STRIDE, sampling_ratio=self.sampling_ratio,
                               aligned=True).to(features.dtype)
            res5 = self.backbone.forward_res5(pooled)
            if _autocast_on(res5.device) and "attnpool" not in BF16_STAGES:  # mixed precision by stage
                with torch.autocast(device_type=res5.device.type, enabled=False):
                    embs.append(self.backbone.attnpool(res5.to(self.backbone.attnpool.c_proj.weight.dtype)))
            else:
                embs.append(self.backbone.attnpool(res5))
            if return_res5:
                res5s.append(res5)
        emb = torch.cat(embs) if embs else features.new_zeros(0, self.embed_dim)
        res5_all = (torch.cat(res5s) if res5s else None) if return_res5 else None
        return emb, res5_all

    def classify(self, region_emb: Tensor, class_embeddings: Tensor) -> Tensor:
        """[R, D] embeddings, [K, D] class embeddings -> [R, K+1] softmax probabilities (background last).

        Always float32, also inside an autocast region: cosines are scaled by 1/0.01 before the softmax."""
        with torch.autocast(device_type=region_emb.device.type, enabled=False):
            logits = text_classifier_logits(region_emb.float(), class_embeddings.to(region_emb.device).float(),
                                            self.temperature)
            return F.softmax(logits, dim=-1)

    def predict_boxes(self, region_emb: Tensor, proposal_boxes: Tensor) -> Tensor:
        """Class-agnostic box regression from the raw attnpool embedding (fine-tuned checkpoints); the proposals
        unchanged when the model has no ``bbox_pred``."""
        if self.bbox_pred is None:
            return proposal_boxes
        deltas = self.bbox_pred(region_emb.to(self.bbox_pred.weight.dtype)).float()
        return decode_boxes(deltas, proposal_boxes.float(), weights=BOX_REG_WEIGHTS)

    def predict_masks(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int = 256) -> list[Tensor]:
        """Mask logits [N_i, 1, M, M] per image at the given (final, resized-frame) boxes: like detectron2's
        ``forward_with_given_boxes``, res4 is pooled again at the final boxes."""
        if self.mask_head is None:
            raise RuntimeError("this model has no mask head (only the LVIS fine-tuned checkpoints have one)")
        out = []
        for i, b in enumerate(boxes):
            _, res5 = self.encode_regions(features[i:i + 1], [b], chunk_size=chunk_size, return_res5=True)
            out.append(self.mask_head(res5) if res5 is not None else features.new_zeros(0, 1, 1, 1))
        return out
