"""Concept-embedding files (docs/DESIGN.md#class-embeddings): [N, D] class embeddings as a weight file.

``.pth`` = a bare float32 tensor [N, D] (what the original's ``TEXT_EMB_PATH`` loads); ``.safetensors`` =
``{"embeddings": [N, D]}``. Difference from the original: it squeezed [N, 1, D] and so wrote a [D] tensor when
N = 1; we always write [N, D]. :func:`load_concept_embeddings` accepts [D] (-> [1, D]) and the zero-shot branch's
[N, 1, D] as well. Computing them is :func:`regionclip.text.embeddings.concept_embeddings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .io import CheckpointError, PathLike, read_weight_file, save_file_atomic

SAFETENSORS_KEY = "embeddings"


def save_concept_embeddings(embeddings: Tensor, path: PathLike) -> Path:
    """Write [N, D] atomically: ``.pth`` as a bare tensor, ``.safetensors`` as ``{"embeddings": ...}``.

    Unlike the original, N = 1 is written as [1, D], not [D].
    """
    if embeddings.dim() != 2:
        raise ValueError(f"concept embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    emb = embeddings.detach().to("cpu", torch.float32).contiguous()
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_file_atomic({SAFETENSORS_KEY: emb}, path)
    return save_file_atomic(emb, path)


def load_concept_embeddings(path: PathLike, expected_dim: Optional[int] = None) -> Tensor:
    """Read a concept-embedding file (ours or the original's) -> float32 Tensor[N, D] on the CPU.

    Accepts a bare tensor [N, D], [D] (the original's single-concept file), [N, 1, D] (zero-shot branch), or a
    dict / safetensors file holding exactly one tensor (or an ``"embeddings"`` entry).

    Raises:
        CheckpointError: anything else, or D != ``expected_dim`` when given.
    """
    obj = read_weight_file(path)
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if SAFETENSORS_KEY in tensors:
            obj = tensors[SAFETENSORS_KEY]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise CheckpointError(f"{path}: expected one embedding tensor, found keys {sorted(tensors)[:8]}")
    if not isinstance(obj, Tensor):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not an embedding tensor")
    emb = obj.float()
    if emb.dim() == 1:
        emb = emb[None]  # the original's extraction squeezed a single concept to [D]
    elif emb.dim() == 3 and emb.shape[1] == 1:
        emb = emb[:, 0]
    if emb.dim() != 2:
        raise CheckpointError(f"{path}: concept embeddings must be [N, D] (or [D], [N, 1, D]); got "
                              f"{tuple(obj.shape)}")
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise CheckpointError(f"{path}: embeddings have dimension {emb.shape[1]} but the model expects "
                              f"{expected_dim} (RN50 = 1024, RN50x4 = 640); regenerate them with the matching "
                              "checkpoint (regionclip embed-concepts --weights ...)")
    return emb


__all__ = ["SAFETENSORS_KEY", "load_concept_embeddings", "save_concept_embeddings"]
