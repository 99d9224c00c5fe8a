"""Any supported weight file -> tensors + the metadata needed to load it without guessing (``regionclip convert``).

Pure functions (dict -> dict): reading and writing files is :mod:`regionclip.checkpoint.io`'s job and the file-level
conversion is :func:`regionclip.weights.hub.convert_file`. Keys are kept exactly as the original file spells them (after
unwrapping a ``{'model': ...}`` container and a DDP ``module.`` prefix, which every loader does anyway), so the
existing loaders read a converted file unchanged; the metadata only *describes* what the shapes already say, plus
what they cannot say (class names, where the file came from and its sha256). docs/DESIGN.md#checkpoints.

Metadata (safetensors header, all strings; JSON where structured):

==============================  ================================================================================
``format``                      ``pt`` (the Hugging Face convention for torch safetensors files)
``regionclip.format``           ``regionclip`` | ``rpn`` | ``class-embeddings`` | ``openai-clip`` | ``transformer``
``regionclip.format_version``   ``1``
``regionclip.architecture``     ``RN50``, ``RN50x4``, ... (CLIP ResNets; from the shapes)
``regionclip.embed_dim``        region / text embedding width (1024 RN50, 640 RN50x4)
``regionclip.clip_config``      JSON :class:`~regionclip.config.ClipResNetConfig`
``regionclip.rpn``              ``fpn`` | ``c4`` | ``lsj`` | ``clip-fpn`` | ``none`` (the RPN in the file)
``regionclip.rpn_config``       JSON :class:`~regionclip.config.RPNConfig` as read off the file
``regionclip.checkpoint_kind``  :func:`regionclip.factory.checkpoint_kind` (``pretrained``, ``finetuned-coco`` ...)
``regionclip.num_classes``      rows of the class embeddings (embedding files, fine-tuned detectors)
``regionclip.class_names``      JSON list, row i = name i (when given at conversion)
``regionclip.category_ids``     JSON list of dataset category ids (when given)
``regionclip.source_file``      name of the converted file; ``regionclip.source_sha256`` its sha256
==============================  ================================================================================
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor

from ..config import ClipResNetConfig, to_dict
from .io import CheckpointError, PathLike, read_metadata, state_dict_from
from .regionclip import describe_checkpoint, infer_clip_resnet_config
from .rpn_keys import infer_rpn_config
from .zeroshot_branch import transformer_layout

FORMAT_VERSION = "1"
EMBEDDINGS_KEY = "embeddings"  # the one tensor of a class-embedding safetensors file (as embed-concepts writes it)
FORMATS = ("regionclip", "rpn", "class-embeddings", "openai-clip", "transformer")
PREFIX = "regionclip."
# (layers, width, embed_dim) of the OpenAI CLIP ResNets -> their names
_CLIP_RESNETS: dict[tuple[tuple[int, ...], int, int], str] = {
    ((3, 4, 6, 3), 64, 1024): "RN50",
    ((4, 6, 10, 6), 80, 640): "RN50x4",
    ((3, 4, 23, 3), 64, 512): "RN101",
    ((6, 8, 18, 8), 96, 768): "RN50x16",
    ((3, 15, 36, 10), 128, 1024): "RN50x64",
}


def architecture_name(cfg: ClipResNetConfig) -> str:
    """``RN50`` / ``RN50x4`` / ... for the OpenAI CLIP ResNets, else a description with the layers and width."""
    name = _CLIP_RESNETS.get((tuple(cfg.layers), cfg.width, cfg.embed_dim))
    return name or f"CLIP-ResNet(layers={list(cfg.layers)}, width={cfg.width}, embed_dim={cfg.embed_dim})"


def _embedding_tensor(obj: Any) -> Optional[Tensor]:
    """The [K, D] (or [D], [K, 1, D]) tensor of a class-embedding file, or None if ``obj`` is not one."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping) and len(obj) == 1:
        (value,) = obj.values()
        if isinstance(value, Tensor) and value.ndim in (1, 2, 3) and value.is_floating_point():
            return value
    return None


