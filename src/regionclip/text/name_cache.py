"""Class embeddings of run-time names, computed with the checkpoint's own text encoder and cached on disk (the
names themselves come from :mod:`regionclip.text.vocabulary`).

Cache design
------------
One safetensors file per (checkpoint, settings) under ``cache_dir`` (default ``$REGIONCLIP_CACHE`` or
``~/.cache/regionclip``, sub-folder ``text_embeddings``), holding one row [D] per name, keyed by the sha256 of
the name. A call looks every name up and runs the text encoder only for the missing ones (so editing a
vocabulary re-encodes only the new names). The checkpoint is not even read when every name is cached.

* incremental and resumable: the missing names are computed in chunks (:func:`cached_name_embeddings`,
  ``chunk_size`` names per ``compute`` call) and the file is rewritten atomically (temp file + rename) with every
  finished row whenever ``save_interval_s`` seconds have passed since the last write, at the end, and when the
  computation stops with an exception - ``KeyboardInterrupt`` included, which is then re-raised. A killed
  process therefore loses at most the last ``save_interval_s`` seconds plus one chunk; the next call computes
  only the names still missing. One whole-file rewrite was chosen over append-only shards: a 5000-name RN50
  file is 20 MB, written in well under a second every ``save_interval_s`` (10 s) while a chunk takes seconds
  to minutes, and readers keep seeing a single file.
* validation: a computed row that is not finite (NaN/inf) raises ``ValueError`` naming the name and the
  checkpoint, after the finished rows are saved; rows read from a file that are not finite are dropped (and
  recomputed), so the cache never serves them.
* checkpoint key: a *cheap fingerprint*, sha256 over the file size, its mtime (ns), the first and last MiB and
  32 evenly spaced 64 KiB blocks. Reading ~4 MiB takes milliseconds even for the 715 MB RN50x4 file, where a
  full sha256 takes seconds. Any edit of the file changes its mtime (-> recompute); a copy without preserved
  mtime recomputes once. The sampled blocks guard against two checkpoints with equal size and mtime.
* settings key: sha256 over the templates (exact strings, in order), the averaging mode, the context length
  and a cache format version.
* two processes filling the same file concurrently: each write first merges the rows another process wrote
  in the meantime, so at worst rows written between one process's read and rename are lost (recomputed next
  time); the file is never corrupt (atomic rename).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from regionclip.checkpoint.io import PathLike, save_file_atomic
from regionclip.modeling.recognizer import TEXT_PROCEDURE_REGIONCLIP, TEXT_PROCEDURE_ZEROSHOT_BRANCH, TEXT_PROCEDURES
from regionclip.modeling.text_encoder import CLIPTextTransformer
from regionclip.text.embeddings import AVERAGE_MODES, DEFAULT_BATCH_SIZE, PromptEncoder, embed_with
from regionclip.text.prompts import resolve_templates, validate_names
from regionclip.text.tokenizer import CONTEXT_LENGTH
from regionclip.text.unicl_embeddings import zeroshot_class_embeddings

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


def class_embeddings(names: Sequence[str], weights_path: PathLike, load_tower: Callable[[], nn.Module], *,
                     procedure: str = TEXT_PROCEDURE_REGIONCLIP, tower_options: Optional[Mapping[str, Any]] = None,
                     templates: Optional[Union[str, Sequence[str], Path]] = None, average: str = "mean",
                     cache_dir: Optional[PathLike] = None, use_cache: bool = True,
                     device: Optional[Union[str, torch.device]] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     show_progress: bool = False) -> Tensor:
    """Class embeddings for ``names`` computed with the text tower of the checkpoint ``weights_path``, cached per
    name; the one entry point for both model families.

    Args:
        names: N class names (row i = names[i]); empty names raise, duplicates warn (see
            :func:`regionclip.text.prompts.validate_names`).
        weights_path: the checkpoint (its fingerprint keys the cache file).
        load_tower: builds the checkpoint's text tower (e.g. ``lambda: regionclip.factory.load_text_tower(path)``);
            called on the first cache miss only, so the checkpoint is not even read when every name is cached.
        procedure: ``"regionclip"`` (the original's templates, default 81, mean over them: CLIP-ResNet
            checkpoints) or ``"zeroshot-branch"`` (the zero-shot branch's two templates, normalised mean:
            :func:`regionclip.text.unicl_embeddings.zeroshot_class_embeddings`, transformer checkpoints).
        tower_options: what the file's shapes cannot tell about the tower (transformer options): part of the
            cache key, since they change its output.
        templates, average, batch_size: the ``"regionclip"`` procedure's (see
            :func:`regionclip.text.prompts.resolve_templates`; ``average`` ``"mean"`` (original) or
            ``"normalized"``; prompts per forward pass).
        cache_dir: where cache files live; default :func:`default_cache_dir`.
        use_cache: ``False`` computes everything and touches no cache file.
        device: where the result is returned (default CPU; the tower runs where ``load_tower`` puts it).
        show_progress: tqdm bar (names, names/s) while encoding.

    Returns:
        float32 Tensor[N, D]; for ``"regionclip"`` with ``average="mean"`` unnormalised, exactly like
        ``regionclip embed-concepts``.

    Raises:
        ValueError: bad names / templates / procedure, or a computed embedding that is not finite (name and file
            named).
        KeyboardInterrupt: re-raised after the rows finished so far are saved (a rerun computes the rest).
    """
    if procedure not in TEXT_PROCEDURES:
        raise ValueError(f"procedure must be one of {TEXT_PROCEDURES}, got {procedure!r}")
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    if procedure == TEXT_PROCEDURE_ZEROSHOT_BRANCH and (templates is not None or average != "mean"):
        raise ValueError("the zero-shot branch's procedure has its own templates and averaging; templates / "
                         "average apply to the 'regionclip' procedure only")
    names = validate_names(names, source="vocabulary")
    out_device = torch.device(device) if device is not None else torch.device("cpu")
    state: dict[str, Any] = {}

    def tower() -> nn.Module:
        if "tower" not in state:  # loaded on the first miss only, then reused for every chunk
            state["tower"] = load_tower()
        return state["tower"]

    if procedure == TEXT_PROCEDURE_REGIONCLIP:
        resolved = resolve_templates(templates)

        def compute(chunk: list[str], progress: bool = False) -> Tensor:
            if "encoder" not in state:
                encoder = tower()
                if not isinstance(encoder, CLIPTextTransformer):
                    raise TypeError(f"the 'regionclip' procedure needs a CLIP text tower, got {type(encoder).__name__} "
                                    f"from {weights_path} (transformer checkpoints: procedure='zeroshot-branch')")
                state["encoder"] = PromptEncoder(encoder, resolved, batch_size=batch_size)
            return embed_with(state["encoder"], chunk, average, show_progress=progress)

        key = _settings_key(resolved, average)
        # ~4 forward passes per chunk: seconds per chunk on a CPU, so little is lost when a run is killed
        chunk_size = max(1, math.ceil(4 * batch_size / len(resolved)))
    else:
        def compute(chunk: list[str], progress: bool = False) -> Tensor:
            return zeroshot_class_embeddings(tower(), chunk)

        # keyed by the options the file's shapes cannot tell (they change the text tower's output)
        opts = json.dumps(dict(tower_options or {}), sort_keys=True)
        key = hashlib.sha256(f"zeroshot-branch|{opts}".encode()).hexdigest()
        chunk_size = 64

    source = f"the text encoder of {weights_path}"
    if not use_cache:
        emb = compute(names, show_progress)
        _check_finite(emb, names, source)
        return emb.to(out_device)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = f"{checkpoint_fingerprint(weights_path)[:24]}_{key[:16]}"
    return cached_name_embeddings(names, root / f"{stem}.safetensors", compute, chunk_size=chunk_size,
                                  show_progress=show_progress, source=source).to(out_device)


def cached_name_embeddings(names: Sequence[str], cache_file: Path, compute: Callable[[list[str]], Tensor], *,
                           chunk_size: int = 64, save_interval_s: float = 10.0, show_progress: bool = False,
                           source: Optional[str] = None) -> Tensor:
    """[N, D] rows for ``names`` from the per-name cache file ``cache_file``; ``compute(chunk)`` -> [len(chunk), D]
    runs only for the names not cached yet, ``chunk_size`` names at a time, and finished rows are written as it
    goes (see the module docstring). Used for every text procedure (the 81-template RegionCLIP one here, the
    zero-shot branch's, both through :func:`class_embeddings`).

    Args:
        save_interval_s: rewrite the file when this many seconds passed since the last write (0: every chunk).
        show_progress: tqdm bar over the missing names, with names/s.
        source: what computes the rows (e.g. "the text encoder of ckpt.pth"), for error messages.

    Raises:
        ValueError: ``compute`` returned a non-finite row or a wrong shape; rows finished before are saved.
        KeyboardInterrupt (and any other exception of ``compute``): re-raised after the finished rows are saved.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cached = _read_cache(cache_file)
    unique = list(dict.fromkeys(names))
    missing = [n for n in unique if _name_key(n) not in cached]
    if missing:
        source = source or f"the procedure cached in {cache_file}"
        fresh: dict[str, Tensor] = {}  # computed, not yet written
        bar = None
        if show_progress:
            bar = tqdm(total=len(missing), unit="name", desc="text embeddings", smoothing=0.1)
        last_write = time.monotonic()
        try:
            for start in range(0, len(missing), chunk_size):
                part = missing[start:start + chunk_size]
                rows = compute(part).detach().float().cpu()
                if rows.dim() != 2 or rows.shape[0] != len(part):
                    raise ValueError(f"{source} returned shape {tuple(rows.shape)} for {len(part)} names; "
                                     f"expected [{len(part)}, D]")
                _check_finite(rows, part, source)
                if cached and next(iter(cached.values())).shape[-1] != rows.shape[-1]:
                    cached = {}  # a fingerprint collision with another architecture; drop the stale rows
                fresh.update({_name_key(n): row.clone() for n, row in zip(part, rows)})
                if bar is not None:
                    bar.update(len(part))
                if time.monotonic() - last_write >= save_interval_s:
                    cached = _write_cache(cache_file, cached, fresh)
                    fresh, last_write = {}, time.monotonic()
        finally:  # also on KeyboardInterrupt / errors: keep every finished row, then let the exception go on
            if bar is not None:
                bar.close()
            if fresh:
                cached = _write_cache(cache_file, cached, fresh)
    return torch.stack([cached[_name_key(n)] for n in names])


def _check_finite(rows: Tensor, names: Sequence[str], source: str) -> None:
    """Raise ValueError naming the first name whose row [D] holds NaN/inf."""
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        listed = ", ".join(repr(names[i]) for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ValueError(f"the text embedding of {listed} ({len(bad)} name(s)) computed with {source} is not finite "
                         "(NaN/inf); the checkpoint's text weights are probably corrupt or overflow in this dtype - "
                         "check the file (or re-download it) and compute in float32; nothing non-finite was cached")


def _write_cache(path: Path, cached: dict[str, Tensor], fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """Atomically rewrite ``path`` with ``cached`` + ``fresh`` + rows another process wrote meanwhile (same D).

    Returns the merged rows; on OSError (read-only home, full disk) warns and returns them unwritten.
    """
    merged = dict(cached)
    dim = next(iter(fresh.values())).shape[-1]
    on_disk = _read_cache(path, warn=False)
    if on_disk and next(iter(on_disk.values())).shape[-1] == dim:
        merged = {**on_disk, **merged}
    merged.update(fresh)
    try:
        save_file_atomic(merged, path)
    except OSError as e:  # still return the result; the rows are recomputed next time
        warnings.warn(f"could not write the text-embedding cache {path}: {e}", UserWarning, stacklevel=3)
    return merged


def _read_cache(path: Path, warn: bool = True) -> dict[str, Tensor]:
    """The cache file's finite rows, or {} when it does not exist or cannot be read (it is then rebuilt)."""
    if not path.exists():
        return {}
    try:
        rows = load_file(str(path), device="cpu")
    except Exception as e:  # truncated by a crash before atomic writes existed, foreign file, ...
        if warn:
            warnings.warn(f"ignoring unreadable text-embedding cache {path} ({type(e).__name__}: {e}); it will be "
                          "rebuilt", UserWarning, stacklevel=3)
        return {}
    dims = {tuple(v.shape) for v in rows.values()}
    if len(dims) > 1 or not all(len(d) == 1 for d in dims):
        return {}
    return {k: v for k, v in rows.items() if bool(torch.isfinite(v).all())}  # never serve NaN/inf rows
