"""The one builder: configs -> modules, and weight files -> a ready model (docs/DESIGN.md#loading).

Nothing else in the package builds a detector or a text tower from a file: :func:`load_detector` builds the
detector of either family (CLIP ResNet or transformer, dispatching on :func:`checkpoint_kind`), and
:func:`load_text_tower` the text tower of either family; no detector holds its text tower. The pieces:

* :mod:`regionclip.checkpoint` holds the pure dict -> dict converters (rename tables, RPN key conversion, the
  zero-shot branch and OpenAI layouts) and the architecture read off tensor shapes;
* this package builds the modules and loads them strictly, with a :class:`~regionclip.checkpoint.io.LoadReport`;
  :mod:`regionclip.factory.transformer` does it for ViT / Swin / DaViT / FocalNet files and
  :mod:`regionclip.factory.clip_towers` for both towers of an OpenAI CLIP file.

The post-processing / RPN settings a checkpoint is run with are not chosen here: :func:`checkpoint_kind` tells
:mod:`regionclip.inference.presets` what kind of file it is and the preset layer resolves the settings once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoint.io import CheckpointError, LoadReport, load_into, load_state_dict
from ..checkpoint.openai_clip import read_clip_checkpoint, split_clip_state_dict, text_state_dict
from ..checkpoint.regionclip import (
    SplitCheckpoint,
    describe_checkpoint,
    infer_clip_resnet_config,
    split_regionclip_state_dict,
)
from ..checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from ..checkpoint.zeroshot_branch import transformer_layout
from ..config import DetectorConfig, RPNConfig
from ..modeling.clip_resnet import ModifiedResNet
from ..modeling.detector import RegionCLIPDetector
from ..modeling.heads import MaskHead
from ..modeling.recognizer import TEXT_PROCEDURE_REGIONCLIP, TEXT_PROCEDURE_ZEROSHOT_BRANCH, RegionRecognizer
from ..modeling.rpn import build_offline_rpn
from .clip_towers import build_text_tower
from .transformer import load_transformer_detector, load_transformer_text_tower

PathLike = Union[str, os.PathLike]
StateDictOrPath = Union[PathLike, Mapping[str, Tensor]]

# What kind of file a checkpoint is; the preset layer picks the original's scenario for it.
KIND_PRETRAINED = "pretrained"  # RegionCLIP pretrained (or an OpenAI CLIP ResNet): zero-shot settings
KIND_FINETUNED_COCO = "finetuned-coco"  # box regression, COCO base/all embeddings: the COCO OVD test settings
KIND_FINETUNED_LVIS = "finetuned-lvis"  # box regression (+ mask head), LVIS embeddings: the LVIS test settings
KIND_TRANSFORMER = "transformer"  # ViT / Swin / DaViT / FocalNet (zero-shot branch, OpenAI / open_clip ViT)
LVIS_EMBEDDING_ROWS = (866, 1203, 337, 1230)  # LVIS base / all (v1) and the v0.5 tables


def build_detector(cfg: DetectorConfig) -> RegionCLIPDetector:
    """Build an (uninitialised) detector from a config. Weights are loaded separately (:func:`load_detector`)."""
    c = cfg.clip
    backbone = ModifiedResNet(c.layers, c.embed_dim, c.heads, c.image_resolution, c.width)
    rpn = build_offline_rpn(cfg.rpn) if cfg.rpn is not None else None
    bbox_pred = nn.Linear(c.embed_dim, 4) if cfg.box_regression else None
    if bbox_pred is not None:
        nn.init.normal_(bbox_pred.weight, std=0.001)
        nn.init.zeros_(bbox_pred.bias)
    mask_head = MaskHead(c.res5_channels) if cfg.mask_head else None
    return RegionCLIPDetector(backbone, rpn, bbox_pred=bbox_pred, mask_head=mask_head,
                              pooler_resolution=c.pooler_resolution, sampling_ratio=cfg.pooler_sampling_ratio,
                              temperature=cfg.temperature, pixel_mean=cfg.input.pixel_mean,
                              pixel_std=cfg.input.pixel_std)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_detector` found besides the detector weights."""

    report: LoadReport
    split: SplitCheckpoint
    config: Optional[DetectorConfig]  # None for transformer region encoders
    kind: str = KIND_PRETRAINED
    weights: Optional[Path] = None  # the file, when loaded from one (the text tower / cache key need it)
    rpn_config: Optional[RPNConfig] = None
    # fine-tuned files carry their test-class (else training-class) embeddings: [K, D] or None
    class_embeddings: Optional[Tensor] = None
    notes: list[str] = field(default_factory=list)

    @property
    def text_procedure(self) -> str:
        """How names are embedded for this checkpoint (``regionclip.modeling.recognizer.TEXT_PROCEDURE_*``)."""
        return TEXT_PROCEDURE_ZEROSHOT_BRANCH if self.kind == KIND_TRANSFORMER else TEXT_PROCEDURE_REGIONCLIP


