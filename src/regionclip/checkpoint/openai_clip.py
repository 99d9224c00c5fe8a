"""OpenAI CLIP (and RegionCLIP) weight files -> our image tower (ModifiedResNet) and text tower.

Handled inputs (docs/DESIGN.md#checkpoints):

* OpenAI CLIP state dicts (``visual.*`` + top-level text keys ``token_embedding.weight``, ``transformer.*``,
  ...), e.g. ``torch.jit.load("RN50.pt").state_dict()`` saved with ``torch.save``, or open_clip's
  ``*-quickgelu`` OpenAI weights. fp16 tensors are converted to float32.
* RegionCLIP checkpoints (``{'model': {...}}`` with ``backbone.*`` and ``lang_encoder.*``), including the
  pretraining-init ``*_OAI_CLIP.pth`` files, whatever mix of the two spellings they use.
* OpenAI's original downloads are **TorchScript archives**, which ``torch.load(weights_only=True)`` refuses
  because loading them runs code stored in the file. They are read with ``torch.jit.load`` only when the
  caller passes ``allow_jit=True`` (CLI: ``--allow-jit``). Otherwise convert once, in a trusted session::

      python -c "import torch; torch.save(torch.jit.load('RN50.pt', map_location='cpu').state_dict(), 'RN50_sd.pth')"

Renaming is an explicit table (:data:`RENAME_RULES`); keys deliberately dropped are listed in
:data:`IGNORED_KEYS` / :data:`IGNORED_PREFIXES` and reported, never silently skipped.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor

from .io import CheckpointError, PathLike, read_weight_file, state_dict_from

# (source prefix or exact key, tower, target prefix). First match wins, so `visual.` claims
# `visual.attnpool.positional_embedding` before the exact text key `positional_embedding` is tried.
RENAME_RULES: tuple[tuple[str, str, str], ...] = (
    ("visual.", "image", ""),  # OpenAI / open_clip CLIP
    ("backbone.", "image", ""),  # RegionCLIP (student) recognition backbone
    ("lang_encoder.", "text", ""),  # RegionCLIP text encoder
    ("token_embedding.", "text", "token_embedding."),  # OpenAI text keys live at the top level
    ("positional_embedding", "text", "positional_embedding"),
    ("transformer.", "text", "transformer."),
    ("ln_final.", "text", "ln_final."),
    ("text_projection", "text", "text_projection"),
)
# Keys that are not weights of either tower (scalars of the CLIP object, buffers) or that belong to other
# RegionCLIP modules; they are reported as ignored.
IGNORED_KEYS = frozenset({"logit_scale", "input_resolution", "context_length", "vocab_size", "attn_mask"})
IGNORED_PREFIXES = ("teacher_backbone.", "offline_backbone.", "offline_proposal_generator.", "roi_heads.")
_EXACT = {"positional_embedding", "text_projection"}


@dataclass
class ClipStateDicts:
    """A checkpoint split into tower state dicts whose keys equal our module names."""

    image: dict[str, Tensor] = field(default_factory=dict)
    text: dict[str, Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # keys no rule and no ignore entry covers
    source: str = ""


def is_torchscript_archive(path: PathLike) -> bool:
    """True for a TorchScript zip (it holds ``code/`` and ``constants.pkl``; a ``torch.save`` zip does not)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_clip_checkpoint(path: PathLike, *, allow_jit: bool = False) -> dict[str, Tensor]:
    """Read a weight file (``.pth``/``.pt``/``.safetensors``, or a TorchScript archive with ``allow_jit``).

    ``.pth`` files are memory-mapped, so reading only the text tower of a 400 MB RegionCLIP checkpoint
    touches only those bytes.

    Raises:
        CheckpointError: a TorchScript archive without ``allow_jit``, or an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file not found: {path}")
    if is_torchscript_archive(path):
        if not allow_jit:
            raise CheckpointError(
                f"{path} is a TorchScript archive (OpenAI's original CLIP download). Loading it executes code "
                "stored in the file, so it is refused by default. If you trust the file, pass --allow-jit "
                "(allow_jit=True); or convert it once to a plain state dict with: python -c \"import torch; "
                f"torch.save(torch.jit.load('{path.name}', map_location='cpu').state_dict(), 'clip_sd.pth')\"")
        module = torch.jit.load(str(path), map_location="cpu")
        return {k: v for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        return state_dict_from(load_file(str(path), device="cpu"), path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) pickles cannot be mmapped; io gives the clear error for bad files

        obj = read_weight_file(path)
    return state_dict_from(obj, path)


def split_clip_state_dict(sd: Mapping[str, Tensor], source: str = "") -> ClipStateDicts:
    """Apply :data:`RENAME_RULES` to every key; tensors are converted to float32 (OpenAI files are fp16).

    Raises:
        CheckpointError: a CLIP ViT image tower (only ModifiedResNet RN50/RN50x4 is supported), or two source
            keys that map to the same tower key with different values.
    """
    out = ClipStateDicts(source=source)
    if any(k.startswith("visual.transformer.") for k in sd):
        raise CheckpointError(f"{source or 'checkpoint'} holds a CLIP ViT image tower (visual.transformer.*); "
                              "only the ModifiedResNet towers (RN50, RN50x4) used by RegionCLIP are supported")
    for key, value in sd.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith("num_batches_tracked"):
            out.ignored.append(key)
            continue
        for src, tower, dst in RENAME_RULES:
            if key == src if src in _EXACT else key.startswith(src):
                target = dst + key[len(src):]
                bucket = out.image if tower == "image" else out.text
                if target in bucket:
                    if not torch.equal(bucket[target], value.float()):
                        raise CheckpointError(f"{source}: two different tensors map to {tower} key {target!r} "
                                              f"(one of them is {key!r}); the file mixes two models")
                    out.ignored.append(key)  # e.g. an *_OAI_CLIP file with both visual.* and backbone.*
                else:
                    bucket[target] = value.float()
                break
        else:
            out.unknown.append(key)
    return out


def text_state_dict(sd: Mapping[str, Tensor], source: str = "") -> dict[str, Tensor]:
    """Only the text-tower weights of a RegionCLIP or OpenAI CLIP state dict (keys = our module names).

    Raises:
        CheckpointError: the file has no text tower (e.g. a RegionCLIP fine-tuned checkpoint).
    """
    text = split_clip_state_dict(sd, source).text
    if not text:
        raise CheckpointError(
            f"{source or 'checkpoint'} has no CLIP text-encoder weights (no lang_encoder.* and no OpenAI text "
            "keys). Fine-tuned RegionCLIP checkpoints do not carry the text encoder: pass the pretrained "
            "checkpoint of the same backbone (regionclip_pretrained-cc_rn50.pth / -cc_rn50x4.pth) or an OpenAI "
            "CLIP RN50 / RN50x4 file, or use precomputed concept embeddings instead")
    return text