def detect_format(obj: Any) -> str:
    """Which of :data:`FORMATS` a loaded weight file is (``obj``: what ``read_weight_file`` returned).

    Raises:
        CheckpointError: a file none of the loaders accepts (named with what it looks like).
    """
    if _embedding_tensor(obj) is not None:
        return "class-embeddings"
    sd = state_dict_from(obj)
    if transformer_layout(sd) is not None:
        return "transformer"
    if any(k.startswith("backbone.attnpool.") for k in sd):
        return "regionclip"
    if any(k.startswith("visual.attnpool.") for k in sd):
        return "openai-clip"
    if any(k.startswith("proposal_generator.") for k in sd) and any(k.startswith("backbone.") for k in sd):
        return "rpn"
    raise CheckpointError(f"cannot convert {describe_checkpoint(sd)}: supported are RegionCLIP checkpoints "
                          "(backbone.attnpool.*), detectron2 RPN files (backbone.* + proposal_generator.*), class-"
                          "embedding files (one [K, D] tensor), OpenAI CLIP ResNet state dicts (visual.attnpool.*) "
                          "and transformer region-encoder checkpoints")


def converted_tensors(obj: Any, fmt: str) -> dict[str, Tensor]:
    """The tensors to store: the state dict with its keys exactly as in the file, or ``{"embeddings": [K, D]}``.

    Nothing is renamed, cast or dropped except non-tensor entries of a container (training step counters ...);
    that is what lets every existing loader read the converted file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    if fmt == "class-embeddings":
        t = _embedding_tensor(obj)
        if t is None:
            raise CheckpointError("not a class-embedding file: expected one [K, D] tensor")
        return {EMBEDDINGS_KEY: t}
    return state_dict_from(obj)


def _class_rows(tensors: Mapping[str, Tensor], fmt: str) -> Optional[int]:
    if fmt == "class-embeddings":
        t = tensors[EMBEDDINGS_KEY]
        return 1 if t.ndim == 1 else int(t.shape[0])
    emb = tensors.get("roi_heads.box_predictor.test_cls_score.weight",
                      tensors.get("roi_heads.box_predictor.cls_score.weight"))
    return None if emb is None else int(emb.shape[0])


def describe_tensors(tensors: Mapping[str, Tensor], fmt: str) -> dict[str, Any]:
    """Architecture facts read off the shapes: ``architecture``, ``embed_dim``, ``clip_config``, ``rpn``,
    ``rpn_config``, ``num_classes`` (only those that apply to ``fmt``).

    Raises:
        CheckpointError: an RPN the loader does not support (the same reason the loader would give).
    """
    out: dict[str, Any] = {}
    if fmt in ("regionclip", "openai-clip"):
        cfg = infer_clip_resnet_config(tensors, prefix="backbone." if fmt == "regionclip" else "visual.")
        out.update(architecture=architecture_name(cfg), embed_dim=cfg.embed_dim, clip_config=to_dict(cfg))
    if fmt == "transformer":
        out["architecture"] = f"transformer ({transformer_layout(tensors)} layout)"
    if fmt == "rpn" or (fmt == "regionclip" and any(k.startswith("offline_proposal_generator.") for k in tensors)):
        try:
            rcfg = infer_rpn_config(tensors)
        except ValueError as e:
            raise CheckpointError(f"unsupported RPN, not converted: {e}. Supported RPN files: rpn_lvis_866, "
                                  "rpn_lvis_866_lsj, rpn_coco_48 / 65 / 80, rpn_lvis_1203_clipbackbone "
                                  "(docs/WEIGHTS.md)") from e
        out.update(rpn="lsj" if rcfg.lsj else ("clip-fpn" if rcfg.trunk == "clip" else rcfg.arch),
                   rpn_config=to_dict(rcfg))
    elif fmt in ("regionclip", "openai-clip", "transformer"):
        out["rpn"] = "none"
    rows = _class_rows(tensors, fmt)
    if rows is not None:
        out["num_classes"] = rows
    if fmt == "class-embeddings":
        out["embed_dim"] = int(tensors[EMBEDDINGS_KEY].shape[-1])
    return out


def _converter_version() -> str:
    try:
        return "regionclip " + importlib_metadata.version("regionclip")
    except importlib_metadata.PackageNotFoundError:  # running from a source tree without installing
        return "regionclip (source tree)"


def build_metadata(tensors: Mapping[str, Tensor], fmt: str, *, checkpoint_kind: Optional[str] = None,
                   class_names: Optional[Sequence[str]] = None, category_ids: Optional[Sequence[int]] = None,
                   source_file: str = "", source_sha256: Optional[str] = None) -> dict[str, str]:
    """The safetensors metadata of a converted file (see the module docstring for the keys).

    Raises:
        ValueError: ``class_names`` / ``category_ids`` whose count differs from the embedding rows (row i must be
            the embedding of name i), or names for a file without class embeddings.
    """
    facts = describe_tensors(tensors, fmt)
    rows = facts.get("num_classes")
    if class_names is not None:
        if rows is None:
            raise ValueError(f"class names were given but this {fmt} file holds no class embeddings")
        if len(class_names) != rows:
            raise ValueError(f"{len(class_names)} class names for {rows} embedding rows; row i must be the embedding "
                             "of name i (e.g. lvis_1203_cls_emb goes with --names lvis1203)")
    if category_ids is not None and len(category_ids) != (rows or 0):
        raise ValueError(f"{len(category_ids)} category ids for {rows} classes")
    meta = {"format": "pt", PREFIX + "format": fmt, PREFIX + "format_version": FORMAT_VERSION,
            PREFIX + "converter": _converter_version()}
    for key, value in facts.items():
        meta[PREFIX + key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    if checkpoint_kind:
        meta[PREFIX + "checkpoint_kind"] = checkpoint_kind
    if class_names is not None:
        meta[PREFIX + "class_names"] = json.dumps([str(n) for n in class_names], ensure_ascii=False)
    if category_ids is not None:
        meta[PREFIX + "category_ids"] = json.dumps([int(c) for c in category_ids])
    if source_file:
        meta[PREFIX + "source_file"] = source_file
    if source_sha256:
        meta[PREFIX + "source_sha256"] = source_sha256
    return meta


@dataclass(frozen=True)
class WeightsInfo:
    """The parsed ``regionclip.*`` metadata of a converted file (None where the file does not say)."""

    format: str
    architecture: Optional[str] = None
    embed_dim: Optional[int] = None
    rpn: Optional[str] = None
    checkpoint_kind: Optional[str] = None
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    category_ids: Optional[list[int]] = None
    source_file: Optional[str] = None
    source_sha256: Optional[str] = None
    raw: dict[str, str] = field(default_factory=dict)


def parse_metadata(meta: Mapping[str, str]) -> Optional[WeightsInfo]:
    """:class:`WeightsInfo` from a safetensors header's metadata; None for files ``regionclip convert`` did not write.

    Raises:
        CheckpointError: ``regionclip.*`` metadata that is malformed (bad JSON, names / rows disagree).
    """
    fmt = meta.get(PREFIX + "format")
    if fmt is None:
        return None
    try:
        names = json.loads(meta[PREFIX + "class_names"]) if PREFIX + "class_names" in meta else None
        ids = json.loads(meta[PREFIX + "category_ids"]) if PREFIX + "category_ids" in meta else None
        dim = int(meta[PREFIX + "embed_dim"]) if PREFIX + "embed_dim" in meta else None
        rows = int(meta[PREFIX + "num_classes"]) if PREFIX + "num_classes" in meta else None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"malformed regionclip metadata ({e}); re-convert the file with regionclip convert") \
            from e
    if names is not None and (not isinstance(names, list) or (rows is not None and len(names) != rows)):
        raise CheckpointError(f"regionclip.class_names in the metadata has {len(names)} names for {rows} rows")
    return WeightsInfo(format=fmt, architecture=meta.get(PREFIX + "architecture"), embed_dim=dim,
                       rpn=meta.get(PREFIX + "rpn"), checkpoint_kind=meta.get(PREFIX + "checkpoint_kind"),
                       num_classes=rows, class_names=[str(n) for n in names] if names is not None else None,
                       category_ids=[int(c) for c in ids] if ids is not None else None,
                       source_file=meta.get(PREFIX + "source_file"),
                       source_sha256=meta.get(PREFIX + "source_sha256"), raw=dict(meta))


def file_info(path: PathLike) -> Optional[WeightsInfo]:
    """:class:`WeightsInfo` of a weight file (reads only a safetensors header); None for a file without
    ``regionclip.*`` metadata (``.pth`` files, safetensors written by other tools)."""
    return parse_metadata(read_metadata(path))


def class_names_of(path: PathLike) -> tuple[Optional[list[str]], Optional[list[int]]]:
    """(class names, category ids) recorded in a converted class-embedding file, else (None, None). Ids default to
    ``index + 1`` when only names were recorded (the convention of :func:`regionclip.text.vocabulary.resolve_names`)."""
    info = file_info(path)
    if info is None or info.class_names is None:
        return None, None
    ids = info.category_ids or list(range(1, len(info.class_names) + 1))
    return info.class_names, ids
