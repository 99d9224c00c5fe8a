"""Checkpoints of transformer region encoders: the zero-shot branch's layout and OpenAI / open_clip CLIP ViTs.

Three steps, each a pure ``dict -> dict`` function:

1. :func:`remap_branch_keys` - the branch's key remapping, applied at every load (docs/DESIGN.md#zero-shot-branch), rule by rule in
   :data:`BRANCH_KEY_RULES`' order, with the original's semantics (``str.replace`` of *every* occurrence; some
   rules match a prefix, some any substring, some the exact key).
2. :func:`split_branch_state_dict` - branch model names -> our :class:`TransformerRegionDetector` names
   (``backbone.trunk.*``, ``backbone.image_projection``, ``logit_scale``, ``text_encoder.*``, ``rpn.*``); every
   key gets exactly one fate (loaded, ignored with a reason, or unexpected).
3. trunk layouts: timm's ViT (the branch's ViT-B/16) <-> our OpenAI-layout ViT (:data:`TIMM_VIT_RENAMES`);
   Microsoft Swin / DaViT / FocalNet -> timm via timm's own filters (in ``timm_trunks``).

OpenAI / open_clip ViT files (``visual.*`` + top-level text keys) are split by :func:`split_openai_vit_state_dict`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from torch import Tensor

from .io import CheckpointError

LANG = "roi_heads.box_predictor.lang_encoder."

# (match kind, pattern, old, new): "any" = the key contains ``pattern``, "prefix" = starts with it, "exact" = equals
# it; a matching key becomes ``key.replace(old, new)`` (all occurrences, as the original's str.replace).
BRANCH_KEY_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("any", "image_encoder.", "image_encoder.", "backbone."),  # Swin/UniCL checkpoints
    ("prefix", "text_encoder.", "text_encoder.", LANG + "lang_encoder."),
    ("any", "text_projection", "text_projection", LANG + "lang_proj"),
    ("exact", "logit_scale", "logit_scale", LANG + "logit_scale"),
    ("prefix", "norm.", "norm", "backbone.norm"),  # FocalNet checkpoints
    ("prefix", "lang_encoder.lang_encoder.", "lang_encoder.lang_encoder.", LANG + "lang_encoder."),
    ("exact", "lang_encoder.logit_scale", "lang_encoder.logit_scale", LANG + "logit_scale"),
    ("exact", "lang_encoder.lang_proj", "lang_encoder.lang_proj", LANG + "lang_proj"),
    ("prefix", "lang_encoder.", "lang_encoder.", LANG + "lang_encoder."),  # ViT checkpoints
    ("exact", "lang_projection", "lang_projection", LANG + "lang_proj"),
)


def _matches(kind: str, pattern: str, key: str) -> bool:
    if kind == "any":
        return pattern in key
    if kind == "prefix":
        return key.startswith(pattern)
    return key == pattern


def remap_branch_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Apply :data:`BRANCH_KEY_RULES` in order, each rule to every key (as the branch's checkpointer does)."""
    out = dict(sd)
    for kind, pattern, old, new in BRANCH_KEY_RULES:
        out = {(k.replace(old, new) if _matches(kind, pattern, k) else k): v for k, v in out.items()}
    return out


