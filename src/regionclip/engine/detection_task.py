"""The open-vocabulary detection training task (docs/DESIGN.md#transfer-learning): a RegionCLIP detector + base-class text embeddings.

``DetectionTask(batch, generator=g)`` returns ``{"loss_cls", "loss_box_reg"[, "loss_mask"]}``. Frozen: stem,
res2, every BN (FrozenBN), the classifier (text-embedding buffers, zero background logit) and the offline RPN,
which always stays in eval mode with its test-time top-k. Trainable: res3, res4, res5 (``layer4``), ``attnpool``,
``bbox_pred`` and the mask head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..checkpoint.io import load_into
from ..checkpoint.regionclip import REGIONCLIP_RENAMES, split_regionclip_state_dict
from ..data.train_data import TrainSample, polygons_to_roi_masks
from ..losses.detection import box_regression_loss, classification_loss, mask_loss
from ..modeling.detector import RegionCLIPDetector
from ..modeling.heads import text_classifier_logits
from ..structures import Proposals
from .roi_sampling import SampledRoIs, sample_rois

__all__ = ["RoIConfig", "DetectionTask", "StepOutputs", "checkpoint_key", "export_detector_state_dict"]


@dataclass(frozen=True)
class RoIConfig:
    """RoI sampling and loss settings (``roi`` section). Defaults = the COCO recipe."""

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    append_gt: bool = True  # GT boxes are added to the proposals (detectron2 default)
    focal_gamma: Optional[float] = 0.5  # FOCAL_SCALED_LOSS (COCO); None for LVIS
    bg_weight: Optional[float] = 0.2  # BG_CLS_LOSS_WEIGHT: 0.2 COCO, 0.8 LVIS
    box_loss_weight: float = 1.0
    mask_loss_weight: float = 1.0
    box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


@dataclass
class StepOutputs:
    """What one training forward computed (:meth:`DetectionTask.step`); RoIs are in box-head order (image by
    image, each image's sampled RoIs foreground first)."""

    proposals: list[Proposals]  # offline-RPN output per image, before the GT boxes are appended
    sampled: list[SampledRoIs]  # per image
    region_emb: Tensor  # [R, D] raw attnpool output: the box predictor's input
    logits: Tensor  # [R, K+1] classifier logits (cosine / temperature), background last
    deltas: Optional[Tensor]  # [R, 4] class-agnostic box deltas (None without bbox_pred)
    losses: dict[str, Tensor]


def checkpoint_key(key: str) -> str:
    """Our detector's state-dict key -> the released checkpoints' key (REGIONCLIP_RENAMES read backwards)."""
    for src, dst in REGIONCLIP_RENAMES:
        if key.startswith(dst):
            return src + key[len(dst):]
    raise KeyError(f"detector key {key!r} has no checkpoint name in REGIONCLIP_RENAMES")


def export_detector_state_dict(detector: RegionCLIPDetector, train_embeddings: Tensor,
                               test_embeddings: Optional[Tensor] = None,
                               extra: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """The detector's weights in the released checkpoints' key layout (``backbone.*``, ``offline_*``,
    ``roi_heads.box_predictor.*``, ``roi_heads.mask_head.*``), readable by :func:`regionclip.factory.load_detector`.

    ``extra`` (e.g. ``lang_encoder.*`` of the initial checkpoint) is copied unchanged.
    """
    out = {checkpoint_key(key): value for key, value in detector.state_dict().items()}
    emb = train_embeddings.detach().float()
    out["roi_heads.box_predictor.cls_score.weight"] = emb
    out["roi_heads.box_predictor.cls_bg_score.weight"] = emb.new_zeros(1, emb.shape[1])
    if test_embeddings is not None:
        out["roi_heads.box_predictor.test_cls_score.weight"] = test_embeddings.detach().float()
    out.update(extra or {})
    return out


def _freeze_rpn(detector: RegionCLIPDetector) -> None:
    if detector.rpn is not None:
        for p in detector.rpn.parameters():
            p.requires_grad_(False)


class DetectionTask(nn.Module):
    """Fast R-CNN training of a :class:`RegionCLIPDetector` with a frozen text-embedding classifier.

    Args:
        detector: the detector (weights loaded); ``bbox_pred`` / ``mask_head`` are trained when present.
        train_embeddings: [K, D] base-class embeddings (row i = contiguous training label i).
        roi: sampling and loss settings.
        test_embeddings: [K_test, D] embeddings stored as ``test_cls_score`` in exported checkpoints.
        freeze_at: detectron2 ``FREEZE_AT`` (2 = stem + res2 frozen).
        export_extra: tensors copied into every exported checkpoint (e.g. ``lang_encoder.*``).
    """

    train_embeddings: Tensor  # [K, D] non-persistent buffer registered in __init__, declared for typing

    def __init__(self, detector: RegionCLIPDetector, train_embeddings: Tensor, roi: RoIConfig = RoIConfig(), *,
                 test_embeddings: Optional[Tensor] = None, freeze_at: int = 2,
                 export_extra: Optional[dict[str, Tensor]] = None) -> None:
        super().__init__()
        emb = torch.as_tensor(train_embeddings).float()
        if emb.ndim != 2 or emb.shape[1] != detector.embed_dim:
            raise ValueError(f"training class embeddings must be [K, {detector.embed_dim}], got {tuple(emb.shape)}")
        self.detector = detector
        self.roi = roi
        self.num_classes = int(emb.shape[0])
        self.register_buffer("train_embeddings", emb, persistent=False)
        self.test_embeddings = None if test_embeddings is None else torch.as_tensor(test_embeddings).float()
        self.export_extra = dict(export_extra or {})
        detector.backbone.freeze(freeze_at)
        _freeze_rpn(detector)

    def train(self, mode: bool = True) -> "DetectionTask":
        super().train(mode)
        if self.detector.rpn is not None:
            self.detector.rpn.eval()  # the offline RPN is never trained and always uses its test-time top-k
        return self

    # ------------------------------------------------------------------ checkpoints in the original layout
    def export_state_dict(self) -> dict[str, Tensor]:
        return export_detector_state_dict(self.detector, self.train_embeddings, self.test_embeddings,
                                          self.export_extra)

    def load_export_state_dict(self, sd: dict[str, Tensor]) -> None:
        split = split_regionclip_state_dict(sd)
        load_into(self.detector, split.detector, strict=True, source="training checkpoint")

    # ------------------------------------------------------------------ parameter names of the original
    def checkpoint_parameter_names(self) -> dict[str, bool]:
        """Every parameter under its name in the released checkpoints (the original's module names), mapped to
        whether this task trains it. The frozen classifier tensors, which the original holds as parameters with
        ``requires_grad=False`` (here constant buffers), are listed as frozen: ``cls_score`` and
        ``cls_bg_score`` always, ``test_cls_score`` when test embeddings are set."""
        out = {checkpoint_key(n): p.requires_grad for n, p in self.detector.named_parameters()}
        out["roi_heads.box_predictor.cls_score.weight"] = False
        out["roi_heads.box_predictor.cls_bg_score.weight"] = False
        if self.test_embeddings is not None:
            out["roi_heads.box_predictor.test_cls_score.weight"] = False
        return out

    # ------------------------------------------------------------------ loss
    def forward(self, batch: Sequence[TrainSample], generator: Optional[torch.Generator] = None
                ) -> dict[str, Tensor]:
        return self.step(batch, generator).losses

    def step(self, batch: Sequence[TrainSample], generator: Optional[torch.Generator] = None) -> StepOutputs:
        """One training forward with its intermediate tensors (``forward`` returns only the losses).

        The order of operations is the original's (``CLIPFastRCNN.forward`` -> ``CLIPRes5ROIHeads.forward``):
        offline-RPN proposals (eval mode, no grad), GT appended, matching and sampling per image (positives then
        negatives, each in ``randperm`` order from ``generator``), RoIAlign on res4 -> layer4 -> attnpool for all
        sampled RoIs of the batch, then the losses over the concatenated RoIs.
        """
        det, roi, k = self.detector, self.roi, self.num_classes
        dev = det.device
        images = [s.image for s in batch]
        if det.rpn is not None:
            with torch.no_grad():  # one padded batch, as the original's ImageList (docs/TRAINING.md#fidelity)
                proposals = det.rpn([x.to(dev).float() for x in images], batch_padding=True)
        else:  # GT boxes only (no RPN configured): the sampled RoIs are the GT boxes themselves
            proposals = [Proposals(torch.zeros(0, 4, device=dev)) for _ in batch]
        sampled = [sample_rois(p.boxes.to(dev), s.boxes.to(dev), s.labels.to(dev), k,
                               batch_size_per_image=roi.batch_size_per_image, positive_fraction=roi.positive_fraction,
                               iou_threshold=roi.iou_threshold, append_gt=roi.append_gt or det.rpn is None,
                               generator=generator)
                   for p, s in zip(proposals, batch)]
        res4 = det.compute_features(images)
        boxes_list = [r.boxes for r in sampled]
        # one chunk: training keeps every activation for backward anyway, so chunking would only add calls
        emb, res5 = det.encode_regions(res4, boxes_list, chunk_size=max(1, sum(len(b) for b in boxes_list)),
                                       return_res5=det.mask_head is not None)
        labels = torch.cat([r.labels for r in sampled])
        logits = text_classifier_logits(emb.float(), self.train_embeddings, det.temperature)
        losses = {"loss_cls": classification_loss(logits, labels, focal_gamma=roi.focal_gamma,
                                                  bg_weight=roi.bg_weight)}
        deltas = None
        if det.bbox_pred is not None:
            # the raw (unnormalised) attnpool output, as the original's box predictor receives it
            deltas = det.bbox_pred(emb.to(det.bbox_pred.weight.dtype))
            boxes = torch.cat([r.boxes for r in sampled])
            gt = torch.cat([r.gt_boxes for r in sampled])
            losses["loss_box_reg"] = roi.box_loss_weight * box_regression_loss(deltas, boxes, gt, labels, k,
                                                                               roi.box_reg_weights)
        if det.mask_head is not None:
            fg = labels < k
            assert res5 is not None
            mask_logits = det.mask_head(res5[fg])
            targets = []
            for r, s in zip(sampled, batch):
                if s.polygons is None:
                    raise ValueError("the mask head is trained but the samples carry no polygons; build the "
                                     "training dataset with segmentations")
                f = r.fg_mask(k)
                targets.append(polygons_to_roi_masks(s.polygons, r.gt_index[f].cpu(), r.boxes[f],
                                                     mask_logits.shape[-1]))
            losses["loss_mask"] = roi.mask_loss_weight * mask_loss(mask_logits, torch.cat(targets).to(dev))
        return StepOutputs(list(proposals), sampled, emb, logits, deltas, losses)
