"""Weight files for distribution: convert to safetensors with metadata, push to / download from the Hugging Face Hub.

* :func:`convert_file` - any supported checkpoint -> ``.safetensors`` with the metadata of
  :mod:`regionclip.checkpoint.convert` and a ``<file>.sha256`` sidecar (``regionclip convert``);
* :func:`push_to_hub` - a converted (or convertible) file, optional RPN and class-embedding files, a
  ``regionclip.json`` manifest, the sidecars and a generated model card (:func:`model_card`) -> one Hub repository;
* :func:`download` / :func:`download_uri` - the reverse; ``hf://user/repo[@revision][/file]`` is what
  :func:`regionclip.weights.pretrained.resolve_weights` and ``RegionCLIP.from_pretrained`` accept.

Repository layout written by :func:`push_to_hub` (docs/WEIGHTS.md#hub)::

    model.safetensors (+ .sha256)              the detector / CLIP checkpoint, keys as in the original file
    rpn.safetensors (+ .sha256)                optional offline RPN
    class_embeddings.safetensors (+ .sha256)   optional [K, D] class embeddings with their names in the metadata
    regionclip.json                            {"format_version": 1, "weights": ..., "rpn": ..., "class_embeddings": ...}
    README.md                                  model card

``huggingface_hub`` is optional (``pip install 'regionclip[hub]'``); nothing here imports it at module level.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..checkpoint.convert import PREFIX, build_metadata, converted_tensors, detect_format, file_info
from ..checkpoint.io import (
    file_sha256,
    read_metadata,
    read_weight_file,
    save_file_atomic,
    write_sha256_sidecar,
)
from ..factory import checkpoint_kind
from ..inference.presets import PRESETS
from ..utils import require, write_json_atomic

PathLike = Union[str, os.PathLike]
HF_SCHEME = "hf://"
MANIFEST = "regionclip.json"
ROLE_FILES = {"weights": "model.safetensors", "rpn": "rpn.safetensors", "class_embeddings": "class_embeddings.safetensors"}

# What each checkpoint kind was trained on (docs/WEIGHTS.md; the original's MODEL_ZOO and paper)
TRAINED_ON = {
    "pretrained": "region-text pretraining on CC3M image-text pairs (RegionCLIP stage 1; regions from an LVIS-866 RPN, "
                  "concept pool of 4764 COCO-caption nouns), initialised from OpenAI CLIP",
    "finetuned-coco": "RegionCLIP pretraining, then open-vocabulary transfer on COCO 2017 with the 48 base classes "
                      "(OV-COCO split; evaluated on 65 = 48 base + 17 novel)",
    "finetuned-lvis": "RegionCLIP pretraining, then open-vocabulary transfer on LVIS v1 with the 866 frequent + common "
                      "classes (evaluated on all 1203, rare = novel)",
    "transformer": "zero-shot-branch transformer region encoder (see the source repository)",
}


def parse_hf_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``hf://user/repo[@revision][/path/in/repo]`` -> (repo_id, filename or None, revision or None).

    Raises:
        ValueError: not an ``hf://user/repo`` URI.
    """
    if not uri.startswith(HF_SCHEME):
        raise ValueError(f"not a Hugging Face URI: {uri!r} (expected hf://user/repo[@revision][/file])")
    parts = uri[len(HF_SCHEME):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{uri!r}: expected hf://user/repo[@revision][/file], e.g. hf://someone/regionclip-rn50")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{repo}", filename, revision


def _hf() -> Any:
    return require("huggingface_hub", "hub", "Hugging Face Hub weights (hf://...)")


def _get(repo_id: str, filename: str, *, revision: Optional[str], cache_dir: Optional[PathLike], token: Any,
         optional: bool = False) -> Optional[Path]:
    """One file of a repo through the HF cache (works offline from a populated cache); None when ``optional`` and
    the repo has no such file."""
    hf = _hf()
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision, token=token,
                                       cache_dir=None if cache_dir is None else str(cache_dir)))
    except EntryNotFoundError:
        if optional:
            return None
        raise


def download(repo_id: str, revision: Optional[str] = None, *, filename: Optional[str] = None,
             cache_dir: Optional[PathLike] = None, token: Any = None) -> Path:
    """Download a regionclip Hub repository's weights (or one ``filename`` of it) and return the weights' path.

    Without ``filename`` the ``regionclip.json`` manifest names the files; the optional RPN and class-embedding
    files it lists are fetched into the same snapshot folder (:func:`companion_files` finds them). Every file's
    ``.sha256`` sidecar is fetched when the repo has one, so :func:`regionclip.weights.pretrained.verify_file` checks the
    download. A repository without a manifest falls back to ``model.safetensors``.
    """
    kw: dict[str, Any] = dict(revision=revision, cache_dir=cache_dir, token=token)
    files: dict[str, str] = {}
    if filename is None:
        manifest = _get(repo_id, MANIFEST, optional=True, **kw)
        files = _read_manifest(manifest) if manifest is not None else {}
        filename = files.pop("weights", ROLE_FILES["weights"])
    main = _get(repo_id, filename, **kw)
    assert main is not None
    for name in [filename, *files.values()]:
        if name != filename:
            _get(repo_id, name, **kw)
        _get(repo_id, name + ".sha256", optional=True, **kw)
    return main


