"""Typed, explicit configuration dataclasses.

Every module under ``regionclip.modeling`` receives plain constructor arguments; only the ``build_*``
functions read these configs. There is no global config and no string registry. ``from_dict`` rejects unknown
keys so a typo in a YAML file is an error, not a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Type, TypeVar

import yaml

T = TypeVar("T")

CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, on 0..1 values
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
CAFFE_PIXEL_MEAN = (103.530, 116.280, 123.675)  # BGR, on 0..255 values (detectron2 default)
CAFFE_PIXEL_STD = (1.0, 1.0, 1.0)


def from_dict(cls: Type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a dict; unknown keys raise ``ValueError`` naming the key."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) for {cls.__name__}: {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    hints = _resolved_types(cls)
    for k, v in data.items():
        tp = hints.get(k)
        sub = _dataclass_in(tp)
        if sub is not None and isinstance(v, dict):
            v = from_dict(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def read_yaml_mapping(path: Any, sections: str) -> dict[str, Any]:
    """A recipe file's top-level mapping (empty file -> {}); anything else is a ``ValueError`` naming ``sections``."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping with sections {sections}")
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _resolved_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - only on exotic annotations
        return {}


def _dataclass_in(tp: Any) -> Optional[type]:
    if tp is None:
        return None
    # resolved annotations are classes, never dataclass instances: the isinstance check only narrows the type
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


@dataclass(frozen=True)
class ClipResNetConfig:
    """CLIP ModifiedResNet (recognition branch). docs/DESIGN.md#architecture.1."""

    layers: Tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    embed_dim: int = 1024  # attnpool output = joint embedding dim (TEXT_EMB_DIM)
    heads: int = 32  # attnpool heads = 32*width/64
    image_resolution: int = 224  # CLIP input size; attnpool grid = image_resolution // 32

    @property
    def attnpool_grid(self) -> int:
        return self.image_resolution // 32

    @property
    def pooler_resolution(self) -> int:
        # res5's first block halves the RoI map, and attnpool has no positional-embedding interpolation,
        # so the RoIAlign output must be exactly 2x the attnpool grid (14 for RN50, 18 for RN50x4).
        return 2 * self.attnpool_grid

    @property
    def res4_channels(self) -> int:
        return self.width * 16

    @property
    def res5_channels(self) -> int:
        return self.width * 32

    @classmethod
    def rn50(cls) -> "ClipResNetConfig":
        return cls()

    @classmethod
    def rn50x4(cls) -> "ClipResNetConfig":
        return cls(layers=(4, 6, 10, 6), width=80, embed_dim=640, heads=40, image_resolution=288)


@dataclass(frozen=True)
class ClipTextConfig:
    """CLIP text transformer (``lang_encoder``). docs/DESIGN.md#architecture.5."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    embed_dim: int = 1024

    @classmethod
    def rn50(cls) -> "ClipTextConfig":
        return cls()

    @classmethod
    def rn50x4(cls) -> "ClipTextConfig":
        return cls(width=640, heads=10, embed_dim=640)


@dataclass(frozen=True)
class RPNConfig:
    """Offline detectron2 RPN (localization branch). docs/DESIGN.md#offline-rpn."""

    arch: str = "fpn"  # "fpn" (R50-FPN, p2..p6) or "c4" (R50-C4, res4)
    lsj: bool = False  # rpn_lvis_866_lsj: SyncBN-as-frozen-norm, FPN convs without bias, 2-conv head
    # FPN bottom-up trunk: "resnet" (detectron2 R50) or "clip" (CLIP ModifiedResNet, rpn_lvis_1203_clipbackbone:
    # RGB input, pixel_mean/std on 0..1 values, docs/DESIGN.md#offline-rpn)
    trunk: str = "resnet"
    pre_nms_topk: int = 1000  # per FPN level (FPN) / per image (C4)
    post_nms_topk: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 0.0
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    input_format: str = "BGR"
    pixel_mean: Tuple[float, float, float] = CAFFE_PIXEL_MEAN
    pixel_std: Tuple[float, float, float] = CAFFE_PIXEL_STD
    size_divisibility: int = 32  # 32 for FPN, 0 for C4
    # Trunk / head widths (R50 defaults; read off the checkpoint by infer_rpn_config, small in unit tests).
    resnet_layers: Tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage res2..; C4 uses the first three
    stem_out_channels: int = 64
    width_per_group: int = 64  # res2 bottleneck width, doubled per stage
    res2_out_channels: int = 256  # doubled per stage
    fpn_out_channels: int = 256

    @classmethod
    def fpn(cls, **kw: Any) -> "RPNConfig":
        return cls(**{"arch": "fpn", "pre_nms_topk": 1000, "size_divisibility": 32, **kw})

    @classmethod
    def c4(cls, **kw: Any) -> "RPNConfig":
        return cls(**{"arch": "c4", "pre_nms_topk": 6000, "size_divisibility": 0, **kw})


@dataclass(frozen=True)
class PostprocessConfig:
    """Per-image post-processing of region scores. docs/DESIGN.md#architecture.6-4.7."""

    score_thresh: float = 0.001
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    # How the RPN objectness enters the score: "none"; "raw" = sqrt(p * logit) exactly as the original's
    # MULTIPLY_RPN_SCORE (negative logits -> NaN -> proposal dropped; scores may exceed 1); "sigmoid" =
    # sqrt(p * sigmoid(logit)), what the original most likely intended (documented option, not faithful).
    rpn_score: str = "none"
    soft_nms: Optional[str] = None  # None, "gaussian", "linear" or "hard"
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001
    # MODEL.CLIP.VIS: report the probabilities before RPN multiplication (selection still used the
    # multiplied scores). Ignored with soft-NMS, as in the original.
    report_unmultiplied_scores: bool = False
    apply_box_deltas: bool = False  # class-agnostic regression (fine-tuned checkpoints); never in GT mode


@dataclass(frozen=True)
class InputConfig:
    """Test-time preprocessing. docs/DESIGN.md#architecture.1."""

    min_size: int = 800
    max_size: int = 1333
    pixel_mean: Tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: Tuple[float, float, float] = CLIP_PIXEL_STD


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to build a :class:`regionclip.modeling.detector.RegionCLIPDetector`."""

    clip: ClipResNetConfig = field(default_factory=ClipResNetConfig)
    rpn: Optional[RPNConfig] = None  # None: GT/user-box mode only
    input: InputConfig = field(default_factory=InputConfig)
    temperature: float = 0.01  # MODEL.CLIP.CLSS_TEMP
    box_regression: bool = False  # bbox_pred present (fine-tuned checkpoints)
    mask_head: bool = False  # LVIS fine-tuned class-agnostic mask head
    pooler_sampling_ratio: int = 0