# timm VisionTransformer key (after ``backbone.``) -> our VisionTransformerTrunk key; N = block index
TIMM_VIT_RENAMES: tuple[tuple[str, str], ...] = (
    ("patch_embed.proj.", "conv1."),
    ("cls_token", "class_embedding"),  # [1, 1, C] -> [C]
    ("pos_embed", "positional_embedding"),  # [1, 1 + g*g, C] -> [1 + g*g, C]
    ("blocks.N.norm1.", "transformer.resblocks.N.ln_1."),
    ("blocks.N.attn.qkv.weight", "transformer.resblocks.N.attn.in_proj_weight"),
    ("blocks.N.attn.qkv.bias", "transformer.resblocks.N.attn.in_proj_bias"),
    ("blocks.N.attn.proj.", "transformer.resblocks.N.attn.out_proj."),
    ("blocks.N.norm2.", "transformer.resblocks.N.ln_2."),
    ("blocks.N.mlp.fc1.", "transformer.resblocks.N.mlp.c_fc."),
    ("blocks.N.mlp.fc2.", "transformer.resblocks.N.mlp.c_proj."),
    ("fc_norm.", "ln_post."),  # global-pool variant: the per-token norm
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def timm_vit_to_ours(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """timm ViT keys -> :class:`VisionTransformerTrunk` keys; returns (converted, keys no rule covers)."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        m = _BLOCK.match(key)
        generic = _BLOCK.sub("blocks.N.", key) if m else key
        for src, dst in TIMM_VIT_RENAMES:
            if generic.startswith(src):
                new = dst + generic[len(src):]
                if m:
                    new = new.replace(".N.", f".{m.group(1)}.", 1)
                if src in ("cls_token", "pos_embed"):
                    value = value.reshape(-1) if src == "cls_token" else value.reshape(-1, value.shape[-1])
                out[new] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def ours_to_timm_vit(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`timm_vit_to_ours` (used to write branch-layout files, e.g. in tests)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^transformer\.resblocks\.(\d+)\.", key)
        generic = re.sub(r"^transformer\.resblocks\.\d+\.", "transformer.resblocks.N.", key)
        for src, dst in TIMM_VIT_RENAMES:
            if generic.startswith(dst):
                new = src + generic[len(dst):]
                if m:
                    new = new.replace(".N.", f".{m.group(1)}.", 1)
                if dst == "class_embedding":
                    value = value.reshape(1, 1, -1)
                elif dst == "positional_embedding":
                    value = value[None]
                out[new] = value
                break
        else:
            raise CheckpointError(f"ViT key {key!r} has no timm counterpart (ln_pre / bias-free patch embedding "
                                  "are OpenAI-layout only)")
    return out


def detect_trunk_family(keys: list[str]) -> Optional[str]:
    """``vit`` / ``swin`` / ``davit`` / ``focalnet`` from trunk keys (no ``backbone.`` prefix), in Microsoft's or
    timm's spelling; None when none matches."""
    if any(".modulation.focal_layers." in k for k in keys):
        return "focalnet"
    if any(k.endswith("relative_position_bias_table") for k in keys):
        return "swin"
    if any(k.startswith(("patch_embeds.", "main_blocks.", "stem.conv.", "stages.0.blocks.")) for k in keys):
        return "davit"
    if any(k.startswith("blocks.") and ".attn.qkv." in k for k in keys) or "pos_embed" in keys:
        return "vit"
    return None


def transformer_layout(sd: Mapping[str, Tensor]) -> Optional[str]:
    """``"openai_vit"`` (OpenAI / open_clip CLIP ViT), ``"branch"`` (a zero-shot-branch transformer checkpoint, any
    of its spellings) or None (not a transformer region-encoder file: e.g. a RegionCLIP ResNet checkpoint)."""
    keys = list(sd)
    if any(k.startswith("backbone.attnpool.") for k in keys):
        return None
    if any(k.startswith("visual.transformer.resblocks.") for k in keys):
        return "openai_vit"
    if any(k.startswith("visual.trunk.") for k in keys):
        raise CheckpointError("open_clip timm-trunk checkpoints (visual.trunk.*) are not supported; use an OpenAI-"
                              "layout CLIP ViT (visual.transformer.*) or a zero-shot-branch checkpoint")
    remapped = remap_branch_keys(sd)
    trunk = [k[len("backbone."):] for k in remapped if k.startswith("backbone.")]
    # image_projection alone still selects this loader, so a file without a known trunk gets its precise error
    return "branch" if detect_trunk_family(trunk) is not None or "image_projection" in remapped else None


@dataclass
class BranchSplit:
    """A branch checkpoint sorted by destination (keys = our module names)."""

    family: str
    trunk: dict[str, Tensor] = field(default_factory=dict)  # backbone.* minus the prefix, branch spelling
    detector: dict[str, Tensor] = field(default_factory=dict)  # image projection, logit scale, text encoder, rpn
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


# branch model key (prefix) -> our detector key (prefix); keys not matched here are unexpected unless ignored
BRANCH_TO_OURS: tuple[tuple[str, str], ...] = (
    ("image_projection", "backbone.image_projection"),
    (LANG + "lang_encoder.", "text_encoder.lang_encoder."),
    (LANG + "lang_proj", "text_encoder.lang_proj"),
    (LANG + "logit_scale", "logit_scale"),
    ("offline_backbone.", "rpn.backbone."),
    ("offline_proposal_generator.", "rpn.proposal_generator."),
)
BRANCH_IGNORED: tuple[tuple[str, str], ...] = (
    ("roi_heads.box_predictor.bbox_pred.", "zero-initialised box regression, unused (NO_BOX_DELTA True)"),
    ("pixel_mean", "input normalisation comes from InputConfig"),
    ("pixel_std", "input normalisation comes from InputConfig"),
    ("backbone.head.", "classification head of the trunk (NUM_CLASSES 0 at inference; DaViT's head.norm is kept)"),
    ("backbone.relative_position_index", "non-persistent buffer"),
)


def _is_classifier(key: str) -> bool:
    """The trunk's ImageNet classifier (unused); DaViT's ``head.norm`` is *not*: it normalises pooled regions."""
    return key.startswith("backbone.head.") and not key.startswith("backbone.head.norm.")


def split_branch_state_dict(sd: Mapping[str, Tensor]) -> BranchSplit:
    """Remap (:func:`remap_branch_keys`) and sort a branch checkpoint; the trunk stays in the branch's spelling.

    Raises:
        CheckpointError: no ``backbone.*`` keys of a known transformer family.
    """
    remapped = remap_branch_keys(sd)
    trunk = {k[len("backbone."):]: v for k, v in remapped.items() if k.startswith("backbone.")
             and not _is_classifier(k) and "relative_position_index" not in k and "attn_mask" not in k}
    family = detect_trunk_family(list(trunk))
    if family is None:
        raise CheckpointError("no transformer image encoder found: a zero-shot-branch checkpoint has backbone.* (or "
                              "image_encoder.*) keys of a ViT, Swin, DaViT or FocalNet; got e.g. "
                              f"{sorted(remapped)[:5]}")
    out = BranchSplit(family=family, trunk=trunk)
    for key, value in remapped.items():
        if key.startswith("backbone.") and key[len("backbone."):] in trunk:
            continue
        for src, dst in BRANCH_TO_OURS:
            if key.startswith(src):
                out.detector[dst + key[len(src):]] = value
                break
        else:
            if any(key.startswith(src) or "relative_position_index" in key or "attn_mask" in key
                   for src, _ in BRANCH_IGNORED):
                out.ignored.append(key)
            else:
                out.unexpected.append(key)
    return out


# OpenAI / open_clip: top-level text keys (as in checkpoint.openai_clip) and scalars that are not weights
_OPENAI_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_OPENAI_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def split_openai_vit_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                   dict[str, Tensor], list[str], list[str]]:
    """OpenAI / open_clip CLIP ViT state dict -> (trunk, detector extras, text tower, ignored, unexpected).

    ``visual.proj`` -> ``backbone.image_projection``; ``logit_scale`` -> ``logit_scale``; other ``visual.*`` -> the
    trunk (OpenAI names are our ViT's names); top-level text keys -> the CLIP text tower. fp16 -> float32.
    """
    trunk: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    text: dict[str, Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in sd.items():
        v = value.float()
        if key == "visual.proj":
            extras["backbone.image_projection"] = v
        elif key.startswith("visual."):
            trunk[key[len("visual."):]] = v
        elif key == "logit_scale":
            extras["logit_scale"] = v
        elif key.startswith(_OPENAI_TEXT):
            text[key] = v
        elif key in _OPENAI_IGNORED:
            ignored.append(key)
        else:
            unexpected.append(key)
    return trunk, extras, text, ignored, unexpected
