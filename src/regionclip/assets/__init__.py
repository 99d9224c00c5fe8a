"""Package data: category tables, prompt templates, the CLIP BPE vocabulary and the two demo images."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def bpe_path() -> Path:
    return ASSETS / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def demo_image_paths() -> list[Path]:
    return sorted((ASSETS / "images").glob("*.jpg"))


@lru_cache(maxsize=None)
def _load(name: str) -> dict:
    with open(ASSETS / "categories" / name, encoding="utf-8") as f:
        return json.load(f)


def prompt_templates(kind: str = "regionclip") -> list[str]:
    """The 81 RegionCLIP templates (``kind="regionclip"``) or the 2 of the zero-shot branch (``"zeroshot"``)."""
    d = _load("prompt_templates.json")
    key = {"regionclip": "templates", "zeroshot": "zero_shot_branch_templates_used"}.get(kind, kind)
    return list(d[key])


def coco_ovd_categories() -> list[dict]:
    """The 65 OV-COCO categories sorted by COCO id (= index_65 order), with split and per-split indices."""
    return sorted(_load("ovcoco_split.json")["categories"], key=lambda c: c["coco_id"])


def lvis_categories() -> list[dict]:
    """The 1203 LVIS v1 categories sorted by id (row i of a 1203-way classifier = id i+1)."""
    return sorted(_load("lvis_v1_categories.json")["categories"], key=lambda c: c["id"])


def vocabulary(name: str) -> list[str]:
    """Named built-in vocabularies: ``coco65``, ``coco48`` (base), ``coco17`` (novel), ``lvis1203``, ``lvis866``.

    LVIS names are the prompt names of the original (``bat_(animal)`` -> ``bat animal``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in ("coco", "coco65"):
        return [c["name"] for c in coco_ovd_categories()]
    if key in ("coco48", "cocobase"):
        return [c["name"] for c in coco_ovd_categories() if c["split"] == "base"]
    if key in ("coco17", "coconovel"):
        return [c["name"] for c in coco_ovd_categories() if c["split"] == "novel"]
    if key in ("lvis", "lvis1203"):
        return [c["prompt_name"] for c in lvis_categories()]
    if key in ("lvis866", "lvisbase"):
        return [c["prompt_name"] for c in lvis_categories() if c["frequency"] != "r"]
    raise ValueError(f"unknown built-in vocabulary {name!r}; choose one of coco65, coco48, coco17, lvis1203, lvis866")


BUILTIN_VOCABULARIES = ("coco65", "coco48", "coco17", "lvis1203", "lvis866")


def dataset_category_ids(name: str) -> list[int]:
    """Dataset category ids of a built-in vocabulary, in row order (COCO ids for coco*, LVIS ids for lvis*)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in ("coco", "coco65"):
        return [c["coco_id"] for c in coco_ovd_categories()]
    if key in ("coco48", "cocobase"):
        return [c["coco_id"] for c in coco_ovd_categories() if c["split"] == "base"]
    if key in ("coco17", "coconovel"):
        return [c["coco_id"] for c in coco_ovd_categories() if c["split"] == "novel"]
    if key in ("lvis", "lvis1203"):
        return [c["id"] for c in lvis_categories()]
    if key in ("lvis866", "lvisbase"):
        return [c["id"] for c in lvis_categories() if c["frequency"] != "r"]
    raise ValueError(f"unknown built-in vocabulary {name!r}")
