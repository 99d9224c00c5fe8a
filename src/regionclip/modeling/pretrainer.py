"""Region-text pretraining model (docs/DESIGN.md#pretraining): a trainable CLIP ResNet student, a frozen CLIP ResNet
teacher, the frozen CLIP text encoder, the frozen offline RPN and the concept pool.

``RegionTextPretrainer(batch, generator=g)`` returns the loss dict of one iteration (it is the *task* of the
generic training engine); it has no inference mode — after pretraining, :meth:`export_state_dict` writes the
original checkpoint layout and :func:`regionclip.factory.load_detector` builds the detector from it.

Whole-image box (open question 15.4): the original creates one box ``[0, 0, W_pad, H_pad]`` per image where
``W_pad, H_pad`` is the size of the *padded batch tensor*; it never ran as written, so which one the paper used
is unknown. We follow the code's evident intent and default to ``global_box="padded"`` (so for a smaller image of
a batch the box includes zero padding, which the attnpool sees as background); ``global_box="image"`` uses each
image's own size instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..losses.region_text import (
    image_text_contrastive_loss,
    region_concept_contrastive_loss,
    region_concept_distillation_loss,
    teacher_pseudo_labels,
)
from .detector import RegionCLIPDetector
from .text_encoder import CLIPTextTransformer

__all__ = ["RegionTextConfig", "RegionTextPretrainer", "sample_regions", "whole_image_boxes"]

_RPN_RENAMES = (("backbone.", "offline_backbone."), ("proposal_generator.", "offline_proposal_generator."))


@dataclass(frozen=True)
class RegionTextConfig:
    """Per-iteration settings (``pretrain`` section). Defaults = the original's RN50/RN50x4 configs."""

    num_regions: int = 100  # PRETRAIN_SAMPLE_REGIONS: random subset of the <= 300 RPN proposals per image
    concept_threshold: float = 0.1  # CONCEPT_THRES on the teacher's max concept probability
    teacher_temperature: float = 0.01  # hard-coded in the original's pseudo labelling
    temperature: float = 0.01  # CLSS_TEMP for the three student losses
    global_box: str = "padded"  # "padded" (original code) or "image"; see the module docstring
    gather: bool = True  # GATHER_GPUS: image-text loss over the global batch (all-gather with gradient)
    # The original's offline RPN sees the whole batch padded to its largest image (ImageList), so a smaller image's
    # proposals near its right/bottom edge depend on its batch-mates; False pads each image alone (as inference)
    rpn_batch_padding: bool = True
    image_text_weight: float = 1.0
    distill_weight: float = 1.0
    contrastive_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.global_box not in ("padded", "image"):
            raise ValueError(f"pretrain.global_box must be 'padded' or 'image', got {self.global_box!r}")
        if self.num_regions < 1:
            raise ValueError(f"pretrain.num_regions must be >= 1, got {self.num_regions}")