def read_checkpoint(weights: StateDictOrPath) -> dict[str, Tensor]:
    """The state dict of a weight file (``weights_only``; safetensors or torch), or ``weights`` itself."""
    return dict(weights) if isinstance(weights, Mapping) else load_state_dict(weights)


def checkpoint_kind(sd: Mapping[str, Tensor]) -> str:
    """Which of the original's model kinds ``sd`` is (see the ``KIND_*`` constants)."""
    if transformer_layout(sd) is not None:
        return KIND_TRANSFORMER
    if "roi_heads.box_predictor.bbox_pred.weight" not in sd:
        return KIND_PRETRAINED
    if any(k.startswith("roi_heads.mask_head.") for k in sd):
        return KIND_FINETUNED_LVIS
    emb = sd.get("roi_heads.box_predictor.test_cls_score.weight", sd.get("roi_heads.box_predictor.cls_score.weight"))
    if emb is not None and int(emb.shape[0]) in LVIS_EMBEDDING_ROWS:
        return KIND_FINETUNED_LVIS
    return KIND_FINETUNED_COCO


def load_detector(weights: StateDictOrPath, rpn_weights: Optional[PathLike] = None, *,
                  rpn_overrides: Optional[Mapping[str, Any]] = None, use_rpn: bool = True, strict: bool = True,
                  device: Union[str, torch.device] = "cpu", transformer_options: Optional[Mapping[str, Any]] = None
                  ) -> tuple[RegionRecognizer, LoadedCheckpoint]:
    """Build a detector whose architecture is read off the checkpoint's shapes, and load it.

    Load order of the original (docs/DESIGN.md#loading): the RegionCLIP file first, then the RPN file, which
    replaces only the offline RPN (nothing else is touched). RN50 vs RN50x4, FPN vs C4 and the LSJ RPN head are
    detected from tensor shapes; the user never passes DEPTH / TEXT_EMB_DIM / pooler flags. Transformer region
    encoders are recognised from their keys and built by :func:`regionclip.factory.transformer.load_transformer_detector`;
    ``transformer_options`` (``act``, ``autoregressive``) go to it — what a file's shapes cannot tell.

    Args:
        weights: a path or an already read state dict.
        rpn_overrides: :class:`~regionclip.config.RPNConfig` fields the file cannot tell (NMS threshold, top-k).
        use_rpn: False builds no RPN even when one is available (user-box mode only).
    Raises:
        CheckpointError: not a supported file, or (``strict``) keys that have no place in the model.
    """
    source = "<state dict>" if isinstance(weights, Mapping) else str(weights)
    sd = read_checkpoint(weights)
    kind = checkpoint_kind(sd)
    # one builder per family, the same contract: (detector in eval mode on `device`, what the file held besides)
    build = _load_transformer if kind == KIND_TRANSFORMER else _load_clip_resnet
    detector, loaded = build(sd, kind, source, rpn_weights, dict(rpn_overrides or {}), use_rpn, strict, device,
                             dict(transformer_options or {}))
    loaded.weights = None if isinstance(weights, Mapping) else Path(weights)
    return detector, loaded


