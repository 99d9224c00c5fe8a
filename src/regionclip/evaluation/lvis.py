"""LVIS evaluation with the official ``lvis`` package (docs/DESIGN.md#metrics): AP, AP50, AP75, APs/m/l, APr/APc/APf in
percent, 300 detections per image, bbox and (when the results carry masks) segm."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..utils import require
from .results import ResultsError, load_results, validate_results

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@contextlib.contextmanager
def _numpy_float_alias() -> Iterator[None]:
    """lvis 0.5.3 (the latest release) calls ``np.float``, removed in NumPy 1.24; alias it only while it runs."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    lg = logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # ... through the deprecated Logger.warn
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        lg.setLevel(old)


def _load_gt(gt: Union[PathLike, dict]):
    if isinstance(gt, dict):
        return _index(copy.deepcopy(_check_lvis_gt(gt, "ground truth dict")))
    path = Path(gt)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ResultsError(f"ground truth {path} is not valid JSON ({e}); the file is probably truncated") from e
    return _index(_check_lvis_gt(data, str(path)))


def _index(data: dict):
    # lvis.LVIS only takes a path; building it from the loaded dict lets us validate the file first.
    lvis_mod = require("lvis", "eval", "LVIS evaluation")
    obj = lvis_mod.LVIS.__new__(lvis_mod.LVIS)
    obj.logger = logging.getLogger("lvis")
    obj.dataset = data
    obj._create_index()
    return obj


def _check_lvis_gt(data: dict, where: str) -> dict:
    """The lvis API fails with KeyErrors on non-LVIS files; name the missing field instead."""
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ResultsError(f"{where} is not an LVIS annotation file (needs images, annotations, categories)")
    for c in data["categories"]:
        if "frequency" not in c:
            raise ResultsError(f"{where}: category {c.get('id')} has no 'frequency' (r/c/f); LVIS evaluation "
                               "needs it to compute APr/APc/APf - is this a COCO file? use evaluate_coco")
    for img in data["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key not in img:
                raise ResultsError(f"{where}: image {img.get('id')} has no '{key}'; LVIS (federated) evaluation "
                                   "needs it on every image")
    return data


def evaluate_lvis(gt: Union[PathLike, dict], results: Union[PathLike, list[dict]], *, max_dets: int = 300,
                  allow_empty: bool = False, image_ids: Optional[Sequence[Any]] = None, verbose: bool = False,
                  ) -> dict[str, dict[str, float]]:
    """Evaluate against an LVIS v1 ground truth. Returns ``{"bbox": {...}, "segm": {...}}`` (``segm`` only when
    every detection has a ``segmentation``); values are percent, NaN where no category of a group has GT.

    Results use LVIS category ids (contiguous index + 1 for 1203-way models). ``allow_empty`` scores an empty
    results list as 0 AP instead of raising :class:`ResultsError`. ``image_ids`` restricts the evaluation to the
    images a run processed (default: all images of the ground truth).
    """
    lvis_mod = require("lvis", "eval", "LVIS evaluation")
    lvis_gt = _load_gt(gt)
    source = str(results) if not isinstance(results, list) else "results"
    dets = load_results(results) if not isinstance(results, list) else results
    dets = validate_results(dets, lvis_gt.get_img_ids(), lvis_gt.get_cat_ids(), source=source,
                            allow_empty=allow_empty)
    if not dets:
        logger.warning("no detections to evaluate: all metrics are 0")
        return {"bbox": {k: 0.0 for k in LVIS_KEYS}}
    iou_types = ["bbox"] + (["segm"] if all("segmentation" in d for d in dets) else [])
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        # LVISResults mutates its input (adds area/id/segmentation); for bbox, drop masks so they are not used.
        res = [{k: v for k, v in d.items() if not (iou_type == "bbox" and k == "segmentation")} for d in dets]
        res = copy.deepcopy(res)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _numpy_float_alias():
            with _quiet("lvis.results"):  # it warns "assuming correct format" for every list; we validated
                lvis_dt = lvis_mod.LVISResults(lvis_gt, res, max_dets=max_dets)
            ev = lvis_mod.LVISEval(lvis_gt, lvis_dt, iou_type)
            ev.params.max_dets = max_dets
            if image_ids is not None:
                ev.params.img_ids = sorted(set(image_ids))
            ev.run()
            if verbose:
                ev.print_results()
        if verbose:
            logger.info("lvis-api summary:\n%s", log.getvalue())
        raw = ev.get_results()
        out[iou_type] = {k: float(raw[k] * 100) if raw[k] >= 0 else float("nan") for k in LVIS_KEYS}
    return out
