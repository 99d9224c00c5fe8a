"""Package data: category tables, prompt templates, the CLIP BPE vocabulary and the two demo images."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

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


BUILTIN_VOCABULARIES = ("coco65", "coco48", "coco17", "lvis1203", "lvis866")
# every spelling a user may type -> the canonical built-in name (case, '-' and '_' are ignored)
_ALIASES = {"coco": "coco65", "coco65": "coco65", "coco48": "coco48", "cocobase": "coco48", "coco17": "coco17",
            "coconovel": "coco17", "lvis": "lvis1203", "lvis1203": "lvis1203", "lvis866": "lvis866",
            "lvisbase": "lvis866"}


def builtin_name(name: str) -> Optional[str]:
    """The canonical built-in vocabulary name for any alias (``COCO``, ``coco-65``, ``lvis_base``...), or None."""
    return _ALIASES.get(name.strip().lower().replace("-", "").replace("_", ""))


def builtin_vocabulary(name: str) -> tuple[list[str], list[int]]:
    """(names, dataset category ids) of a built-in vocabulary, in row order: COCO ids for coco*, LVIS ids for
    lvis*. LVIS names are the original's prompt names (``bat_(animal)`` -> ``bat animal``).

    Raises:
        ValueError: not a built-in name (the message lists them).
    """
    key = builtin_name(name)
    if key is None:
        raise ValueError(f"unknown built-in vocabulary {name!r}; choose one of {', '.join(BUILTIN_VOCABULARIES)}")
    if key.startswith("coco"):
        split = {"coco65": None, "coco48": "base", "coco17": "novel"}[key]
        cats = [c for c in coco_ovd_categories() if split is None or c["split"] == split]
        return [c["name"] for c in cats], [int(c["coco_id"]) for c in cats]
    lcats = [c for c in lvis_categories() if key == "lvis1203" or c["frequency"] != "r"]
    return [c["prompt_name"] for c in lcats], [int(c["id"]) for c in lcats]


def vocabulary(name: str) -> list[str]:
    """Names of a built-in vocabulary (see :func:`builtin_vocabulary`)."""
    return builtin_vocabulary(name)[0]


def dataset_category_ids(name: str) -> list[int]:
    """Dataset category ids of a built-in vocabulary, in row order (see :func:`builtin_vocabulary`)."""
    return builtin_vocabulary(name)[1]