def download_uri(uri: str, *, cache_dir: Optional[PathLike] = None, token: Any = None) -> Path:
    """:func:`download` for an ``hf://user/repo[@revision][/file]`` URI, with errors that name the URI. The caller
    verifies the file (:func:`regionclip.weights.pretrained.resolve_weights` does, against the downloaded sidecar)."""
    repo_id, filename, revision = parse_hf_uri(uri)
    try:
        return download(repo_id, revision, filename=filename, cache_dir=cache_dir, token=token)
    except ImportError:
        raise
    except Exception as e:  # offline without a cached copy, unknown repo / file / revision, auth
        raise FileNotFoundError(f"could not get {uri} from the Hugging Face Hub ({type(e).__name__}: {e}). Check the "
                                "repo id and revision, your connection / HF_TOKEN; offline (HF_HUB_OFFLINE=1) only "
                                "files downloaded before are available") from e


def _read_manifest(path: Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {role: str(data[role]) for role in ROLE_FILES if data.get(role)}


def companion_files(weights_path: PathLike) -> dict[str, Path]:
    """``{"rpn": path, "class_embeddings": path}`` for the files the manifest beside a downloaded weights file lists
    (empty for files that did not come from a regionclip Hub repository)."""
    folder = Path(weights_path).parent
    manifest = folder / MANIFEST
    if not manifest.exists():
        return {}
    files = _read_manifest(manifest)
    return {role: folder / name for role, name in files.items() if role != "weights" and (folder / name).exists()}


# ---------------------------------------------------------------------------------------------------- converting
def convert_file(src: PathLike, out: PathLike, *, class_names: Optional[Sequence[str]] = None,
                 category_ids: Optional[Sequence[int]] = None, expect_format: Optional[str] = None,
                 sidecar: bool = True) -> tuple[Path, dict[str, str]]:
    """``src`` (any supported checkpoint) -> ``out`` (``.safetensors``, written atomically) + its metadata.

    Keys are kept exactly (the existing loaders read the result); the metadata records the format, architecture,
    embedding width, RPN kind, checkpoint kind, ``class_names`` (row i = name i) and the source file's name and
    sha256. With ``sidecar`` the output's own sha256 goes to ``<out>.sha256`` (a file cannot contain its own hash).

    Raises:
        ValueError: ``out`` is not ``.safetensors``; ``expect_format`` differs from what the file is; names and
            embedding rows disagree. CheckpointError: an unsupported or unreadable file.
    """
    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the converted file must end in .safetensors, got {out}")
    if out.resolve() == src.resolve():
        raise ValueError(f"output {out} would overwrite the input; choose another name")
    obj = read_weight_file(src)
    fmt = detect_format(obj)
    if expect_format is not None and fmt != expect_format:
        raise ValueError(f"{src} is a {fmt} file, not {expect_format}")
    tensors = converted_tensors(obj, fmt)
    kind = checkpoint_kind(tensors) if fmt in ("regionclip", "openai-clip", "transformer") else None
    meta = build_metadata(tensors, fmt, checkpoint_kind=kind, class_names=class_names, category_ids=category_ids,
                          source_file=src.name, source_sha256=file_sha256(src))
    save_file_atomic(tensors, out, metadata=meta)
    if sidecar:
        write_sha256_sidecar(out)
    return out, meta


# ---------------------------------------------------------------------------------------------------- model card
def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(meta: Mapping[str, str], *, repo_id: str = "user/repo",
               files: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """A Hugging Face model card (README.md) for a converted weights file: YAML front matter, architecture, what it
    was trained on, how to use it, the scenario presets with the numbers the original reports, and file hashes.

    Args:
        meta: the weights file's metadata (:func:`regionclip.checkpoint.io.read_metadata`).
        files: ``{role: {"file": name, "sha256": hex, ...metadata}}`` of every file in the repository.
    """
    g = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX)}
    kind = g.get("checkpoint_kind", "")
    arch = g.get("architecture", "unknown")
    title = f"RegionCLIP {arch}" + (f" ({kind})" if kind else "")
    facts = [("format", g.get("format", "?")), ("architecture", arch), ("embedding width", g.get("embed_dim", "?")),
             ("offline RPN in the file", g.get("rpn", "none")), ("checkpoint kind", kind or "-"),
             ("classes carried", g.get("num_classes", "-")), ("converted from", g.get("source_file", "?")),
             ("source sha256", g.get("source_sha256", "?")), ("converter", g.get("converter", "?"))]
    presets = [(f"`{p.name}`", p.description, p.regions, p.vocabulary, p.reported or "-") for p in PRESETS.values()]
    file_rows = [(role, f"`{f.get('file', '')}`", f.get(PREFIX + "format", ""), f"`{f.get('sha256', '')}`")
                 for role, f in (files or {}).items()]
    rpn_arg = ', rpn_weights="hf://%s/rpn.safetensors"' % repo_id if files and "rpn" in files else ""
    parts = [
        "---\nlibrary_name: regionclip\npipeline_tag: zero-shot-object-detection\ntags:\n- regionclip\n- "
        "open-vocabulary-detection\n- zero-shot-object-detection\n- clip\n---",
        f"# {title}",
        "RegionCLIP (Zhong et al., CVPR 2022, *Region-based Language-Image Pretraining*) weights converted to "
        "safetensors with `regionclip convert`: keys exactly as in the original release, plus metadata that lets "
        "`regionclip` load them without guessing. The numbers below are what the original authors report for "
        "their released files; this card does not claim they were re-measured on this copy.",
        "## Model\n\n" + _md_table(("", ""), facts),
        "## Training data\n\n" + TRAINED_ON.get(kind, "not recorded in the file's metadata"),
        "## Use\n\n```python\nfrom regionclip import RegionCLIP\n\n"
        f'model = RegionCLIP.from_pretrained("hf://{repo_id}"{rpn_arg})\n'
        'model.set_vocabulary("car, traffic cone, forklift")\ndet = model.detect(["street.jpg"])[0]\n```\n\n'
        f'```bash\nregionclip detect street.jpg --weights hf://{repo_id} --vocab "car,traffic cone"\n```',
        "## Scenarios (`--preset`) and reported numbers\n\n"
        + _md_table(("preset", "scenario", "regions", "vocabulary", "reported (original)"), presets),
    ]
    if file_rows:
        parts.append("## Files\n\nEach file also has a `<file>.sha256` sidecar; `regionclip` checks it on load.\n\n"
                     + _md_table(("role", "file", "format", "sha256"), file_rows))
    parts.append("## License and citation\n\nThe terms of the original release apply "
                 "(https://github.com/microsoft/RegionCLIP).\n\n```bibtex\n@inproceedings{zhong2022regionclip,\n"
                 "  title={RegionCLIP: Region-based Language-Image Pretraining},\n  author={Zhong, Yiwu and Yang, "
                 "Jianwei and Zhang, Pengchuan and Li, Chunyuan and Codella, Noel and Li, Liunian Harold and Zhou, "
                 "Luowei and Dai, Xiyang and Yuan, Lu and Li, Yin and Gao, Jianfeng},\n  booktitle={CVPR},\n  "
                 "year={2022}\n}\n```")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- pushing