def _load_transformer(sd: dict[str, Tensor], kind: str, source: str, rpn_weights: Optional[PathLike],
                      rpn_overrides: dict[str, Any], use_rpn: bool, strict: bool, device: Union[str, torch.device],
                      transformer_options: dict[str, Any]) -> tuple[RegionRecognizer, LoadedCheckpoint]:
    """:func:`load_detector` for ViT / Swin / DaViT / FocalNet files (:mod:`regionclip.factory.transformer`)."""
    det, report = load_transformer_detector(sd, rpn_weights, rpn_overrides=rpn_overrides, use_rpn=use_rpn,
                                            strict=strict, device=device, **transformer_options)
    report.source = source + report.source.replace("<state dict>", "")
    return det, LoadedCheckpoint(report, SplitCheckpoint(), None, kind, None, getattr(det.rpn, "cfg", None))


def _load_clip_resnet(sd: dict[str, Tensor], kind: str, source: str, rpn_weights: Optional[PathLike],
                      rpn_overrides: dict[str, Any], use_rpn: bool, strict: bool, device: Union[str, torch.device],
                      transformer_options: dict[str, Any]) -> tuple[RegionRecognizer, LoadedCheckpoint]:
    """:func:`load_detector` for RegionCLIP / OpenAI CLIP ResNet files."""
    if transformer_options:
        raise ValueError(f"{source} is a CLIP ResNet checkpoint; transformer options ({', '.join(transformer_options)}) "
                         "only apply to ViT / Swin / DaViT / FocalNet checkpoints")
    sd, openai_ignored = _openai_to_regionclip(sd, source, strict)
    if not any(k.startswith("backbone.attnpool.") for k in sd):
        raise CheckpointError(f"{source} is {describe_checkpoint(sd)}, not a RegionCLIP checkpoint with a CLIP ResNet "
                              "under 'backbone.*' (e.g. regionclip_pretrained-cc_rn50.pth) nor an OpenAI CLIP ResNet "
                              "state dict (visual.*). TorchScript CLIP archives: see `regionclip embed-concepts "
                              "--allow-jit` or convert them to a state dict first.")
    split = split_regionclip_state_dict(sd)
    if split.unexpected and strict:
        raise CheckpointError(f"{source} has {len(split.unexpected)} keys RegionCLIP does not define, e.g. "
                              f"{split.unexpected[:5]}; pass strict=False (--non-strict) to load anyway")
    rpn_sd, rpn_source, rpn_ignored = _rpn_state_dict(split, source, rpn_weights) if use_rpn else ({}, "", [])
    det_sd = {k: v for k, v in split.detector.items() if not k.startswith("rpn.")}
    rpn_cfg: Optional[RPNConfig] = None
    if rpn_sd:  # the RPN file overrides offline_* weights of the main checkpoint
        rpn_cfg = infer_rpn_config(rpn_sd, **rpn_overrides)
        det_sd.update({"rpn." + k: v for k, v in rpn_sd.items()})
    cfg = DetectorConfig(clip=infer_clip_resnet_config(sd), rpn=rpn_cfg, box_regression="bbox_pred.weight" in det_sd,
                         mask_head="mask_head.deconv.weight" in det_sd)
    detector = build_detector(cfg)
    ignored = list(split.set_aside) + openai_ignored + [f"{rpn_weights}:{k}" for k in rpn_ignored]
    report = load_into(detector, det_sd, strict=strict, source=", ".join(x for x in (source, rpn_source) if x),
                       ignored=ignored)
    report.unexpected += split.unexpected
    detector.eval().to(device)
    emb = split.test_class_embeddings if split.test_class_embeddings is not None else split.train_class_embeddings
    return detector, LoadedCheckpoint(report, split, cfg, kind, None, rpn_cfg, emb)

