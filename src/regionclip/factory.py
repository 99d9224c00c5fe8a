"""Builders: config -> modules, and released files -> a ready detector."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint.io import CheckpointError, LoadReport, load_into, load_state_dict
from .checkpoint.regionclip import (SplitCheckpoint, describe_checkpoint, infer_clip_resnet_config,
                                    split_regionclip_state_dict)
from .config import DetectorConfig, PostprocessConfig, RPNConfig
from .modeling.clip_resnet import ModifiedResNet
from .modeling.detector import RegionCLIPDetector
from .modeling.heads import MaskHead

PathLike = Union[str, os.PathLike]

FINETUNED_TEST = PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100, soft_nms="gaussian",
                                   apply_box_deltas=True)


def build_detector(cfg: DetectorConfig) -> RegionCLIPDetector:
    """Build an (uninitialised) detector from a config. Weights are loaded separately (:func:`load_detector`)."""
    c = cfg.clip
    backbone = ModifiedResNet(c.layers, c.embed_dim, c.heads, c.image_resolution, c.width)
    rpn = None
    if cfg.rpn is not None:
        from .modeling.rpn import build_offline_rpn

        rpn = build_offline_rpn(cfg.rpn)
    bbox_pred = nn.Linear(c.embed_dim, 4) if cfg.box_regression else None
    if bbox_pred is not None:
        nn.init.normal_(bbox_pred.weight, std=0.001)
        nn.init.zeros_(bbox_pred.bias)
    mask_head = MaskHead(c.res5_channels) if cfg.mask_head else None
    return RegionCLIPDetector(backbone, rpn, bbox_pred=bbox_pred, mask_head=mask_head, input_cfg=cfg.input,
                              postprocess_cfg=cfg.postprocess, pooler_resolution=c.pooler_resolution,
                              sampling_ratio=cfg.pooler_sampling_ratio, temperature=cfg.temperature,
                              region_chunk_size=cfg.region_chunk_size)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_detector` found besides the detector weights."""

    report: LoadReport
    split: SplitCheckpoint
    config: Optional[DetectorConfig]  # None for transformer region encoders


