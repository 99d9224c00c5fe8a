"""RegionCLIP detector, a pure model: CLIP res4 once per image, every region through RoIAlign -> CLIP res5 ->
attnpool, and the text-embedding classifier.

It works on tensors only (docs/DESIGN.md#model-boundary): uint8 resized images in, res4 maps, proposals, region
embeddings and class probabilities out. Image decoding, vocabularies, the compute dtype, chunk sizes and
post-processing belong to :mod:`regionclip.pipeline`, which passes them per call; nothing here changes between
calls. The pipeline calls the stages one by one (``compute_features``, ``propose``, ``encode_regions``,
``classify``, ``predict_boxes``); :meth:`RegionCLIPDetector.forward` runs the same stages on one batch tensor, so
hooks, ``torch.jit.trace`` and other module wrappers see the whole model.

Composition (docs/DESIGN.md#architecture): ``backbone`` (CLIP ModifiedResNet, frozen BN), optional ``rpn``
(offline detectron2 RPN, localization only), optional ``bbox_pred`` (class-agnostic regression of fine-tuned
checkpoints), optional ``mask_head`` (LVIS fine-tuned).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from ..ops.box_coder import decode_boxes
from ..structures import Proposals
from .clip_resnet import ModifiedResNet
from .heads import MaskHead, text_classifier_logits

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # detectron2 ROI_BOX_HEAD.BBOX_REG_WEIGHTS
RES4_STRIDE = 16  # declared res4 stride: RoIAlign always uses exactly 1/16 even though res4 is floor-divided

# Stages of the CLIP detector that run in 16 bits inside a 16-bit autocast region (dtype "bfloat16"/"float16":
# mixed precision by stage); every other stage stays float32: the RPN and the classifier always, and the trunk
# (res4) and attention pool here. Only layer4 (~90 % of the region head's FLOPs) gains much from bf16; the trunk
# stays float32 because the float32 refinement of the decisive regions (regionclip.inference.precision) pools from
# the float32 map, the attention pool because it is cheap and alone moves the logits as much as layer4 does.
# Measured per stage: benchmarks/bf16_stages.py, docs/DESIGN.md#cpu-speed.
BF16_STAGES = frozenset({"layer4"})


def run_rpn(rpn: Optional[nn.Module], images: Sequence[Tensor], device: torch.device) -> list[Proposals]:
    """A recognizer's ``propose``: the offline RPN on uint8 resized images, in float32 on ``device`` (its boxes
    must stay exact; it has its own BGR / caffe-mean preprocessing). Shared by both recognizers."""
    if rpn is None:
        raise RuntimeError("this model has no region proposal network: pass boxes (GT/user-box mode), or load "
                           "RPN weights (e.g. --rpn-weights rpn_lvis_866.pth)")
    return rpn([x.to(device).float() for x in images])


def normalize_batch(images: Tensor, mean: Tensor, std: Tensor, image_sizes: Optional[Tensor] = None) -> Tensor:
    """uint8 batch [B, 3, H, W] -> CLIP-normalised float batch, equal to :func:`normalize_and_pad` of the unpadded
    images: with ``image_sizes`` ([B, 2] int (h, w) of each image's top-left part), every pixel outside an image is
    0 after normalisation (the original's ImageList pads the normalised images), not the normalised uint8 0."""
    normed = ((images.to(mean.device).float() / 255.0) - mean) / std
    if image_sizes is None:
        return normed
    sizes = image_sizes.to(normed.device)
    rows = torch.arange(normed.shape[2], device=normed.device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(normed.shape[3], device=normed.device)[None, None, :] < sizes[:, 1, None, None]
    return torch.where((rows & cols)[:, None], normed, torch.zeros((), dtype=normed.dtype, device=normed.device))


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
    :data:`BF16_STAGES` (mixed precision by stage); a no-op outside autocast."""
    if stage in BF16_STAGES or not _autocast_on(device):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class RegionOutputs(NamedTuple):
    """What a detector's ``forward`` returns for R regions of a batch: every region, before post-processing (no
    score threshold, no NMS, no top-k, no rescaling to the original images).

    Attributes:
        boxes: [R, 4] float32 XYXY in the batch's pixels: the given RoIs' boxes, or every RPN proposal (per image,
            sorted by objectness, images in batch order).
        batch_index: [R] int64, the image of each region.
        objectness: [R] float32 RPN objectness logits; NaN for given RoIs (they have none).
        region_embeddings: [R, D] raw (unnormalised) region embeddings.
        class_probs: [R, K+1] (background last) or [R, K]: the classifier's softmax (``has_background``).
        pred_boxes: [R, 4] float32 boxes after the class-agnostic box regression (``boxes`` without ``bbox_pred``).
    """

    boxes: Tensor
    batch_index: Tensor
    objectness: Tensor
    region_embeddings: Tensor
    class_probs: Tensor
    pred_boxes: Tensor


class _Staged(Protocol):
    """What :func:`forward_regions` needs of a detector: its stages, with a trunk that takes a normalised batch."""

    pixel_mean: Tensor
    pixel_std: Tensor

    def trunk_features(self, batch: Tensor) -> Tensor: ...

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]: ...

    def encode_rois(self, features: Tensor, rois: Tensor, *, chunk_size: int,
                    return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]: ...

    def classify(self, region_emb: Tensor, class_embeddings: Tensor) -> Tensor: ...

    def predict_boxes(self, region_emb: Tensor, proposal_boxes: Tensor) -> Tensor: ...


def forward_regions(model: _Staged, images: Tensor, class_embeddings: Tensor, rois: Optional[Tensor],
                    image_sizes: Optional[Tensor], chunk_size: int) -> RegionOutputs:
    """The ``forward`` of both detectors: the pipeline's stages on one batch tensor
    (see :meth:`RegionCLIPDetector.forward`)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] batch, got shape {tuple(images.shape)}")
    features = model.trunk_features(normalize_batch(images, model.pixel_mean, model.pixel_std, image_sizes))
    if rois is None:  # proposal mode (eager only: the RPN's top-k and NMS are data-dependent)
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()] if image_sizes is not None \
            else [(int(images.shape[2]), int(images.shape[3]))] * images.shape[0]
        props = model.propose([img[:, :h, :w] for img, (h, w) in zip(images, sizes)])
        boxes = torch.cat([p.boxes for p in props]).float()
        # RPN proposals always carry their logits (None only for user boxes)
        objectness = torch.cat([p.objectness_logits if p.objectness_logits is not None
                                else torch.full((len(p.boxes),), float("nan"), device=p.boxes.device)
                                for p in props]).float()
        batch_index = torch.cat([torch.full((len(p.boxes),), i, dtype=torch.long, device=boxes.device)
                                 for i, p in enumerate(props)])
        rois = torch.cat([batch_index[:, None].float(), boxes], dim=1)
    else:
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must be [R, 5] (batch index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
        rois = rois.float()
        boxes, batch_index = rois[:, 1:], rois[:, 0].long()
        objectness = torch.full_like(rois[:, 0], float("nan"))
    emb, _ = model.encode_rois(features, rois, chunk_size=chunk_size)
    return RegionOutputs(boxes, batch_index, objectness, emb, model.classify(emb, class_embeddings),
                         model.predict_boxes(emb, boxes))


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

    def forward(self, images: Tensor, class_embeddings: Tensor, rois: Optional[Tensor] = None,
                image_sizes: Optional[Tensor] = None, *, chunk_size: int) -> RegionOutputs:
        """The whole model on one batch: the stages the pipeline calls one by one, tensors in, tensors out.

        Equal to ``compute_features`` -> ``propose`` (when no ``rois``) -> ``encode_regions`` -> ``classify`` /
        ``predict_boxes`` on the same images and regions (tests/test_detector_forward.py). With ``rois`` it is
        capturable by ``torch.export.export`` (static shapes); proposal mode runs the RPN's data-dependent
        selection and is eager only.

        Args:
            images: [B, 3, H, W] uint8 resized images, zero padded at the bottom/right to one size.
            class_embeddings: [K, D] (e.g. a :class:`~regionclip.text.vocabulary.Vocabulary`'s).
            rois: [R, 5] float (batch index, x1, y1, x2, y2 in resized-image pixels): user / GT boxes; None:
                every proposal of the offline RPN.
            image_sizes: [B, 2] int (h, w) of each image inside its padding; None: every image fills the batch.
                Pixels outside an image are 0 after normalisation, exactly as :meth:`compute_features` pads.
            chunk_size: regions per layer4 call (bounds memory, never changes a result).
        Returns:
            :class:`RegionOutputs` (every region, before post-processing).
        """
        return forward_regions(self, images, class_embeddings, rois, image_sizes, chunk_size)

    # ------------------------------------------------------------------ stages (tensors only)
    def compute_features(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 resized images [3, h_i, w_i] -> res4 map [B, C4, ~H/16, ~W/16] of the padded batch.

        Under a 16-bit autocast the trunk runs in it only if "trunk" is in :data:`BF16_STAGES`
        (it is not: a bf16 res4 map alone moves the classifier logits by ~0.1, and the float32 refinement of
        :mod:`regionclip.inference.precision` needs the float32 map; docs/DESIGN.md#cpu-speed)."""
        return self.trunk_features(normalize_and_pad(images, self.pixel_mean, self.pixel_std))

    def trunk_features(self, batch: Tensor) -> Tensor:
        """A CLIP-normalised padded batch [B, 3, H, W] (:func:`normalize_and_pad`) -> res4 (the trunk of
        :meth:`compute_features`)."""
        with _stage_autocast("trunk", batch.device):
            return self.backbone.forward_res4(batch)

    def propose(self, images: Sequence[Tensor]) -> list[Proposals]:
        """Offline-RPN proposals per image (resized frame, sorted by objectness). The RPN has its own
        preprocessing (BGR, caffe mean) and always runs in float32: its boxes must stay exact."""
        return run_rpn(self.rpn, images, self.device)

    def encode_regions(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int,
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
        # 8 px (bfloat16) at 1000+ px
        return self.encode_rois(features, boxes_to_rois(boxes, features.new_zeros((), dtype=torch.float32)),
                                chunk_size=chunk_size, return_res5=return_res5)

    def encode_rois(self, features: Tensor, rois: Tensor, *, chunk_size: int,
                    return_res5: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """:meth:`encode_regions` for [R, 5] RoIs (batch index, x1, y1, x2, y2; float32) instead of per-image boxes."""
        # RoIAlign pools a float32 map (as torchvision's autocast rule does)
        pool_in = features if features.dtype == torch.float32 else features.float()
        rois = rois.to(pool_in.device, pool_in.dtype)
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

    def predict_masks(self, features: Tensor, boxes: Sequence[Tensor], *, chunk_size: int) -> list[Tensor]:
        """Mask logits [N_i, 1, M, M] per image at the given (final, resized-frame) boxes: like detectron2's
        ``forward_with_given_boxes``, res4 is pooled again at the final boxes."""
        if self.mask_head is None:
            raise RuntimeError("this model has no mask head (only the LVIS fine-tuned checkpoints have one)")
        out = []
        for i, b in enumerate(boxes):
            _, res5 = self.encode_regions(features[i:i + 1], [b], chunk_size=chunk_size, return_res5=True)
            out.append(self.mask_head(res5) if res5 is not None else features.new_zeros(0, 1, 1, 1))
        return out
