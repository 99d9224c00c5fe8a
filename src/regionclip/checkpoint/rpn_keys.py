"""Checkpoint helpers for the offline RPN: key filtering and architecture detection from shapes. docs/DESIGN.md#architecture.5.

Users never pass architecture flags: :func:`infer_rpn_config` reads FPN vs C4, the LSJ variant, the trunk
(detectron2 ResNet or CLIP ResNet) and all widths off the state dict.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from regionclip.config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, RPNConfig

__all__ = ["rpn_state_dict_from_checkpoint", "infer_rpn_config"]

_PREFIXES = ("backbone.", "proposal_generator.")
# The FPN bottom-up trunk is recognised by its key names (no flags):
#   detectron2 ResNet  backbone.bottom_up.stem.conv1.weight, backbone.bottom_up.res2.0.conv1.weight, ...
#   CLIP ResNet        backbone.bottom_up.conv1.weight, backbone.bottom_up.layer1.0.conv1.weight, ...
# (rpn_lvis_1203_clipbackbone, the original's build_clip_resnet_fpn_backbone). No key is renamed for either:
# OfflineRPN's FPN holds the CLIP trunk as regionclip.modeling.clip_resnet's own ModifiedResNet modules, whose
# names are the original's (conv1..3 / bn1..3 stem, layer1..4 with downsample."0"/"1", FrozenBN buffers).
_CLIP_TRUNK = "backbone.bottom_up."
_CLIP_STEM_KEY = _CLIP_TRUNK + "conv1.weight"
_OFFLINE_PREFIXES = ("offline_backbone.", "offline_proposal_generator.")


def rpn_state_dict_from_checkpoint(sd: Mapping[str, Any]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Keep the RPN part of a checkpoint's state dict, renamed to :class:`OfflineRPN` keys.

    * detectron2 RPN files (``rpn_*.pth``): ``backbone.*`` and ``proposal_generator.*`` are kept as they are;
      ``roi_heads.*``, ``pixel_mean`` etc. are dropped.
    * RegionCLIP checkpoints: ``offline_backbone.*`` / ``offline_proposal_generator.*`` are renamed to
      ``backbone.*`` / ``proposal_generator.*``. Their plain ``backbone.*`` is the CLIP ResNet, not the RPN,
      so whenever ``offline_*`` keys are present every non-offline key is dropped.
    * ``num_batches_tracked`` (SyncBN checkpoints, e.g. ``rpn_lvis_866_lsj.pth``) is dropped: it does not
      affect inference and :class:`OfflineRPN` has no such buffer.
    * A leading ``module.`` (DistributedDataParallel) is stripped, as fvcore does.
    * A ``{'model': state_dict}`` container is unwrapped.

    Args:
        sd: a state dict (or a detectron2 container with a ``"model"`` entry).

    Returns:
        (state dict for ``OfflineRPN.load_state_dict(strict=True)``, sorted list of dropped original keys).
    """
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    stripped = {(k[len("module."):] if k.startswith("module.") else k): (k, v) for k, v in sd.items()}
    has_offline = any(k.startswith(_OFFLINE_PREFIXES) for k in stripped)
    kept: Dict[str, Tensor] = {}
    ignored: List[str] = []
    for key, (orig, value) in stripped.items():
        if has_offline:
            new = key[len("offline_"):] if key.startswith(_OFFLINE_PREFIXES) else None
        else:
            new = key if key.startswith(_PREFIXES) else None
        if new is None or new.endswith(".num_batches_tracked") or not isinstance(value, Tensor):
            ignored.append(orig)
            continue
        kept[new] = value
    return kept, sorted(ignored)


def _count_blocks(sd: Mapping[str, Tensor], trunk: str, stage: int) -> int:
    pat = re.compile(re.escape(f"{trunk}res{stage}.") + r"(\d+)\.conv1\.weight$")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if ids and ids != set(range(len(ids))):
        raise ValueError(f"non-contiguous blocks in {trunk}res{stage}: {sorted(ids)}")
    return len(ids)


def _count_clip_blocks(sd: Mapping[str, Tensor], stage: int) -> int:
    pat = re.compile(re.escape(f"{_CLIP_TRUNK}layer{stage}.") + r"(\d+)\.conv1\.weight$")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"non-contiguous blocks in {_CLIP_TRUNK}layer{stage}: {sorted(ids)}")
    return len(ids)


def _clip_trunk_fields(sd: Mapping[str, Tensor]) -> Dict[str, Any]:
    """RPNConfig fields of an FPN RPN on a CLIP ResNet trunk: layers and width off the shapes, and the input the
    original feeds it (the offline config mask_rcnn_CLIP_R_50_FPN_1x.yaml: RGB, CLIP mean/std on 0..1 values)."""
    layers = tuple(_count_clip_blocks(sd, s) for s in range(1, 5))
    if 0 in layers:
        raise ValueError(f"missing CLIP ResNet stage in {_CLIP_TRUNK}layer1..4: blocks per stage {layers}")
    for k in ("conv2.weight", "conv3.weight", "layer1.0.conv1.weight"):
        if _CLIP_TRUNK + k not in sd:
            raise ValueError(f"CLIP ResNet trunk without {_CLIP_TRUNK + k}: an incomplete checkpoint")
    width = int(sd[_CLIP_TRUNK + "conv3.weight"].shape[0])  # the 3-conv stem ends at the trunk width
    if int(sd[_CLIP_STEM_KEY].shape[0]) * 2 != width:
        raise ValueError(f"{_CLIP_STEM_KEY} has {int(sd[_CLIP_STEM_KEY].shape[0])} channels; a CLIP ResNet stem "
                         f"of width {width} has {width // 2}")
    return {"trunk": "clip", "resnet_layers": layers, "stem_out_channels": width, "width_per_group": width,
            "res2_out_channels": 4 * width, "input_format": "RGB", "pixel_mean": CLIP_PIXEL_MEAN,
            "pixel_std": CLIP_PIXEL_STD}


