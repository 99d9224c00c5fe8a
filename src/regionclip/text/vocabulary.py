"""Run-time vocabularies: parse ``--vocab``, compute class embeddings with the checkpoint's own text encoder,
cache them on disk.

Cache design
------------
One safetensors file per (checkpoint, settings) under ``cache_dir`` (default ``$REGIONCLIP_CACHE`` or
``~/.cache/regionclip``, sub-folder ``text_embeddings``), holding one row [D] per name, keyed by the sha256 of
the name. A call looks every name up and runs the text encoder only for the missing ones (so editing a
vocabulary re-encodes only the new names), then rewrites the file atomically. The checkpoint is not even read
when every name is cached.

* checkpoint key: a *cheap fingerprint*, sha256 over the file size, its mtime (ns), the first and last MiB and
  32 evenly spaced 64 KiB blocks. Reading ~4 MiB takes milliseconds even for the 715 MB RN50x4 file, where a
  full sha256 takes seconds. Any edit of the file changes its mtime (-> recompute); a copy without preserved
  mtime recomputes once. The sampled blocks guard against two checkpoints with equal size and mtime.
* settings key: sha256 over the templates (exact strings, in order), the averaging mode, the context length
  and a cache format version.
* two processes filling the same file concurrently can only lose each other's new rows (last writer wins),
  never corrupt the file (atomic rename); lost rows are recomputed next time.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from regionclip.assets import BUILTIN_VOCABULARIES, vocabulary as builtin_vocabulary
from regionclip.checkpoint.io import PathLike, save_file_atomic
from regionclip.text.embeddings import AVERAGE_MODES, concept_embeddings, load_text_encoder
from regionclip.text.prompts import resolve_templates, validate_names
from regionclip.text.tokenizer import CONTEXT_LENGTH

_CACHE_VERSION = 1
_MIB = 1 << 20


def default_cache_dir() -> Path:
    """``$REGIONCLIP_CACHE/text_embeddings`` or ``~/.cache/regionclip/text_embeddings``."""
    root = os.environ.get("REGIONCLIP_CACHE") or (Path.home() / ".cache" / "regionclip")
    return Path(root) / "text_embeddings"


def checkpoint_fingerprint(path: PathLike) -> str:
    """Cheap content fingerprint of a weight file (see the module docstring); 64 hex chars."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > _MIB:
            for i in range(32):
                f.seek(st.st_size * i // 32)
                h.update(f.read(64 * 1024))
            f.seek(max(0, st.st_size - _MIB))
            h.update(f.read(_MIB))
    return h.hexdigest()


def _settings_key(templates: Sequence[str], average: str) -> str:
    blob = json.dumps({"v": _CACHE_VERSION, "templates": list(templates), "average": average,
                       "context_length": CONTEXT_LENGTH}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _name_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]


def read_names_file(path: PathLike) -> list[str]:
    """One name per line (UTF-8, stripped). Trailing blank lines are ignored; a blank line in the middle is an
    error because row order defines class indices.

    Raises:
        ValueError: a line that is not valid UTF-8, or a blank line before the last name (file and line named).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # BOM from Windows editors
        raw = raw[3:]
    names: list[str] = []
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start}: "
                             f"{line[max(0, e.start - 10):e.start + 10]!r}); save the file as UTF-8") from None
        text = text.strip()
        if not text:
            raise ValueError(f"{path}, line {lineno}: blank line; every line must hold one class name (row order "
                             "defines class indices, so blank lines are not skipped)")
        names.append(text)
    if not names:
        raise ValueError(f"{path}: no class names (the file is empty)")
    return names


def parse_vocabulary(arg: str) -> list[str]:
    """Turn a ``--vocab`` argument into a list of names.

    Resolution order: a built-in name (``coco65``, ``coco48``, ``coco17``, ``lvis1203``, ``lvis866``; LVIS names
    are the original's prompt names, ``bat_(animal)`` -> ``bat animal``), then an existing text file (one name per
    line, see :func:`read_names_file`), else a comma-separated list (``"car,traffic cone"``; names are stripped).
    Commas inside a name can only be given through a file (the embedding removes them anyway, like the original).

    Raises:
        FileNotFoundError: the argument looks like a path (ends in ``.txt`` or contains a path separator) but
            does not exist.
        ValueError: empty argument, empty entries in a comma list, or a bad file.
    """
    if not arg or not arg.strip():
        raise ValueError("empty vocabulary; give names like 'car,traffic cone', a text file, or one of "
                         + ", ".join(BUILTIN_VOCABULARIES))
    try:
        return builtin_vocabulary(arg.strip())
    except ValueError:
        pass  # not a built-in name
    path = Path(arg).expanduser()
    if path.is_file():
        return read_names_file(path)
    if arg.endswith(".txt") or os.sep in arg or (os.altsep and os.altsep in arg):
        raise FileNotFoundError(f"vocabulary file not found: {arg}")
    names = [n.strip() for n in arg.split(",")]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"vocabulary {arg!r}: empty name at position(s) {empty} (stray comma?)")
    return names


def class_embeddings(names: Sequence[str], weights_path: PathLike, *,
                     templates: Optional[Union[str, Sequence[str], Path]] = None, average: str = "mean",
                     cache_dir: Optional[PathLike] = None, use_cache: bool = True,
                     device: Optional[Union[str, torch.device]] = None, batch_size: int = 256,
                     allow_jit: bool = False, show_progress: bool = False) -> Tensor:
    """Class embeddings for ``names`` computed with the text encoder stored in ``weights_path``, cached.

    Args:
        names: N class names (row i = names[i]); empty names raise, duplicates warn (see
            :func:`regionclip.text.prompts.validate_names`).
        weights_path: a RegionCLIP checkpoint with ``lang_encoder.*`` or an OpenAI CLIP file.
        templates: default the 81 RegionCLIP templates (see :func:`regionclip.text.prompts.resolve_templates`).
        average: ``"mean"`` (original) or ``"normalized"``.
        cache_dir: where cache files live; default :func:`default_cache_dir`.
        use_cache: ``False`` computes everything and touches no cache file.
        device: where the text encoder runs on a cache miss, and where the result is returned (default CPU).
        batch_size: prompts per forward pass.
        allow_jit: allow reading an OpenAI TorchScript archive (runs code from the file).
        show_progress: tqdm bar while encoding.

    Returns:
        float32 Tensor[N, D], unnormalised for ``average="mean"``, exactly like ``regionclip embed-concepts``.
    """
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    names = validate_names(names, source="vocabulary")
    templates = resolve_templates(templates)
    out_device = torch.device(device) if device is not None else torch.device("cpu")
    if not use_cache:
        encoder = load_text_encoder(weights_path, allow_jit=allow_jit, device=device)
        emb = concept_embeddings(names, encoder, templates=templates, average=average, batch_size=batch_size,
                                 show_progress=show_progress)
        return emb.to(out_device)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = f"{checkpoint_fingerprint(weights_path)[:24]}_{_settings_key(templates, average)[:16]}"
    cache_file = root / f"{stem}.safetensors"

    def compute(missing: list[str]) -> Tensor:
        encoder = load_text_encoder(weights_path, allow_jit=allow_jit, device=device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*duplicate class names.*")  # already warned above
            return concept_embeddings(missing, encoder, templates=templates, average=average,
                                      batch_size=batch_size, show_progress=show_progress)

    return cached_name_embeddings(names, cache_file, compute).to(out_device)


def cached_name_embeddings(names: Sequence[str], cache_file: Path,
                           compute: Callable[[list[str]], Tensor]) -> Tensor:
    """[N, D] rows for ``names`` from the per-name cache file ``cache_file``; ``compute(missing_names)`` runs only
    for the names not cached yet, and the file is then rewritten atomically. Used for every text procedure (the
    81-template RegionCLIP one here, the zero-shot branch's in :meth:`regionclip.RegionCLIP.embed_names`)."""
    cached = _read_cache(cache_file)
    unique = list(dict.fromkeys(names))
    missing = [n for n in unique if _name_key(n) not in cached]
    if missing:
        new = compute(missing).detach().float().cpu()
        if cached and next(iter(cached.values())).shape[-1] != new.shape[-1]:
            cached = {}  # a fingerprint collision with another architecture; drop the stale rows
        cached.update({_name_key(n): row.clone() for n, row in zip(missing, new)})
        try:
            save_file_atomic(cached, cache_file)
        except OSError as e:  # read-only home, full disk: still return the result
            warnings.warn(f"could not write the text-embedding cache {cache_file}: {e}", UserWarning, stacklevel=2)
    return torch.stack([cached[_name_key(n)] for n in names])


def _read_cache(path: Path) -> dict[str, Tensor]:
    """The cache file's rows, or {} when it does not exist or cannot be read (it is then rebuilt)."""
    if not path.exists():
        return {}
    try:
        from safetensors.torch import load_file

        rows = load_file(str(path), device="cpu")
    except Exception as e:  # truncated by a crash before atomic writes existed, foreign file, ...
        warnings.warn(f"ignoring unreadable text-embedding cache {path} ({type(e).__name__}: {e}); it will be "
                      "rebuilt", UserWarning, stacklevel=3)
        return {}
    dims = {tuple(v.shape) for v in rows.values()}
    return rows if len(dims) <= 1 and all(len(d) == 1 for d in dims) else {}