def _stage(src: PathLike, role: str, folder: Path, class_names: Optional[Sequence[str]]) -> dict[str, str]:
    """Put one file into the staging folder as ``ROLE_FILES[role]`` (converting it unless it already is a converted
    safetensors file without new names to record) with its sidecar; returns its manifest entry."""
    src, dst = Path(src), folder / ROLE_FILES[role]
    info = file_info(src) if src.suffix == ".safetensors" else None
    if info is not None and class_names is None:
        shutil.copyfile(src, dst)
        meta = read_metadata(src)
    else:
        expect = {"rpn": "rpn", "class_embeddings": "class-embeddings"}.get(role)
        _, meta = convert_file(src, dst, class_names=class_names, expect_format=expect, sidecar=False)
    digest = file_sha256(dst, use_cache=False)
    write_sha256_sidecar(dst, digest)
    return {"file": dst.name, "sha256": digest, **meta}


def push_to_hub(path_or_model: Any, repo_id: str, *, rpn: Optional[PathLike] = None,
                class_embeddings: Optional[PathLike] = None, class_names: Optional[Sequence[str]] = None,
                revision: Optional[str] = None, private: Optional[bool] = None, token: Any = None,
                commit_message: str = "Upload RegionCLIP weights (regionclip push_to_hub)") -> str:
    """Upload weights (a file, or a ``RegionCLIP`` model's ``weights_path``) with optional RPN / class-embedding
    files to ``repo_id``: files converted to safetensors unless they already are, sidecars, manifest, model card.

    ``class_names`` label the rows of ``class_embeddings`` (recorded in its metadata). Returns the commit URL.
    """
    weights = getattr(path_or_model, "weights_path", path_or_model)
    if weights is None:
        raise ValueError("this model was not loaded from a file (weights_path is None): pass the weights file")
    hf = _hf()
    with tempfile.TemporaryDirectory(prefix="regionclip-push-") as tmp:
        folder = Path(tmp)
        files = {"weights": _stage(weights, "weights", folder, None)}
        if rpn is not None:
            files["rpn"] = _stage(rpn, "rpn", folder, None)
        if class_embeddings is not None:
            files["class_embeddings"] = _stage(class_embeddings, "class_embeddings", folder, class_names)
        write_json_atomic({"format_version": 1, **{r: f["file"] for r, f in files.items()},
                           "sha256": {f["file"]: f["sha256"] for f in files.values()}}, folder / MANIFEST, indent=1)
        card = model_card({k: v for k, v in files["weights"].items() if k.startswith(PREFIX)}, repo_id=repo_id,
                          files=files)
        (folder / "README.md").write_text(card, encoding="utf-8")
        api = hf.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message)
    return str(getattr(info, "commit_url", info))

