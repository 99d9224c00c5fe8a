"""Reading and writing weight files, and strict loading with a report.

Everything goes through ``torch.load(..., weights_only=True)`` or safetensors; nothing executes pickled code.
Safetensors files may carry string metadata (:func:`read_metadata`; written by ``regionclip convert``), and any
file can be hashed (:func:`file_sha256`, streamed, cached) and checked against a ``<file>.sha256`` sidecar.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..utils import atomic_path, write_json_atomic

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)
HASH_CHUNK = 1 << 20  # 1 MiB reads: constant memory for any file size
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A weight file that is not what the caller expected (wrong kind, wrong shapes, unreadable)."""


def read_weight_file(path: PathLike) -> Any:
    """Load a ``.pth``/``.pt``/``.bin`` (``weights_only=True``) or ``.safetensors`` file onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file not found: {path}")
    kind = weight_file_kind(path)
    if kind == "safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError: truncated or corrupt header
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); re-download it.") from None
    if kind is None:
        with open(path, "rb") as f:
            head = f.read(24)
        shown = head.decode("utf-8", "replace").splitlines()[0][:24] if head else ""
        what = "it is empty" if not head else f"it starts with {shown!r}: neither a PyTorch archive nor safetensors"
        raise CheckpointError(f"{path} is not a checkpoint file ({what}); expected a .pth/.pt/.bin file saved by "
                              "torch.save, or a .safetensors file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, a pickled object that needs code execution, ...
        raise CheckpointError(_unreadable_message(path, e)) from None


def weight_file_kind(path: Path) -> Optional[str]:
    """What the first bytes say: ``"torch"`` (zip archive, or a legacy pickle), ``"safetensors"`` (8-byte header
    length, then a JSON header) or None (not a weight file at all: text, an image, a shell script...)."""
    with open(path, "rb") as f:
        head = f.read(10)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch.save zip / legacy pickle protocol >= 2
        return "torch"
    if len(head) == 10 and head[8:9] == b"{" and head[7] == 0:  # u64 header length: its top byte is 0
        return "safetensors"
    if path.suffix == ".safetensors" and head:
        return "safetensors"  # a damaged header: let safetensors name the problem
    return None


def _unreadable_message(path: Path, error: Exception) -> str:
    """What to tell a user whose file ``torch.load(weights_only=True)`` refused. PyTorch's own text advises retrying
    with ``weights_only=False`` (running code from the file) - the opposite of what to do with a file of unknown
    origin - so it is not repeated."""
    text = str(error)
    if "Weights only load failed" in text or "weights_only" in text:
        return (f"{path} holds pickled Python objects besides tensors, so reading it could run code from the file; "
                "regionclip reads weight files with weights_only=True and refuses it. A released RegionCLIP, RPN or "
                "embedding file never needs more: re-download it. If you made this file yourself and trust it, "
                "save its state dict instead (torch.save(obj['model'] or obj.state_dict(), 'clean.pth')) or use "
                "`regionclip convert` on a trusted machine; OpenAI's TorchScript CLIP archives are read by "
                "`regionclip embed-concepts --allow-jit`.")
    if isinstance(error, (EOFError, RuntimeError)) and ("zip" in text or "archive" in text or "EOF" in text
                                                       or "Ran out of input" in text):
        return f"{path} is truncated or not a PyTorch weight file ({type(error).__name__}); re-download it."
    return f"could not read {path} as a PyTorch weight file ({type(error).__name__}); re-download it."


def state_dict_from(obj: Any, path: PathLike = "<memory>") -> dict[str, Tensor]:
    """Unwrap the d2/fvcore container (``{'model': state_dict, ...}``) and strip a DDP ``module.`` prefix."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (expected a dict of tensors "
                              "or {'model': state_dict})")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict(path: PathLike) -> dict[str, Tensor]:
    return state_dict_from(read_weight_file(path), path)


