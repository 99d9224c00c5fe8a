"""Released RegionCLIP checkpoints -> our modules, through explicit rename tables (docs/DESIGN.md#checkpoints).

The d2 checkpoint (``{'model': state_dict}``) carries several key namespaces; each one has exactly one fate
here, listed in :data:`REGIONCLIP_RENAMES` (loaded into a module) or :data:`REGIONCLIP_SET_ASIDE` (kept for
another consumer or deliberately unused, always reported). Anything else is an *unexpected* key and a
strict load fails with the full report — keys are never dropped silently.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from torch import Tensor

from ..config import ClipResNetConfig
from .io import CheckpointError

# checkpoint prefix -> our detector's module prefix
REGIONCLIP_RENAMES: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),  # CLIP ModifiedResNet incl. layer4 + attnpool
    ("offline_backbone.", "rpn.backbone."),  # offline RPN inside a RegionCLIP checkpoint (overridden by an RPN file)
    ("offline_proposal_generator.", "rpn.proposal_generator."),
    ("roi_heads.box_predictor.bbox_pred.", "bbox_pred."),  # fine-tuned: class-agnostic regression
    ("roi_heads.mask_head.", "mask_head."),  # LVIS fine-tuned: class-agnostic mask head
)

# checkpoint key (prefix) -> what it is; these are not loaded into the detector's modules
REGIONCLIP_SET_ASIDE: tuple[tuple[str, str], ...] = (
    ("lang_encoder.", "text encoder (used by the vocabulary code, not by the detector)"),
    ("teacher_backbone.", "pretraining teacher CLIP (unused after pretraining)"),
    ("roi_heads.box_predictor.cls_score.weight", "training-class embeddings (fine-tuned checkpoints)"),
    ("roi_heads.box_predictor.test_cls_score.weight", "test-class embeddings (fine-tuned checkpoints)"),
    ("roi_heads.box_predictor.cls_bg_score.weight", "frozen all-zero background embedding (logit is a constant 0)"),
)


@dataclass
class SplitCheckpoint:
    """A RegionCLIP checkpoint sorted by destination."""

    detector: dict[str, Tensor] = field(default_factory=dict)  # our key -> tensor
    text_encoder: dict[str, Tensor] = field(default_factory=dict)  # without the lang_encoder. prefix
    teacher: dict[str, Tensor] = field(default_factory=dict)
    train_class_embeddings: Optional[Tensor] = None
    test_class_embeddings: Optional[Tensor] = None
    unexpected: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)


def split_regionclip_state_dict(sd: Mapping[str, Tensor]) -> SplitCheckpoint:
    out = SplitCheckpoint()
    for key, value in sd.items():
        for src, dst in REGIONCLIP_RENAMES:
            if key.startswith(src):
                out.detector[dst + key[len(src):]] = value
                break
        else:
            if key.startswith("lang_encoder."):
                out.text_encoder[key[len("lang_encoder."):]] = value
            elif key.startswith("teacher_backbone."):
                out.teacher[key[len("teacher_backbone."):]] = value
            elif key == "roi_heads.box_predictor.cls_score.weight":
                out.train_class_embeddings = value
            elif key == "roi_heads.box_predictor.test_cls_score.weight":
                out.test_class_embeddings = value
            elif key == "roi_heads.box_predictor.cls_bg_score.weight":
                if value.abs().max() != 0:  # the original freezes it at zero; anything else is not a RegionCLIP file
                    raise CheckpointError("roi_heads.box_predictor.cls_bg_score.weight is not all zeros; the background "
                                          "logit of RegionCLIP is a constant 0 — this is not a RegionCLIP checkpoint")
            else:
                out.unexpected.append(key)
                continue
            out.set_aside.append(key)
    return out


def infer_clip_resnet_config(backbone_sd: Mapping[str, Tensor], prefix: str = "backbone.") -> ClipResNetConfig:
    """RN50 vs RN50x4 (and any CLIP ModifiedResNet) from tensor shapes, so users never pass DEPTH/TEXT_EMB_DIM."""
    try:
        width = int(backbone_sd[prefix + "conv3.weight"].shape[0])
        pos = backbone_sd[prefix + "attnpool.positional_embedding"]
        embed_dim = int(backbone_sd[prefix + "attnpool.c_proj.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"not a CLIP ResNet state dict: missing {e.args[0]!r}. RegionCLIP detection needs a "
                              "RegionCLIP checkpoint (regionclip_pretrained-cc_rn50.pth, ...) or an OpenAI CLIP "
                              "RN50/RN50x4 file; RPN files go to --rpn-weights") from None

    def stage_blocks(i: int) -> int:  # blocks of layer{i}: highest block index + 1 (0 when absent)
        pat = re.compile(re.escape(prefix) + rf"layer{i}\.(\d+)\.")
        idx = {int(m.group(1)) for k in backbone_sd for m in [pat.match(k)] if m}
        return max(idx) + 1 if idx else 0

    layers = (stage_blocks(1), stage_blocks(2), stage_blocks(3), stage_blocks(4))
    grid = int(round(math.sqrt(pos.shape[0] - 1)))
    return ClipResNetConfig(layers=layers, width=width, embed_dim=embed_dim, heads=width * 32 // 64,
                            image_resolution=grid * 32)


def describe_checkpoint(sd: Mapping[str, Tensor]) -> str:
    """One line naming what kind of file this looks like (for error messages)."""
    if any(k.startswith("proposal_generator.") for k in sd) and not any(k.startswith("backbone.attnpool") for k in sd):
        return "a detectron2 RPN / Mask R-CNN checkpoint (pass it as --rpn-weights)"
    if any(k.startswith("visual.") for k in sd):
        return "an OpenAI CLIP state dict"
    if any(k.startswith("backbone.attnpool") for k in sd):
        return "a RegionCLIP checkpoint"
    if len(sd) == 0:
        return "an empty state dict"
    return f"an unknown checkpoint (first keys: {list(sd)[:3]})"


def class_embedding_file(tensor: object, path: str = "<tensor>") -> Tensor:
    """Validate a concept-embedding file's content: a bare [N, D] tensor ([D] for N = 1 in the original)."""
    if isinstance(tensor, Mapping):
        cands = [v for v in tensor.values() if isinstance(v, Tensor) and v.ndim == 2]
        if len(tensor) == 1 and cands:
            tensor = cands[0]
        else:
            raise CheckpointError(f"{path} is a dict with keys {list(tensor)[:5]}; a concept-embedding file is a bare "
                                  "[N, D] tensor (e.g. lvis_1203_cls_emb.pth). Did you pass a model checkpoint?")
    if not isinstance(tensor, Tensor):
        raise CheckpointError(f"{path} holds a {type(tensor).__name__}, not a tensor of concept embeddings")
    t = tensor.float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise CheckpointError(f"{path}: concept embeddings must be [N, D], got shape {tuple(t.shape)}")
    return t