def load_text_tower(weights: StateDictOrPath, *, allow_jit: bool = False, strict: bool = True,
                    device: Optional[Union[str, torch.device]] = None,
                    transformer_options: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The text tower of a checkpoint of either family, built from the file and loaded (float32, eval mode).

    CLIP-ResNet files (RegionCLIP ``lang_encoder.*``, OpenAI CLIP): a :class:`~regionclip.modeling.text_encoder.
    CLIPTextTransformer` whose widths (RN50: 512/1024, RN50x4: 640/640) are read off the shapes. Transformer files:
    :func:`regionclip.factory.transformer.load_transformer_text_tower` (``transformer_options``: ``autoregressive``,
    ``act``, as given to :func:`load_detector`).

    Args:
        allow_jit: read an OpenAI TorchScript archive (executes code stored in the file).
        device: where to put the tower (default: the CPU).
    Raises:
        CheckpointError: unreadable file, no text weights (e.g. a fine-tuned RegionCLIP file), or shapes that do
            not form a text tower.
        ValueError: a transformer file without a text tower.
    """
    source = "<state dict>" if isinstance(weights, Mapping) else str(weights)
    sd = dict(weights) if isinstance(weights, Mapping) else read_clip_checkpoint(weights, allow_jit=allow_jit)
    tower: nn.Module
    if checkpoint_kind(sd) == KIND_TRANSFORMER:
        tower = load_transformer_text_tower(sd, strict=strict, source=source, **dict(transformer_options or {}))
    elif transformer_options:
        raise ValueError(f"{source} is a CLIP ResNet checkpoint; transformer options "
                         f"({', '.join(transformer_options)}) only apply to ViT / Swin / DaViT / FocalNet checkpoints")
    else:
        tower = build_text_tower(text_state_dict(sd, source=source), strict=strict, source=source)
    return tower.to(device) if device is not None else tower


def _openai_to_regionclip(sd: dict[str, Tensor], source: str, strict: bool) -> tuple[dict[str, Tensor], list[str]]:
    """An OpenAI CLIP ResNet state dict (the plain-CLIP baseline) in RegionCLIP key names, through the explicit
    rename table of :mod:`regionclip.checkpoint.openai_clip`; other files unchanged."""
    if not (any(k.startswith("visual.attnpool.") for k in sd) and not any(k.startswith("backbone.") for k in sd)):
        return sd, []
    parts = split_clip_state_dict(sd, source)
    if parts.unknown and strict:
        raise CheckpointError(f"{source}: OpenAI CLIP file with keys no rule covers: {parts.unknown[:5]}")
    renamed = {**{"backbone." + k: v for k, v in parts.image.items()},
               **{"lang_encoder." + k: v for k, v in parts.text.items()}}
    return renamed, parts.ignored + parts.unknown


def _rpn_state_dict(split: SplitCheckpoint, source: str, rpn_weights: Optional[PathLike]
                    ) -> tuple[dict[str, Tensor], str, list[str]]:
    """(RPN state dict, where it came from, dropped keys): the RPN file if given, else the ``offline_*`` keys of
    the RegionCLIP checkpoint (the README custom-image command runs those)."""
    if rpn_weights is not None:
        raw = load_state_dict(rpn_weights)
        rpn_sd, rpn_ignored = rpn_state_dict_from_checkpoint(raw)
        if not rpn_sd:
            raise CheckpointError(f"{rpn_weights} has no 'backbone.*' / 'proposal_generator.*' keys: it is "
                                  f"{describe_checkpoint(raw)}, not a detectron2 RPN checkpoint")
        return rpn_sd, str(rpn_weights), rpn_ignored
    rpn_sd = {k[len("rpn."):]: v for k, v in split.detector.items() if k.startswith("rpn.")}
    return rpn_sd, (f"{source} (offline_* keys)" if rpn_sd else ""), []
