"""Read-only access to the region-feature store of ``regionclip extract-regions`` (``engine/extract.py``).

The store is a folder ``shards/shard-NNNNN.safetensors`` (+ ``index.json``). Each shard is one atomic file whose
safetensors header metadata ``regionclip`` holds ``{"format", "meta", "images": [{key, file_name, start, count,
width, height, ...}]}``; its tensors are the rows of those images concatenated: ``boxes`` [R, 4] XYXY original
pixels, ``feats`` [R, D] raw attnpool embeddings, optionally ``objectness`` [R], ``scores`` [R], ``classes`` [R].

This module only reads shards directly (never ``index.json``, which the extractor rewrites after every shard and
may lag behind a shard that was just renamed into place), so the search index sees exactly the complete shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open

PathLike = Union[str, os.PathLike]
STORE_FORMAT = "regionclip-regions/1"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard: its file name, header (``meta`` + ``images``) and a fingerprint of that header."""

    name: str
    path: Path
    header: dict[str, Any]
    fingerprint: str  # sha256 of size, mtime and header JSON

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.get("meta", {})

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.header.get("images", [])

    @property
    def num_regions(self) -> int:
        return sum(int(im["count"]) for im in self.images)


def list_shards(features_dir: PathLike) -> list[ShardInfo]:
    """The complete shards of a feature store, in name order (hidden ``.tmp`` leftovers are ignored).

    Raises:
        FileNotFoundError: the folder has no ``shards/`` (not an ``extract-regions`` output).
        ValueError: a shard is not of this store format.
    """
    shard_dir = Path(features_dir) / "shards"
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"{features_dir} is not a region-feature folder (no shards/ inside); create one "
                                "with `regionclip extract-regions IMAGES -o FEATURES_DIR`")
    out = []
    for f in sorted(shard_dir.iterdir()):
        if not _SHARD_RE.match(f.name):
            continue
        try:
            with safe_open(str(f), framework="np") as sf:
                raw = (sf.metadata() or {}).get("regionclip")
        except Exception as e:  # SafetensorError: truncated or damaged (shards are written atomically: a bad copy)
            raise ValueError(damaged_shard_message(f, e)) from None
        if raw is None:
            raise ValueError(f"{f} has no 'regionclip' header metadata: not written by regionclip extract-regions")
        header = json.loads(raw)
        if header.get("format") != STORE_FORMAT:
            raise ValueError(f"{f} is in format {header.get('format')!r}; this version reads {STORE_FORMAT!r}")
        st = f.stat()  # size + mtime + header: a shard rewritten under the same name (--overwrite) is noticed
        fp = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{raw}".encode()).hexdigest()
        out.append(ShardInfo(f.name, f, header, fp))
    return out


def read_shard(shard: ShardInfo, fields: tuple[str, ...] = ("boxes", "feats", "objectness", "scores", "classes")
               ) -> dict[str, np.ndarray]:
    """The named tensors of a shard that exist, as numpy arrays (``feats`` in its stored dtype, as float32 when
    it was stored as bfloat16, which numpy lacks)."""
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(shard.path), framework="pt") as sf:
            keys = set(sf.keys())
            for k in fields:
                if k in keys:
                    t = sf.get_tensor(k)
                    if t.dtype.is_floating_point and t.dtype not in (torch.float16, torch.float32):
                        t = t.float()  # bfloat16 has no numpy dtype
                    out[k] = t.numpy()
    except Exception as e:  # SafetensorError: changed or damaged since it was listed
        raise ValueError(damaged_shard_message(shard.path, e)) from None
    return out


def damaged_shard_message(path: Path, error: Exception) -> str:
    return (f"{path} is truncated or damaged ({type(error).__name__}: {error}); extract-regions writes shards "
            "atomically, so this is a bad copy or a disk fault: restore the file, or extract the folder again "
            "(regionclip extract-regions ... --overwrite)")


def feats_dim(shard: ShardInfo) -> int:
    """D of a shard's ``feats`` [R, D], read from the header only."""
    with safe_open(str(shard.path), framework="np") as sf:
        return int(sf.get_slice("feats").get_shape()[1])


def load_store_index(features_dir: PathLike) -> Optional[dict[str, Any]]:
    """``index.json`` of the store (for ``class_names``), or None when absent."""
    p = Path(features_dir) / "index.json"
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def weights_of(meta: dict[str, Any]) -> Optional[str]:
    """The checkpoint path recorded in a store's meta ``model`` (``"PATH#fingerprint[+rpn:...]"``), or None."""
    model = str(meta.get("model") or "")
    if not model:
        return None
    return model.split("+rpn:")[0].split("#")[0] or None


def weights_fingerprint_of(meta: dict[str, Any]) -> Optional[str]:
    """The 16-hex checkpoint fingerprint recorded in meta ``model`` (``PATH#fp``), or None."""
    model = str(meta.get("model") or "").split("+rpn:")[0]
    return model.split("#", 1)[1] if "#" in model else None
