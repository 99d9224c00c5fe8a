"""Reading and writing weight files, and strict loading with a report.

Everything goes through ``torch.load(..., weights_only=True)`` or safetensors; nothing executes pickled code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A weight file that is not what the caller expected (wrong kind, wrong shapes, unreadable)."""


def read_weight_file(path: PathLike) -> Any:
    """Load a ``.pth``/``.pt``/``.bin`` (``weights_only=True``) or ``.safetensors`` file onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, a pickled object that needs code execution, ...
        raise CheckpointError(
            f"could not read {path} as a PyTorch weight file with weights_only=True ({type(e).__name__}: {e}). "
            "If it is an OpenAI CLIP TorchScript archive, pass it to regionclip.checkpoint.openai_clip instead; "
            "otherwise re-download the file.") from e


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
    from ..utils import atomic_path

    if metadata is not None and Path(path).suffix != ".safetensors":
        raise ValueError(f"metadata is only stored in .safetensors files, not {Path(path).suffix}")
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in obj.items()}, str(tmp), metadata=metadata)
        else:
            torch.save(obj, str(tmp))
    return Path(path)


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
