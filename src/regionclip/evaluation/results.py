"""Results files (docs/DESIGN.md#results-files): reading with validation before pycocotools / lvis see them."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Union

from ..formats.coco_json import ResultsError  # one error type for results, whoever raises it

PathLike = Union[str, os.PathLike]
__all__ = ["ResultsError", "load_results", "validate_results"]


def load_results(path: PathLike) -> list[dict]:
    """Read a ``*_instances_results.json`` file (a JSON list of detections)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the file ends early: it was probably truncated by a killed run; re-run `regionclip evaluate`, " \
               "which resumes and rewrites it atomically)" if e.pos >= len(text.rstrip()) - 1 else ""
        raise ResultsError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from e
    if not isinstance(data, list):
        raise ResultsError(f"{path} holds a JSON {type(data).__name__}; a results file is a list of "
                           "{image_id, category_id, bbox: [x, y, w, h], score} objects")
    return data


def validate_results(results: Iterable[dict], image_ids: Iterable[Any], category_ids: Iterable[int], *,
                     source: str = "results", allow_empty: bool = False) -> list[dict]:
    """Check every detection against the ground truth before handing it to pycocotools / lvis, whose own
    failures are bare ``AssertionError``s. Returns the results as a list."""
    results = list(results)
    if not results and not allow_empty:
        raise ResultsError(f"{source} is empty: there is nothing to evaluate. If the model really detected nothing, "
                           "pass allow_empty=True to score it as 0 AP; otherwise check that the right file was given")
    valid_images, valid_cats = set(image_ids), set(category_ids)
    bad_images: set = set()
    bad_cats: set = set()
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise ResultsError(f"{source}[{i}] = {str(r)[:120]} is not a detection: each entry needs image_id, "
                               "category_id, bbox [x, y, w, h] and score")
        bbox = r["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ResultsError(f"{source}[{i}]: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        if not isinstance(r["score"], (int, float)) or not math.isfinite(r["score"]):
            raise ResultsError(f"{source}[{i}]: score must be a finite number, got {r['score']!r}")
        if r["image_id"] not in valid_images:
            bad_images.add(r["image_id"])
        if r["category_id"] not in valid_cats:
            bad_cats.add(r["category_id"])
    if bad_images:
        raise ResultsError(f"{source} has detections for {len(bad_images)} image id(s) that are not in the ground "
                           f"truth, e.g. {sorted(bad_images, key=str)[:5]}; evaluate against the annotation file "
                           "the results were produced for")
    if bad_cats:
        raise ResultsError(f"{source} has detections with {len(bad_cats)} category id(s) that are not in the ground "
                           f"truth, e.g. {sorted(bad_cats, key=str)[:5]}; check the contiguous->category id "
                           "mapping (COCO: the json's ids; LVIS: contiguous index + 1)")
    return results
