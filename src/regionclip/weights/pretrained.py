"""The released files, where they come from, resolving a name / path / ``hf://`` URI to a file, and trusting it.

Local paths are accepted everywhere. Names resolve to ``$REGIONCLIP_HOME`` (default ``~/.cache/regionclip``),
preferring ``<name>.safetensors`` (``regionclip convert`` output) over the released ``.pth``; the RN50x4 pretrained
checkpoint is fetched from the Hugging Face Space ``CVPR/regionclip-demo`` with ``huggingface_hub`` on first use.
The other files are only on the authors' Google Drive (MODEL_ZOO.md), which has no stable programmatic download:
a missing file stops with a message saying where to get it and where to put it. ``hf://user/repo[/file]`` resolves
through :mod:`regionclip.weights.hub`.

Integrity (docs/WEIGHTS.md): a file is checked against the sha256 it is expected to have - the ``sha256`` of its
:data:`WEIGHTS` entry, or a ``<file>.sha256`` sidecar (``regionclip convert`` writes one; ``sha256sum`` format).
A mismatch warns (:class:`HashMismatchWarning`) or, with ``strict_hash=True``, raises :class:`HashMismatchError`.
The released files' hashes are NOT known here (they could not be downloaded to hash them), so the table's ``sha256``
entries are None and released ``.pth`` files are not checked until someone fills them in.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..checkpoint.convert import file_info
from ..checkpoint.io import CheckpointError, file_sha256, read_sha256_sidecar, sha256_sidecar
from .hub import HF_SCHEME, download_uri

GDRIVE_ROOT = "https://drive.google.com/drive/folders/1hzrJBvcCrahoRcqJRqzkIGFO_HUSJIii"  # MODEL_ZOO pretrained_ckpt
MODEL_ZOO = "https://github.com/microsoft/RegionCLIP/blob/main/docs/MODEL_ZOO.md"


@dataclass(frozen=True)
class WeightsSpec:
    name: str
    filename: str
    kind: str  # "regionclip", "rpn", "concept_emb", "openai_clip"
    folder: str  # sub-folder of the Google Drive pretrained_ckpt folder
    description: str
    hf_repo: Optional[str] = None  # (repo_id, repo_type "space") when a copy exists on the HF hub
    hf_filename: Optional[str] = None
    # sha256 of the released file. None for every entry: the Drive / Space files could not be downloaded where this
    # table was written, and a made-up hash would be worse than none. Fill in a verified hash to turn checking on.
    sha256: Optional[str] = None


def _w(name: str, kind: str, folder: str, desc: str, **kw) -> WeightsSpec:
    return WeightsSpec(name, kw.pop("filename", name + ".pth"), kind, folder, desc, **kw)


WEIGHTS: dict[str, WeightsSpec] = {w.name: w for w in [
    _w("regionclip_pretrained-cc_rn50", "regionclip", "regionclip", "RegionCLIP RN50 pretrained on CC3M (zero-shot)"),
    _w("regionclip_pretrained-cc_rn50x4", "regionclip", "regionclip", "RegionCLIP RN50x4 pretrained on CC3M "
       "(zero-shot, README demo)", hf_repo="CVPR/regionclip-demo", hf_filename="regionclip_r50x4.pth"),
    _w("regionclip_finetuned-coco_rn50", "regionclip", "regionclip", "OV-COCO detector RN50 (31.4 novel / 50.4 all AP50)"),
    _w("regionclip_finetuned-coco_rn50x4", "regionclip", "regionclip", "OV-COCO detector RN50x4"),
    _w("regionclip_finetuned-lvis_rn50", "regionclip", "regionclip", "OV-LVIS detector RN50 with mask head"),
    _w("regionclip_finetuned-lvis_rn50x4", "regionclip", "regionclip", "OV-LVIS detector RN50x4 (22.0 APr / 32.3 AP)"),
    _w("rpn_lvis_866", "rpn", "rpn", "R50-FPN RPN, LVIS 866 base classes (zero-shot, pretraining)"),
    _w("rpn_lvis_866_lsj", "rpn", "rpn", "R50-FPN RPN, LVIS 866 base, large-scale jitter (LVIS fine-tuning/eval)"),
    _w("rpn_coco_48", "rpn", "rpn", "R50-C4 RPN, COCO 48 base classes (COCO fine-tuning/eval)"),
    _w("rpn_coco_65", "rpn", "rpn", "R50-C4 RPN, COCO 65 classes"),
    _w("rpn_coco_80", "rpn", "rpn", "R50-C4 RPN, COCO 80 classes"),
    _w("rpn_lvis_1203_clipbackbone", "rpn", "rpn", "FPN RPN on a CLIP RN50 trunk (RGB, CLIP mean/std), all 1203 "
       "LVIS classes (docs/WEIGHTS.md)"),
    *[_w(n, "concept_emb", "concept_emb", d) for n, d in [
        ("coco_65_cls_emb", "OV-COCO 65 classes, RN50 text encoder [65, 1024]"),
        ("coco_65_cls_emb_rn50x4", "OV-COCO 65 classes, RN50x4 [65, 640]"),
        ("coco_48_base_cls_emb", "OV-COCO 48 base [48, 1024]"), ("coco_48_base_cls_emb_rn50x4", "[48, 640]"),
        ("coco_17_target_cls_emb", "OV-COCO 17 novel [17, 1024]"), ("coco_17_target_cls_emb_rn50x4", "[17, 640]"),
        ("lvis_1203_cls_emb", "LVIS 1203 [1203, 1024]"), ("lvis_1203_cls_emb_rn50x4", "LVIS 1203 [1203, 640]"),
        ("lvis_866_base_cls_emb", "LVIS 866 base [866, 1024]"), ("lvis_866_base_cls_emb_rn50x4", "[866, 640]"),
        ("coco_nouns_4764_emb", "pretraining concept pool [4764, 1024]"),
        ("coco_nouns_4764_emb_rn50x4", "pretraining concept pool [4764, 640]")]],
    _w("teacher_RN50_student_RN50_OAI_CLIP", "openai_clip", "clip", "OpenAI CLIP RN50 (student + teacher init)"),
    _w("teacher_RN50x4_student_RN50x4_OAI_CLIP", "openai_clip", "clip", "OpenAI CLIP RN50x4"),
]}


def weights_home() -> Path:
    return Path(os.environ.get("REGIONCLIP_HOME", Path.home() / ".cache" / "regionclip"))


class WeightsNotFound(FileNotFoundError):
    pass


class HashMismatchError(CheckpointError):
    """A weight file whose sha256 is not the one it is expected to have (``strict_hash=True``)."""


class HashMismatchWarning(UserWarning):
    """A weight file whose sha256 is not the one it is expected to have (default: warn and load anyway)."""


def verify_sha256(path: Union[str, os.PathLike], expected: str, *, strict: bool = False, what: str = "") -> bool:
    """Check ``path`` against the ``expected`` hex sha256 (hashed once per (size, mtime), see
    :func:`regionclip.checkpoint.io.file_sha256`). Returns True when it matches; on a mismatch warns
    (:class:`HashMismatchWarning`) and returns False, or with ``strict`` raises :class:`HashMismatchError`. Both
    messages name the file, what the hash was expected from, and both hashes."""
    path = Path(path)
    expected = expected.strip().lower()
    actual = file_sha256(path)
    if actual == expected:
        return True
    msg = (f"sha256 mismatch for {path}: expected {expected} ({what or 'expected hash'}), got {actual}. The file is "
           "corrupt, truncated or not the file it claims to be: delete it and download / convert it again (if you "
           "changed it on purpose, update the expected hash)")
    if strict:
        raise HashMismatchError(msg)
    warnings.warn(msg, HashMismatchWarning, stacklevel=3)
    return False


def _spec_for_file(path: Path) -> Optional[WeightsSpec]:
    """The table entry of a released file, recognised by its file name (a user may keep it anywhere)."""
    return next((w for w in WEIGHTS.values() if w.filename == path.name), None)


def verify_file(path: Union[str, os.PathLike], spec: Optional[WeightsSpec] = None, *, strict_hash: bool = False
                ) -> Path:
    """Every check that applies to ``path``: its ``<file>.sha256`` sidecar, the table hash of the released file it is
    (``spec``, or recognised by name), and for a converted ``.safetensors`` the released file's hash against the
    ``regionclip.source_sha256`` it records. Files with no expected hash pass unchecked."""
    path = Path(path)
    side = read_sha256_sidecar(path)
    if side is not None:
        verify_sha256(path, side, strict=strict_hash, what=f"recorded in {sha256_sidecar(path).name}")
    spec = spec or _spec_for_file(path)
    if spec is None or spec.sha256 is None:
        return path
    if path.suffix == ".safetensors":
        info = file_info(path)
        src = info.source_sha256 if info is not None else None
        if src is not None and src.lower() != spec.sha256.lower():
            msg = (f"{path} was converted from a file with sha256 {src}, but the released {spec.filename} has sha256 "
                   f"{spec.sha256}: it was not made from the released file - convert the released file again")
            if strict_hash:
                raise HashMismatchError(msg)
            warnings.warn(msg, HashMismatchWarning, stacklevel=2)
    else:
        verify_sha256(path, spec.sha256, strict=strict_hash, what=f"released {spec.filename}")
    return path


def _local_candidates(stem: str, spec: Optional[WeightsSpec]) -> list[Path]:
    """Where a name may already be in the weights folder, best first: the converted ``.safetensors`` (loads without
    pickle, carries metadata), then the released file."""
    home = weights_home()
    return [home / f"{stem}.safetensors", home / (spec.filename if spec is not None else f"{stem}.pth")]


def resolve_weights(name_or_path: Union[str, os.PathLike], *, download: bool = True, strict_hash: bool = False
                    ) -> Path:
    """A local path as is; ``hf://user/repo[@revision][/file]`` -> the downloaded file (:mod:`regionclip.weights.hub`); a
    released name (or the stem of a file in the weights folder) -> ``<name>.safetensors`` / the released file in
    ``$REGIONCLIP_HOME``, downloading from the HF hub where possible. The file is then checked
    (:func:`verify_file`); ``strict_hash`` turns a hash mismatch from a warning into :class:`HashMismatchError`.

    Raises:
        WeightsNotFound: an unknown name or a missing file, saying where to get it and where to put it.
    """
    name = os.fspath(name_or_path)
    if name.startswith(HF_SCHEME):
        return verify_file(download_uri(name, cache_dir=weights_home() / "hf"),
                           strict_hash=strict_hash)
    p = Path(name)
    if p.exists():
        return verify_file(p, strict_hash=strict_hash)
    stem = name[: -len(p.suffix)] if p.suffix in (".pth", ".safetensors") else name
    spec = WEIGHTS.get(stem)
    if spec is None and (os.sep in name or p.suffix):
        raise WeightsNotFound(f"weight file not found: {p}")
    for local in _local_candidates(stem, spec):
        if local.exists():
            return verify_file(local, spec, strict_hash=strict_hash)
    if spec is None:
        raise WeightsNotFound(f"unknown weights {name!r} (no {stem}.safetensors / {stem}.pth in {weights_home()}): give "
                              f"a file path, an hf://user/repo URI or one of {', '.join(WEIGHTS)}")
    local = weights_home() / spec.filename
    if spec.hf_repo and download:
        try:
            from huggingface_hub import hf_hub_download

            got = Path(hf_hub_download(spec.hf_repo, spec.hf_filename or spec.filename, repo_type="space",
                                       cache_dir=str(weights_home() / "hf")))
            return verify_file(got, spec, strict_hash=strict_hash)
        except ImportError:
            hint = "install huggingface_hub (pip install 'regionclip[hub]') to download it automatically, or "
        except HashMismatchError:
            raise
        except Exception as e:  # offline, hub error
            hint = f"downloading it from the Hugging Face Space {spec.hf_repo} failed ({type(e).__name__}); "
        raise WeightsNotFound(f"{spec.filename} ({spec.description}) is not in {weights_home()}: {hint}download "
                              f"{spec.hf_filename} from https://huggingface.co/spaces/{spec.hf_repo} and save it as "
                              f"{local}, or pass a local file path")
    raise WeightsNotFound(f"{spec.filename} ({spec.description}) is not in {weights_home()}. Download it from the "
                          f"RegionCLIP Google Drive folder pretrained_ckpt/{spec.folder}/ ({GDRIVE_ROOT}, listed in "
                          f"{MODEL_ZOO}) and save it as {local} (or set REGIONCLIP_HOME), or pass a local file path")
