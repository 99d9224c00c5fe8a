"""Query embeddings for region search: text (the checkpoint's text tower, the classification prompt procedure), an
image region (the RoI head, as the indexed regions were embedded), or a saved [D] tensor.

All return a [D] float32 L2-normalised vector; :meth:`RegionIndex.check_queries` then checks its width.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..api import RegionCLIP
from ..predictor import RegionPredictor
from ..text.name_cache import checkpoint_fingerprint
from .features import weights_fingerprint_of

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


def normalize(v: Tensor) -> Tensor:
    """[D] or [1, D] -> [D] float32 unit vector (a zero / non-finite vector is an error)."""
    if not (v.ndim == 1 or (v.ndim == 2 and v.shape[0] == 1)):
        raise ValueError(f"expected one query embedding ([D] or [1, D]), got shape {tuple(v.shape)}")
    v = v.detach().float().reshape(-1)
    n = v.norm()
    if not torch.isfinite(v).all() or n == 0:
        raise ValueError("the query embedding is zero or not finite")
    return v / n


def load_query_embedding(path: PathLike) -> Tensor:
    """A [D] (or [1, D]) tensor saved with ``torch.save`` / safetensors (first tensor) -> [D] unit vector."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"query embedding file not found: {p}")
    if p.suffix == ".safetensors":
        tensors = load_file(str(p))
        if len(tensors) != 1:
            raise ValueError(f"{p} holds {len(tensors)} tensors; save exactly one [D] query embedding")
        t = next(iter(tensors.values()))
    else:
        t = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(t, dict) and len(t) == 1:
            t = next(iter(t.values()))
    if not isinstance(t, Tensor):
        raise ValueError(f"{p} holds a {type(t).__name__}, expected a [D] tensor (torch.save(vector, path))")
    return normalize(t)


def load_model(weights: PathLike, device: str = "cpu", **kwargs: Any) -> Any:
    """``RegionCLIP.from_pretrained(weights)`` without an RPN (queries need only the text tower / RoI head)."""
    return RegionCLIP.from_pretrained(weights, device=device, **kwargs)


def check_same_checkpoint(model: Any, source_meta: dict[str, Any]) -> None:
    """Warn when the query model is not the checkpoint the regions were extracted with (same width but a different
    embedding space gives meaningless similarities; a different width is refused later by the index)."""
    recorded = weights_fingerprint_of(source_meta)
    wpath = getattr(model, "weights_path", None)
    if not recorded or wpath is None:
        return
    if checkpoint_fingerprint(wpath)[:len(recorded)] != recorded:
        logger.warning("query checkpoint %s differs from the one the regions were extracted with (%s); "
                       "similarities are only meaningful within one checkpoint's embedding space",
                       wpath, source_meta.get("model"))


def embed_text(model: Any, text: str) -> Tensor:
    """[D] unit embedding of ``text`` with the model's text tower and the classification prompt ensemble."""
    if not text.strip():
        raise ValueError("the text query is empty")
    return normalize(model.embed_names([text])[0])


def parse_box(spec: Union[str, Sequence[float]]) -> list[float]:
    """``"x1,y1,x2,y2"`` (original pixels) -> 4 floats; raises on anything else."""
    vals = [float(v) for v in spec.replace(" ", "").split(",")] if isinstance(spec, str) else [float(v) for v in spec]
    if len(vals) != 4:
        raise ValueError(f"a box is x1,y1,x2,y2 (4 numbers), got {spec!r}")
    if not (vals[2] > vals[0] and vals[3] > vals[1]):
        raise ValueError(f"box {vals} is empty: need x2 > x1 and y2 > y1 (XYXY original pixels)")
    return vals


def embed_image_region(model: Any, image: Any, box: Optional[Sequence[float]] = None) -> Tensor:
    """[D] unit embedding of ``box`` (XYXY original pixels; None: the whole image) of ``image`` (path / PIL /
    array), computed by the RoI head exactly as the indexed regions were."""
    p = RegionPredictor(model)
    p.set_image(image)
    if box is None:
        h, w = p.original_size  # the whole image as one region
        box = [0.0, 0.0, float(w), float(h)]
    return normalize(p.encode_boxes([list(box)], normalize=True)[0])
