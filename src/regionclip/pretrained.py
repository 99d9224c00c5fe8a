"""The released files, where they come from, and resolving a name or a local path to a file.

Local paths are accepted everywhere. Names resolve to ``$REGIONCLIP_HOME`` (default ``~/.cache/regionclip``);
the RN50x4 pretrained checkpoint is fetched from the Hugging Face Space ``CVPR/regionclip-demo`` with
``huggingface_hub`` on first use. The other files are only on the authors' Google Drive (MODEL_ZOO.md), which
has no stable programmatic download: a missing file stops with a message saying where to get it and where to
put it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

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
    sha256: Optional[str] = None  # unknown for the Drive files (they cannot be fetched here to hash them)


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
    _w("rpn_lvis_1203_clipbackbone", "rpn", "rpn", "FPN RPN on CLIP RN50, LVIS 1203 (not supported yet: RGB CLIP input)"),
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


def resolve_weights(name_or_path: Union[str, os.PathLike], *, download: bool = True) -> Path:
    """A local path as is; a released name -> the cached file (downloading from the HF hub where possible)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    name = str(name_or_path)
    stem = name[:-4] if name.endswith(".pth") else name
    spec = WEIGHTS.get(stem)
    if spec is None:
        if os.sep in name or p.suffix:
            raise WeightsNotFound(f"weight file not found: {p}")
        raise WeightsNotFound(f"unknown weights {name!r}: give a file path or one of {', '.join(WEIGHTS)}")
    local = weights_home() / spec.filename
    if local.exists():
        return local
    if spec.hf_repo and download:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.hf_repo, spec.hf_filename, repo_type="space",
                                        cache_dir=str(weights_home() / "hf")))
        except ImportError:
            hint = "install huggingface_hub (pip install 'regionclip[hub]') to download it automatically, or "
        except Exception as e:  # offline, hub error
            hint = f"downloading it from the Hugging Face Space {spec.hf_repo} failed ({type(e).__name__}); "
        raise WeightsNotFound(f"{spec.filename} ({spec.description}) is not in {weights_home()}: {hint}download "
                              f"{spec.hf_filename} from https://huggingface.co/spaces/{spec.hf_repo} and save it as "
                              f"{local}, or pass a local file path")
    raise WeightsNotFound(f"{spec.filename} ({spec.description}) is not in {weights_home()}. Download it from the "
                          f"RegionCLIP Google Drive folder pretrained_ckpt/{spec.folder}/ ({GDRIVE_ROOT}, listed in "
                          f"{MODEL_ZOO}) and save it as {local} (or set REGIONCLIP_HOME), or pass a local file path")