def save_file_atomic(obj: Any, path: PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write with ``torch.save`` (or safetensors for ``.safetensors``) to a temp file, then rename: a killed
    process never leaves a half-written file under the final name. ``metadata``: safetensors header strings
    (stored in the same atomic file, so they can never disagree with the tensors)."""
    if metadata is not None and Path(path).suffix != ".safetensors":
        raise ValueError(f"metadata is only stored in .safetensors files, not {Path(path).suffix}")
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            save_file(_untied(obj), str(tmp), metadata=metadata)
        else:
            torch.save(obj, str(tmp))
    return Path(path)


def _untied(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with its own storage: safetensors refuses tensors that share memory (tied weights,
    views of one buffer), which ``torch.load`` reproduces when a checkpoint was saved that way. Copies are made
    only for the second and later users of a storage."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            v = v.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[k] = v
    return out


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header (``{}`` when it has none). Reads only the header,
    not the tensors. Other formats have no metadata: ``{}`` for them too, so callers need no suffix check."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix != ".safetensors":
        return {}

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # truncated / not a safetensors file
        raise CheckpointError(f"could not read the safetensors header of {path} ({type(e).__name__}: {e}); the file "
                              "is truncated or not a safetensors file - re-download or re-convert it") from e


def _hash_cache_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256-cache.json")


def file_sha256(path: PathLike, *, use_cache: bool = True) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory).

    With ``use_cache`` the digest is remembered in a hidden ``.<name>.sha256-cache.json`` next to the file, keyed by
    (resolved path, size, mtime_ns), so a 700 MB checkpoint is hashed once, not on every load. Any change of size or
    modification time re-hashes. A folder that is not writable just means no cache (logged, never an error).
    """
    path = Path(path)
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = _hash_cache_path(path)
    if use_cache and cache.exists():
        try:
            entry = json.loads(cache.read_text(encoding="utf-8"))
            if {k: entry.get(k) for k in key} == key and _SHA256_RE.match(str(entry.get("sha256", ""))):
                return str(entry["sha256"])
        except (OSError, ValueError):
            pass  # unreadable cache: hash again and rewrite it
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        try:
            write_json_atomic({**key, "sha256": digest}, cache)
        except OSError as e:  # read-only weights folder: correct, only slower next time
            logger.debug("could not cache the sha256 of %s in %s: %s", path, cache, e)
    return digest


_CONTENT_DIGESTS: dict[tuple[str, int, int], str] = {}
_DISK_CACHE_MIN = 64 << 20  # smaller files hash in well under a second: no hidden cache file next to them


def content_sha256(path: PathLike) -> str:
    """sha256 of a file's contents for run fingerprints (resume keys): hashed once per process per (file, size,
    mtime), and files of 64 MB and more also cached on disk (:func:`file_sha256`), so a 700 MB checkpoint is read
    once, never per image or per run."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_DIGESTS:
        _CONTENT_DIGESTS[key] = file_sha256(p, use_cache=st.st_size >= _DISK_CACHE_MIN)
    return _CONTENT_DIGESTS[key]


def sha256_sidecar(path: PathLike) -> Path:
    """``<file>.sha256``: the expected hash of ``<file>`` in ``sha256sum`` format (``<hex>  <name>``)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_sha256_sidecar(path: PathLike, digest: Optional[str] = None) -> Path:
    """Record ``path``'s sha256 (computed when not given) in ``<file>.sha256``, atomically. ``sha256sum -c``
    checks it, and :func:`regionclip.weights.pretrained.resolve_weights` verifies it on every load."""
    path = Path(path)
    digest = digest or file_sha256(path)
    out = sha256_sidecar(path)
    with atomic_path(out) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return out


def read_sha256_sidecar(path: PathLike) -> Optional[str]:
    """The expected sha256 recorded in ``<file>.sha256`` (``sha256sum`` format or a bare hex digest), or None."""
    side = sha256_sidecar(path)
    if not side.exists():
        return None
    words = side.read_text(encoding="utf-8").split()
    digest = words[0].lower() if words else ""
    if not _SHA256_RE.match(digest):
        raise CheckpointError(f"{side} does not hold a sha256 hex digest (expected '<64 hex chars>  "
                              f"{Path(path).name}'); fix or delete it")
    return digest


@dataclass
class LoadReport:
    """What happened when a state dict was loaded into a module."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys that got no value
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no model key
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, ckpt shape, model shape
    ignored: list[str] = field(default_factory=list)  # checkpoint keys deliberately not used (documented)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def merge(self, other: "LoadReport") -> "LoadReport":
        return LoadReport(
            source=", ".join(s for s in (self.source, other.source) if s),
            loaded=self.loaded + other.loaded, missing=self.missing + other.missing,
            unexpected=self.unexpected + other.unexpected, mismatched=self.mismatched + other.mismatched,
            ignored=self.ignored + other.ignored)

    def summary(self, max_items: int = 8) -> str:
        def few(xs: Iterable[Any]) -> str:
            xs = list(xs)
            s = ", ".join(str(x) for x in xs[:max_items])
            return s + (f", ... (+{len(xs) - max_items})" if len(xs) > max_items else "")

        lines = [f"loaded {len(self.loaded)} tensors from {self.source or '<state dict>'}"]
        if self.ignored:
            lines.append(f"  ignored (not used by this model) {len(self.ignored)}: {few(self.ignored)}")
        if self.missing:
            lines.append(f"  MISSING {len(self.missing)}: {few(self.missing)}")
        if self.unexpected:
            lines.append(f"  UNEXPECTED {len(self.unexpected)}: {few(self.unexpected)}")
        if self.mismatched:
            lines.append(f"  SHAPE MISMATCH {len(self.mismatched)}: "
                         + few(f"{k} ckpt{list(a)} vs model{list(b)}" for k, a, b in self.mismatched))
        return "\n".join(lines)


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True, source: str = "",
              ignored: Optional[list[str]] = None, allow_missing: Iterable[str] = ()) -> LoadReport:
    """Copy ``state_dict`` into ``module`` by exact name and return a :class:`LoadReport`.

    Shape mismatches are never loaded. With ``strict=True`` any missing (except those listed in
    ``allow_missing``), unexpected or mismatched key raises :class:`CheckpointError` with the full report.
    """
    own = module.state_dict()
    report = LoadReport(source=source, ignored=list(ignored or []))
    allow = set(allow_missing)
    to_load = {}
    for k, v in state_dict.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            to_load[k] = v
    report.missing = [k for k in own if k not in to_load and k not in allow
                      and k not in {m[0] for m in report.mismatched}]
    if strict and not report.ok:
        raise CheckpointError("checkpoint does not fit the model:\n" + report.summary(max_items=12))
    module.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report