def load_detector(weights: PathLike, rpn_weights: Optional[PathLike] = None, *,
                  postprocess: Optional[PostprocessConfig] = None, rpn_overrides: Optional[dict[str, Any]] = None,
                  use_rpn: bool = True, strict: bool = True, device: Union[str, torch.device] = "cpu",
                  region_chunk_size: int = 256, transformer_options: Optional[dict[str, Any]] = None
                  ) -> tuple[RegionCLIPDetector, LoadedCheckpoint]:
    """Build a detector whose architecture is read off the checkpoint's shapes, and load it.

    Load order of the original (spec §3.5, §3.8): the RegionCLIP file first, then the RPN file, which replaces
    only the offline RPN (nothing else is touched). RN50 vs RN50x4, FPN vs C4 and the LSJ RPN head are detected
    from tensor shapes; the user never passes DEPTH / TEXT_EMB_DIM / pooler flags. Transformer region encoders
    (OpenAI / open_clip CLIP ViT, zero-shot-branch ViT / Swin / DaViT / FocalNet, spec §11) are recognised from their
    keys and built by :func:`regionclip.modeling.transformer.build.load_transformer_detector` (``config`` is None);
    ``transformer_options`` (``act``, ``autoregressive``) go to it — what a file's shapes cannot tell.
    """
    sd = load_state_dict(weights)
    from .checkpoint.zeroshot_branch import transformer_layout

    if transformer_layout(sd) is not None:  # OpenAI/open_clip ViT or a zero-shot-branch ViT/Swin/DaViT/FocalNet
        from .modeling.transformer.build import load_transformer_detector

        tdet, treport = load_transformer_detector(sd, rpn_weights, postprocess=postprocess, rpn_overrides=rpn_overrides,
                                                  use_rpn=use_rpn, strict=strict, device=device,
                                                  region_chunk_size=region_chunk_size, **(transformer_options or {}))
        treport.source = str(weights) + treport.source.replace("<state dict>", "")
        return tdet, LoadedCheckpoint(treport, SplitCheckpoint(), None)
    if transformer_options:
        raise ValueError(f"{weights} is a CLIP ResNet checkpoint; transformer options ({', '.join(transformer_options)}) "
                         "only apply to ViT / Swin / DaViT / FocalNet checkpoints")
    openai_ignored: list[str] = []
    if any(k.startswith("visual.attnpool.") for k in sd) and not any(k.startswith("backbone.") for k in sd):
        # an OpenAI CLIP ResNet state dict (or *_OAI_CLIP file): the plain-CLIP region-classification baseline.
        # Explicit rename table (checkpoint.openai_clip): visual.* -> backbone.*, text keys -> lang_encoder.*
        from .checkpoint.openai_clip import split_clip_state_dict

        parts = split_clip_state_dict(sd, str(weights))
        if parts.unknown and strict:
            raise CheckpointError(f"{weights}: OpenAI CLIP file with keys no rule covers: {parts.unknown[:5]}")
        sd = {**{"backbone." + k: v for k, v in parts.image.items()},
              **{"lang_encoder." + k: v for k, v in parts.text.items()}}
        openai_ignored = parts.ignored + parts.unknown
    if not any(k.startswith("backbone.attnpool.") for k in sd):
        raise CheckpointError(f"{weights} is {describe_checkpoint(sd)}, not a RegionCLIP checkpoint with a CLIP ResNet "
                              "under 'backbone.*' (e.g. regionclip_pretrained-cc_rn50.pth) nor an OpenAI CLIP ResNet "
                              "state dict (visual.*). TorchScript CLIP archives: see `regionclip embed-concepts "
                              "--allow-jit` or convert them to a state dict first.")
    split = split_regionclip_state_dict(sd)
    clip_cfg = infer_clip_resnet_config(sd)

    rpn_sd, rpn_source, rpn_ignored = {}, "", []
    if use_rpn:
        from .modeling.rpn import rpn_state_dict_from_checkpoint

        if rpn_weights is not None:
            raw = load_state_dict(rpn_weights)
            rpn_sd, rpn_ignored = rpn_state_dict_from_checkpoint(raw)
            if not rpn_sd:
                raise CheckpointError(f"{rpn_weights} has no 'backbone.*' / 'proposal_generator.*' keys: it is "
                                      f"{describe_checkpoint(raw)}, not a detectron2 RPN checkpoint")
            rpn_source = str(rpn_weights)
        else:  # the README custom-image command runs the RPN stored inside the RegionCLIP checkpoint
            rpn_sd = {k[len("rpn."):]: v for k, v in split.detector.items() if k.startswith("rpn.")}
            rpn_source = f"{weights} (offline_* keys)" if rpn_sd else ""
    # the RPN file overrides offline_* weights of the main checkpoint
    det_sd = {k: v for k, v in split.detector.items() if not k.startswith("rpn.")}
    rpn_cfg: Optional[RPNConfig] = None
    if rpn_sd:
        from .modeling.rpn import infer_rpn_config

        rpn_cfg = infer_rpn_config(rpn_sd, **(rpn_overrides or {}))
        det_sd.update({"rpn." + k: v for k, v in rpn_sd.items()})

    if postprocess is None:
        # no preset: a fine-tuned detector (it has bbox_pred) gets the test settings of the original's transfer
        # scripts (class-agnostic regression + gaussian soft-NMS, spec §8.5); a pretrained one the zero-shot ones
        postprocess = FINETUNED_TEST if "bbox_pred.weight" in det_sd else PostprocessConfig()
    cfg = DetectorConfig(clip=clip_cfg, rpn=rpn_cfg, postprocess=postprocess,
                         box_regression="bbox_pred.weight" in det_sd, mask_head="mask_head.deconv.weight" in det_sd,
                         region_chunk_size=region_chunk_size)
    detector = build_detector(cfg)
    ignored = list(split.set_aside) + openai_ignored + [f"{rpn_weights}:{k}" for k in rpn_ignored]
    if split.unexpected:
        ignored_unexp = split.unexpected
        if strict:
            raise CheckpointError(f"{weights} has {len(ignored_unexp)} keys RegionCLIP does not define, e.g. "
                                  f"{ignored_unexp[:5]}; pass strict=False (--non-strict) to load anyway")
    report = load_into(detector, det_sd, strict=strict, source=", ".join(x for x in (str(weights), rpn_source) if x),
                       ignored=ignored)
    report.unexpected += split.unexpected
    detector.eval().to(device)
    if split.test_class_embeddings is not None or split.train_class_embeddings is not None:
        emb = split.test_class_embeddings if split.test_class_embeddings is not None else split.train_class_embeddings
        detector.set_vocabulary(emb, source=f"{weights} (roi_heads.box_predictor embeddings)")
    return detector, LoadedCheckpoint(report, split, cfg)