def infer_rpn_config(sd: Mapping[str, Any], **overrides: Any) -> RPNConfig:
    """Detect the offline RPN architecture from a state dict and return its :class:`RPNConfig`.

    * FPN vs C4: ``backbone.fpn_lateral*`` keys present -> FPN (p2..p6, pre-NMS top-k 1000 per level, size
      divisibility 32); ``backbone.stem.*`` -> C4 (res4, pre-NMS top-k 6000, no padding multiple).
    * LSJ (``rpn_lvis_866_lsj``): a 2-conv RPN head (``rpn_head.conv.conv0``) or FPN convs with a norm
      instead of a bias.
    * CLIP trunk (``rpn_lvis_1203_clipbackbone``): ``backbone.bottom_up.conv1.weight`` (the CLIP 3-conv stem)
      instead of ``backbone.bottom_up.stem.*`` -> ``trunk="clip"`` with the original's input for it: RGB, CLIP
      mean/std applied to 0..1 values.
    * Widths/depths from tensor shapes; the number of cell anchors is checked against the anchor settings.

    Args:
        sd: RPN state dict; raw checkpoints (``offline_*`` keys, ``{'model': ...}``) are accepted too.
        **overrides: :class:`RPNConfig` fields to set on top (e.g. ``nms_thresh=0.9, post_nms_topk=1000``).

    Raises:
        ValueError: unknown override, or a state dict that is not a supported detectron2 RPN.
    """
    sd, _ = rpn_state_dict_from_checkpoint(sd)
    names = {f.name for f in dataclasses.fields(RPNConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown RPNConfig field(s): {unknown}")

    clip_trunk = _CLIP_STEM_KEY in sd or any(k.startswith(_CLIP_TRUNK + "layer1.") for k in sd)
    if any(k.startswith("backbone.fpn_lateral") for k in sd):
        arch, trunk = "fpn", "backbone.bottom_up."
    elif "backbone.stem.conv1.weight" in sd:
        arch, trunk = "c4", "backbone."
    elif any(k.startswith("backbone.bottom_up.") for k in sd):
        raise ValueError("state dict has a bottom-up trunk (backbone.bottom_up.*) but no FPN "
                         "(backbone.fpn_lateral*): an incomplete FPN RPN checkpoint")
    else:
        raise ValueError("state dict holds no detectron2 RPN backbone (no backbone.fpn_lateral* / "
                         "backbone.stem.* keys)")
    head = "proposal_generator.rpn_head."
    if head + "objectness_logits.weight" not in sd:
        raise ValueError("state dict holds no RPN head (proposal_generator.rpn_head.*)")

    two_conv_head = head + "conv.conv0.weight" in sd
    fpn_norm = arch == "fpn" and "backbone.fpn_lateral2.norm.weight" in sd
    if arch == "c4" and two_conv_head:
        raise ValueError("unsupported offline RPN: C4 trunk with a multi-conv RPN head")
    if arch == "fpn" and two_conv_head != fpn_norm:
        raise ValueError("unsupported offline RPN: 2-conv RPN head and normed FPN must come together (LSJ)")
    if two_conv_head and head + "conv.conv2.weight" in sd:
        raise ValueError("unsupported offline RPN: more than two RPN head convs")
    if clip_trunk and two_conv_head:
        raise ValueError("unsupported offline RPN: CLIP ResNet trunk with a normed FPN / 2-conv head (LSJ)")

    fields: Dict[str, Any]
    if clip_trunk:
        fields = _clip_trunk_fields(sd)
    else:
        n_stages = 4 if arch == "fpn" else 3
        layers = tuple(_count_blocks(sd, trunk, s) for s in range(2, 2 + n_stages))
        if 0 in layers:
            raise ValueError(f"missing ResNet stage in {trunk}: blocks per stage {layers}")
        fields = {
            "lsj": two_conv_head,
            "resnet_layers": layers,
            "stem_out_channels": int(sd[trunk + "stem.conv1.weight"].shape[0]),
            "width_per_group": int(sd[trunk + "res2.0.conv1.weight"].shape[0]),
            "res2_out_channels": int(sd[trunk + "res2.0.conv3.weight"].shape[0]),
        }
    if arch == "fpn":
        fields["fpn_out_channels"] = int(sd["backbone.fpn_lateral2.weight"].shape[0])
        cfg = RPNConfig.fpn(**fields)
    else:
        cfg = RPNConfig.c4(**fields)
    cfg = dataclasses.replace(cfg, **overrides)

    num_anchors = int(sd[head + "objectness_logits.weight"].shape[0])
    per_level = len(cfg.aspect_ratios) * (1 if arch == "fpn" else len(cfg.anchor_sizes))
    if num_anchors != per_level:
        raise ValueError(f"RPN head predicts {num_anchors} anchors per location but the anchor settings "
                         f"give {per_level} (sizes {cfg.anchor_sizes}, ratios {cfg.aspect_ratios})")
    return cfg