def sample_regions(boxes: Tensor, num: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random subset of ``num`` boxes (all of them, in random order, when there are fewer): the original takes
    the first ``num`` of a random permutation."""
    perm = torch.randperm(boxes.shape[0], generator=generator)[:num]
    return boxes[perm.to(boxes.device)]


def whole_image_boxes(image_sizes: Sequence[tuple[int, int]], mode: str = "padded") -> list[Tensor]:
    """One XYXY box per image covering the padded batch (``mode="padded"``) or the image itself (``"image"``)."""
    hp, wp = max(h for h, _ in image_sizes), max(w for _, w in image_sizes)
    return [torch.tensor([[0.0, 0.0, float(wp if mode == "padded" else w), float(hp if mode == "padded" else h)]])
            for h, w in image_sizes]


class RegionTextPretrainer(nn.Module):
    """Student/teacher region-text pretraining.

    Args:
        student: detector holding the student CLIP ResNet and the offline RPN (``rpn``); only its backbone trains.
        teacher: detector holding the teacher CLIP ResNet (its ``rpn`` is unused); frozen.
        text_encoder: CLIP text transformer; frozen.
        concept_embeddings: [C, D] student concept pool (raw 81-template means).
        teacher_concept_embeddings: [C, D_t] pool for the teacher (default: the student's; must be given when the
            teacher's embedding size differs). Row c of both pools must be the same concept.
        cfg: per-iteration settings.
        freeze_at: detectron2 ``FREEZE_AT`` of the student (2: stem + res2 frozen; res3, res4, layer4, attnpool
            train).
    """

    # non-persistent buffers registered in __init__, declared for typing
    concept_embeddings: Tensor  # [C, D]
    teacher_concept_embeddings: Tensor  # [C, D_t]

    def __init__(self, student: RegionCLIPDetector, teacher: RegionCLIPDetector, text_encoder: CLIPTextTransformer,
                 concept_embeddings: Tensor, teacher_concept_embeddings: Optional[Tensor] = None,
                 cfg: RegionTextConfig = RegionTextConfig(), freeze_at: int = 2) -> None:
        super().__init__()
        if student.rpn is None:
            raise ValueError("region-text pretraining needs the offline RPN (student.rpn): give model.rpn_weights")
        pool = torch.as_tensor(concept_embeddings).float()
        tpool = pool if teacher_concept_embeddings is None else torch.as_tensor(teacher_concept_embeddings).float()
        for name, emb, dim in (("concept pool", pool, student.embed_dim),
                               ("teacher concept pool", tpool, teacher.embed_dim)):
            if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] == 0:
                raise ValueError(f"{name} must be a non-empty [C, {dim}] tensor, got {tuple(emb.shape)}; embed the "
                                 "concepts with the text encoder of the matching CLIP model")
        if pool.shape[0] != tpool.shape[0]:
            raise ValueError(f"student and teacher concept pools differ in size ({pool.shape[0]} vs "
                             f"{tpool.shape[0]}); row c must be the same concept in both")
        if text_encoder.embed_dim != student.embed_dim:
            raise ValueError(f"text encoder is {text_encoder.embed_dim}-d but the student is {student.embed_dim}-d")
        self.student, self.teacher, self.text_encoder, self.cfg = student, teacher, text_encoder, cfg
        self.register_buffer("concept_embeddings", pool, persistent=False)
        self.register_buffer("teacher_concept_embeddings", tpool, persistent=False)
        student.backbone.freeze(freeze_at)
        for module in (teacher, text_encoder, student.rpn):
            module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "RegionTextPretrainer":
        super().train(mode)
        # frozen parts always run in inference mode (the RPN also keeps its test-time top-k)
        for module in (self.teacher, self.text_encoder, self.offline_rpn):
            module.eval()
        return self

    @property
    def offline_rpn(self) -> nn.Module:
        """The student's offline RPN (checked present in ``__init__``)."""
        rpn = self.student.rpn
        if rpn is None:
            raise RuntimeError("the student detector's offline RPN was removed after construction (student.rpn is "
                               "None); region-text pretraining needs it")
        return rpn

    # ------------------------------------------------------------------ checkpoints in the original layout
    def export_state_dict(self) -> dict[str, Tensor]:
        """``backbone.*`` (student), ``teacher_backbone.*``, ``lang_encoder.*``, ``offline_backbone.*`` and
        ``offline_proposal_generator.*``: the key layout of the released pretrained checkpoints."""
        out = {"backbone." + k: v for k, v in self.student.backbone.state_dict().items()}
        out.update({"teacher_backbone." + k: v for k, v in self.teacher.backbone.state_dict().items()})
        out.update({"lang_encoder." + k: v for k, v in self.text_encoder.state_dict().items()})
        for key, value in self.offline_rpn.state_dict().items():
            src, dst = next((s, d) for s, d in _RPN_RENAMES if key.startswith(s))
            out[dst + key[len(src):]] = value
        return out

    def load_export_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Inverse of :meth:`export_state_dict` (strict: every key of every part must be present; PyTorch's strict
        loading names missing and unexpected keys)."""
        parts: dict[str, dict[str, Tensor]] = {"backbone.": {}, "teacher_backbone.": {}, "lang_encoder.": {},
                                               "offline_": {}}
        unknown = []
        for key, value in sd.items():
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is None:
                unknown.append(key)
            else:
                parts[prefix][key[len(prefix):]] = value
        if unknown:
            raise ValueError(f"pretraining checkpoint has unknown keys, e.g. {unknown[:5]}")
        for module, part in ((self.student.backbone, "backbone."), (self.teacher.backbone, "teacher_backbone."),
                             (self.text_encoder, "lang_encoder."), (self.offline_rpn, "offline_")):
            try:
                module.load_state_dict(parts[part], strict=True)
            except RuntimeError as e:
                raise ValueError(f"pretraining checkpoint, {part}* keys: {e}") from None

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def encode_captions(self, tokens: Tensor) -> Tensor:
        """[B, L] token ids -> [B, D] raw caption embeddings (EOT pooling; frozen encoder)."""
        length = int(tokens.argmax(dim=-1).max()) + 1  # positions after the last EOT cannot change it (causal)
        return self.text_encoder.encode_text(tokens[:, :length])

    def forward(self, batch: Sequence[Any], generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """Losses of one batch of :class:`regionclip.data.captions.CaptionSample` (uint8 images, token ids)."""
        cfg, student = self.cfg, self.student
        dev = student.device
        images = [s.image for s in batch]
        tokens = torch.stack([s.tokens for s in batch]).to(dev)
        with torch.no_grad():
            proposals = self.offline_rpn([x.to(dev).float() for x in images], batch_padding=cfg.rpn_batch_padding)
        regions = [sample_regions(p.boxes, cfg.num_regions, generator) for p in proposals]
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]

        res4 = student.compute_features(images)
        whole = [b.to(dev) for b in whole_image_boxes(sizes, cfg.global_box)]
        # one chunk each: training keeps every activation for backward anyway
        global_emb, _ = student.encode_regions(res4, whole, chunk_size=max(1, len(whole)))
        n_regions = max(1, sum(len(r) for r in regions))
        region_emb, _ = student.encode_regions(res4, regions, chunk_size=n_regions)
        with torch.no_grad():
            teacher_emb, _ = self.teacher.encode_regions(self.teacher.compute_features(images), regions,
                                                         chunk_size=n_regions)
            labels = teacher_pseudo_labels(teacher_emb, self.teacher_concept_embeddings, cfg.teacher_temperature,
                                           cfg.concept_threshold)
            text_emb = self.encode_captions(tokens)
        kept = region_emb[labels.keep]
        losses = {
            "loss_img_txt_level": cfg.image_text_weight * image_text_contrastive_loss(
                global_emb, text_emb, cfg.temperature, gather=cfg.gather),
            "loss_region_distill": cfg.distill_weight * region_concept_distillation_loss(
                kept, self.concept_embeddings, labels.probs[labels.keep], cfg.temperature),
            "loss_concept_contrastive": cfg.contrastive_weight * region_concept_contrastive_loss(
                kept, self.concept_embeddings, labels.targets[labels.keep], cfg.temperature),
        }
        # logged only (keys without the "loss" prefix are not optimised)
        losses["regions_kept"] = labels.keep.float().sum().detach() / max(1, len(batch))
        losses["pseudo_label_fallback"] = torch.tensor(float(labels.fallback), device=dev)
        return losses
