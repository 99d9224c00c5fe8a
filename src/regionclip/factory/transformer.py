"""Build transformer region detectors from weight files (architectures read off tensor shapes).

Part of the one builder (:mod:`regionclip.factory`): :func:`load_transformer_detector` is what
:func:`regionclip.factory.load_detector` calls when :func:`regionclip.checkpoint.zeroshot_branch.transformer_layout`
recognises the file, and :func:`load_transformer_text_tower` what :func:`regionclip.factory.load_text_tower` calls
for such a file. The detector does not hold the text tower (as the CLIP-ResNet one): its keys are set aside when
the detector is loaded and read by the text-tower loader when names are embedded.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoint.io import CheckpointError, LoadReport, load_into, load_state_dict
from ..checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from ..checkpoint.zeroshot_branch import (
    BranchSplit,
    ours_to_timm_vit,
    split_branch_state_dict,
    split_openai_vit_state_dict,
    timm_vit_to_ours,
    transformer_layout,
)
from ..modeling.rpn import build_offline_rpn
from ..modeling.text_encoder import build_text_encoder, text_config_from_state_dict
from ..modeling.transformer.region_head import TransformerRegionDetector, TransformerRegionEncoder, Trunk
from ..modeling.transformer.timm_trunks import BRANCH_CONFIGS, TimmTrunk, convert_microsoft_layout, infer_timm_config
from ..modeling.transformer.vit import VisionTransformerTrunk, interpolate_grid_embedding
from ..modeling.unicl_text import UniCLTextEncoder

PathLike = Union[str, os.PathLike]
BRANCH_VIT_IMG_SIZE = 224  # MODEL.VIT.IMG_SIZE of the branch's ViT configs: the model's own positional grid


def build_vit_trunk(sd: Mapping[str, Tensor], *, layout: str, act: Optional[str] = None,
                    heads: Optional[int] = None) -> VisionTransformerTrunk:
    """A :class:`VisionTransformerTrunk` shaped like ``sd`` (our / OpenAI key names).

    ``layout="openai"``: CLIP conventions (ln_pre, no patch bias, QuickGELU unless ``act``, eps 1e-5, ``ln_post``
    on pooled regions). ``layout="branch"``: the branch's timm ViT (patch bias, GELU, eps 1e-6, ``fc_norm`` on the
    map). Heads default to width / 64, true for every released CLIP / timm ViT.
    """
    try:
        conv = sd["conv1.weight"]
        pos = sd["positional_embedding"]
    except KeyError as e:
        raise CheckpointError(f"not a ViT image tower: missing {e.args[0]!r}") from None
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    hidden = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    branch = layout == "branch"
    return VisionTransformerTrunk(width, layers, heads or max(1, width // 64), patch, grid,
                                  mlp_ratio=hidden / width, act=act or ("gelu" if branch else "quick_gelu"),
                                  ln_eps=1e-6 if branch else 1e-5, patch_bias="conv1.bias" in sd,
                                  ln_pre="ln_pre.weight" in sd, final_norm="map" if branch else "region")


def build_unicl_text_encoder(sd: Mapping[str, Tensor], autoregressive: bool) -> nn.Module:
    """A :class:`regionclip.modeling.unicl_text.UniCLTextEncoder` shaped like ``sd`` (keys ``lang_encoder.*``,
    ``lang_proj``)."""
    vocab, width = sd["lang_encoder.token_embedding.weight"].shape
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"lang_encoder\.resblocks\.(\d+)\.", k))})
    return UniCLTextEncoder(int(width), layers, int(width) // 64, int(sd["lang_proj"].shape[1]),
                            context_length=int(sd["lang_encoder.positional_embedding"].shape[0]),
                            vocab_size=int(vocab), autoregressive=autoregressive)


def _branch_trunk(split: BranchSplit, act: Optional[str]) -> tuple[Trunk, dict[str, Tensor], list[str]]:
    """(trunk module, its state dict under ``backbone.trunk.``, unexpected trunk keys) of a branch checkpoint."""
    if split.family == "vit":
        ours, unknown = timm_vit_to_ours(split.trunk)
        vit = build_vit_trunk(ours, layout="branch", act=act)
        # the branch's loader resizes a checkpoint grid to the model's 14x14 (IMG_SIZE 224) before any input size
        grid = BRANCH_VIT_IMG_SIZE // vit.patch_size
        old = int(round((ours["positional_embedding"].shape[0] - 1) ** 0.5))
        ours["positional_embedding"] = interpolate_grid_embedding(ours["positional_embedding"], (old, old),
                                                                  (grid, grid))
        vit = build_vit_trunk(ours, layout="branch", act=act)
        return vit, {"backbone.trunk." + k: v for k, v in ours.items()}, ["backbone." + k for k in unknown]
    family = split.family
    if family == "davit":  # timm's DaViT filter is pure renaming (Microsoft -> timm; timm keys pass through)
        timm_sd = convert_microsoft_layout(family, split.trunk, None)
        trunk = TimmTrunk(family, infer_timm_config(family, timm_sd))
    else:
        probe = dict(split.trunk)
        microsoft = "patch_embed.proj.weight" in probe if family == "focalnet" else \
            "layers.0.downsample.reduction.weight" in probe
        if family == "focalnet" and microsoft:  # only the spellings the shape inference reads
            probe = {re.sub(r"gamma_(\d)", r"ls\1.gamma", k.replace("patch_embed.", "stem.")): v
                     for k, v in probe.items()}
        cfg = infer_timm_config(family, probe)
        if family == "focalnet" and microsoft:
            cfg["use_post_norm"] = BRANCH_CONFIGS["focalnet"]["use_post_norm"]  # same keys either way
        trunk = TimmTrunk(family, cfg)
        timm_sd = convert_microsoft_layout(family, split.trunk, trunk)
    return trunk, {"backbone.trunk.model." + k: v for k, v in timm_sd.items()}, []


def _text_sd(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Tensor], Optional[str]]:
    """(layout, the text tower's weights under our module names, the branch trunk family or None) of a transformer
    file; no text tower -> {}."""
    layout = transformer_layout(sd)
    if layout == "openai_vit":
        return layout, split_openai_vit_state_dict(sd)[2], None
    if layout == "branch":
        split = split_branch_state_dict(sd)
        return layout, {k[len("text_encoder."):]: v for k, v in split.detector.items()
                        if k.startswith("text_encoder.")}, split.family
    raise CheckpointError("not a transformer region-encoder checkpoint (no visual.transformer.* CLIP ViT and no "
                          "zero-shot-branch ViT/Swin/DaViT/FocalNet backbone.* keys)")


def load_transformer_text_tower(weights: Union[PathLike, Mapping[str, Tensor]], *, strict: bool = True,
                                autoregressive: Optional[bool] = None, act: Optional[str] = None,
                                source: Optional[str] = None) -> nn.Module:
    """The text tower of a transformer file, loaded (float32, eval): a :class:`~regionclip.modeling.text_encoder.
    CLIPTextTransformer` for OpenAI / open_clip ViT files, a :class:`~regionclip.modeling.unicl_text.UniCLTextEncoder`
    for zero-shot-branch files (``autoregressive``: its causal mask; default True for Swin, False otherwise, as the
    branch's configs). ``act`` is the image trunk's option and does not change the text tower.

    Raises:
        ValueError: the file carries no text tower (class embeddings must then be given).
        CheckpointError: not a transformer file, or (``strict``) text weights that do not fit the tower.
    """
    del act  # an image-trunk option, accepted so that one options dict serves both loaders
    source = source or ("<state dict>" if isinstance(weights, Mapping) else str(weights))
    sd = dict(weights) if isinstance(weights, Mapping) else load_state_dict(weights)
    layout, text_sd, family = _text_sd(sd)
    if not text_sd:
        raise ValueError(f"{source} has no text encoder, so class names cannot be embedded: pass precomputed class "
                         "embeddings (--concept-emb file.pth, [K, D] rows) instead")
    if layout == "openai_vit":
        tower: nn.Module = build_text_encoder(text_config_from_state_dict(text_sd))
    else:
        tower = build_unicl_text_encoder(text_sd, autoregressive if autoregressive is not None else family == "swin")
    load_into(tower, text_sd, strict=strict, source=f"{source} (text tower)")
    return tower.eval()


def load_transformer_detector(weights: Union[PathLike, Mapping[str, Tensor]], rpn_weights: Optional[PathLike] = None,
                              *, rpn_overrides: Optional[dict[str, Any]] = None, use_rpn: bool = True,
                              strict: bool = True, device: Union[str, torch.device] = "cpu",
                              act: Optional[str] = None, autoregressive: Optional[bool] = None
                              ) -> tuple[TransformerRegionDetector, LoadReport]:
    """Build and load a transformer region detector from an OpenAI / open_clip CLIP ViT file or a zero-shot-branch
    checkpoint (ViT / Swin / DaViT / FocalNet), plus an optional detectron2 RPN file.

    The file's text-tower keys are set aside (listed in the report's ``ignored``): the text tower is built by
    :func:`load_transformer_text_tower` when names are embedded.

    Args:
        act: ViT MLP activation override (``"gelu"`` for open_clip's non-OpenAI ViT weights; the shapes cannot tell).
        autoregressive: the text tower's option (:func:`load_transformer_text_tower`); not used by the detector.
    Raises:
        CheckpointError: not such a file, or (``strict``) missing / unexpected / mismatched keys.
    """
    source = "<state dict>" if isinstance(weights, Mapping) else str(weights)
    sd = dict(weights) if isinstance(weights, Mapping) else load_state_dict(weights)
    del autoregressive  # the text tower's option (load_transformer_text_tower)
    layout = transformer_layout(sd)
    if layout == "openai_vit":
        trunk_sd, det_sd, text_sd, ignored, unexpected = split_openai_vit_state_dict(sd)
        trunk: Trunk = build_vit_trunk(trunk_sd, layout="openai", act=act)
        det_sd.update({"backbone.trunk." + k: v for k, v in trunk_sd.items()})
        ignored += sorted(text_sd)  # the text tower: load_transformer_text_tower
    elif layout == "branch":
        split = split_branch_state_dict(sd)
        trunk, trunk_sd, unexpected = _branch_trunk(split, act)
        det_sd = {**split.detector, **trunk_sd}
        ignored, unexpected = list(split.ignored), unexpected + split.unexpected
        ignored += sorted(k for k in det_sd if k.startswith("text_encoder."))  # load_transformer_text_tower
        det_sd = {k: v for k, v in det_sd.items() if not k.startswith("text_encoder.")}
    else:
        raise CheckpointError(f"{source} is not a transformer region-encoder checkpoint (no visual.transformer.* "
                              "CLIP ViT and no zero-shot-branch ViT/Swin/DaViT/FocalNet backbone.* keys)")
    if "backbone.image_projection" not in det_sd:
        raise CheckpointError(f"{source} has no image projection (image_projection / visual.proj): region features "
                              "cannot be compared with text embeddings without it; it is not a CLIP-style checkpoint")
    if strict and unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} keys this model does not define, e.g. "
                              f"{unexpected[:5]}; pass strict=False (--non-strict) to load anyway")
    rpn, rpn_sd, rpn_src = _rpn(det_sd, rpn_weights, use_rpn, rpn_overrides)
    encoder = TransformerRegionEncoder(trunk, int(det_sd["backbone.image_projection"].shape[1]))
    det = TransformerRegionDetector(encoder, rpn)
    det_sd = {k: v for k, v in det_sd.items() if not k.startswith("rpn.")}
    det_sd.update({"rpn." + k: v for k, v in rpn_sd.items()})
    # a file without a logit scale still classifies (CLIP's initial scale)
    report = load_into(det, det_sd, strict=strict, source=", ".join(x for x in (source, rpn_src) if x),
                       ignored=ignored, allow_missing=["logit_scale"])
    report.unexpected += unexpected
    if "logit_scale" not in det_sd:
        report.ignored.append("(no logit_scale in the file: using CLIP's initial log(1/0.07))")
    return det.eval().to(device), report


def _rpn(det_sd: Mapping[str, Tensor], rpn_weights: Optional[PathLike], use_rpn: bool,
         overrides: Optional[dict[str, Any]]) -> tuple[Optional[nn.Module], dict[str, Tensor], str]:
    """The offline RPN (a separate file overrides ``offline_*`` keys of the checkpoint, as the original)."""
    if not use_rpn:
        return None, {}, ""
    if rpn_weights is not None:
        rpn_sd, _ = rpn_state_dict_from_checkpoint(load_state_dict(rpn_weights))
        if not rpn_sd:
            raise CheckpointError(f"{rpn_weights} has no 'backbone.*' / 'proposal_generator.*' keys: not a "
                                  "detectron2 RPN checkpoint")
        src = str(rpn_weights)
    else:
        rpn_sd = {k[len("rpn."):]: v for k, v in det_sd.items() if k.startswith("rpn.")}
        src = "offline_* keys" if rpn_sd else ""
    if not rpn_sd:
        return None, {}, ""
    return build_offline_rpn(infer_rpn_config(rpn_sd, **(overrides or {}))), rpn_sd, src


# How the branch's files spell the non-trunk weights (docs/DESIGN.md#zero-shot-branch lists one rule group per family's checkpoints)
BRANCH_SPELLINGS: dict[str, dict[str, str]] = {
    "swin": {"trunk": "image_encoder.", "text": "text_encoder.", "proj": "text_projection", "scale": "logit_scale"},
    "focalnet": {"trunk": "backbone.", "text": "lang_encoder.lang_encoder.", "proj": "lang_encoder.lang_proj",
                 "scale": "lang_encoder.logit_scale"},
    "vit": {"trunk": "backbone.", "text": "lang_encoder.", "proj": "lang_projection", "scale": "logit_scale"},
    "model": {"trunk": "backbone.", "text": "roi_heads.box_predictor.lang_encoder.lang_encoder.",
              "proj": "roi_heads.box_predictor.lang_encoder.lang_proj",
              "scale": "roi_heads.box_predictor.lang_encoder.logit_scale"},
}


def export_branch_state_dict(det: TransformerRegionDetector, spelling: str = "model", *,
                             text_tower: Optional[UniCLTextEncoder] = None) -> dict[str, Tensor]:
    """Our detector's weights (and ``text_tower``'s, the UniCL text keys) in the zero-shot branch's layout
    (timm-layout trunk, ``image_projection``), spelled as one of :data:`BRANCH_SPELLINGS` (``"model"`` = the branch
    model's own state-dict names). Loading the result with :func:`load_transformer_detector` /
    :func:`load_transformer_text_tower` gives back the same detector / text tower."""
    names = BRANCH_SPELLINGS[spelling]
    sd = {**det.state_dict(), **({"text_encoder." + k: v for k, v in text_tower.state_dict().items()}
                                 if text_tower is not None else {})}
    trunk = {k[len("backbone.trunk."):]: v for k, v in sd.items() if k.startswith("backbone.trunk.")}
    if isinstance(det.backbone.trunk, VisionTransformerTrunk):
        trunk = ours_to_timm_vit(trunk)
    else:
        trunk = {k[len("model."):]: v for k, v in trunk.items()}
    out = {names["trunk"] + k: v for k, v in trunk.items()}
    out["image_projection"] = sd["backbone.image_projection"]
    out[names["scale"]] = sd["logit_scale"]
    for k, v in sd.items():
        if k.startswith("text_encoder.lang_encoder."):
            out[names["text"] + k[len("text_encoder.lang_encoder."):]] = v
        elif k == "text_encoder.lang_proj":
            out[names["proj"]] = v
    return out
