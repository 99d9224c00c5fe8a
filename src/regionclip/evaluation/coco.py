"""COCO bbox evaluation with pycocotools, plus the open-vocabulary split AP50 (docs/DESIGN.md#metrics).

Metrics follow detectron2's ``COCOEvaluator``: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` and
``AP-<class>`` in percent; ``AP50_split_target`` / ``AP50_split_base`` / ``AP50_split_all`` as fractions in [0, 1]
(how the original logs them), and the same three in percent as ``novel_AP50`` / ``base_AP50`` / ``all_AP50`` (how the
paper reports them).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from regionclip.assets import coco_ovd_categories

from ..utils import require
from .results import ResultsError, load_results, validate_results

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

COCO_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def ovd_split_category_ids(categories: Sequence[dict]) -> Optional[dict[str, list[int]]]:
    """``{"novel": [...], "base": [...]}`` dataset category ids of a 65-class OV-COCO json, or ``None``.

    Categories are matched to the OV-COCO table by name, so this works whatever id space the json uses (the
    OVR-CNN files use the real COCO ids 1..90, the split table numbers them 1..80). The original only computes the
    split when the dataset has exactly 65 classes; so does this.
    """

    if len(categories) != 65:
        return None
    split_of = {c["name"]: c["split"] for c in coco_ovd_categories()}
    unknown = [c["name"] for c in categories if c["name"] not in split_of]
    if unknown:
        # Same count but other names: fall back to the 65-order ranks (what a contiguous-index split would do).
        logger.warning("65 categories but %s are not OV-COCO names; splitting by rank of category id", unknown[:3])
        ranks = {c["index_65"]: c["split"] for c in coco_ovd_categories()}
        ordered = sorted(categories, key=lambda c: c["id"])
        split_of = {c["name"]: ranks[i] for i, c in enumerate(ordered)}
    return {s: sorted(int(c["id"]) for c in categories if split_of[c["name"]] == s) for s in ("novel", "base")}


def split_ap50(precision: np.ndarray, cat_ids: Sequence[int], subset: Sequence[int], *, iou_thrs: np.ndarray,
               max_dets: Sequence[int], area_index: int = 0, max_det: int = 100) -> float:
    """Mean of ``precision[IoU=0.5, :, subset, area, maxDets=max_det]`` over valid (> -1) entries (docs/DESIGN.md#metrics).

    ``precision`` is pycocotools' [T, R, K, A, M] array; ``cat_ids`` its K axis (``params.catIds``). Returns NaN
    when no listed category has ground truth.
    """
    t = int(np.argmin(np.abs(np.asarray(iou_thrs) - 0.5)))
    m = list(max_dets).index(max_det)
    k = [i for i, c in enumerate(cat_ids) if c in set(subset)]
    p = precision[t, :, k, area_index, m]
    p = p[p > -1]
    return float(np.mean(p)) if p.size else float("nan")


def _load_gt(gt: Union[PathLike, dict]) -> Any:
    coco_mod = require("pycocotools.coco", "eval", "COCO evaluation")
    if isinstance(gt, dict):
        coco = coco_mod.COCO()
        coco.dataset = copy.deepcopy(gt)
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
    path = Path(gt)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_mod.COCO(str(path))
    except json.JSONDecodeError as e:
        raise ResultsError(f"ground truth {path} is not valid JSON ({e}); the file is probably truncated") from e


def evaluate_coco(gt: Union[PathLike, dict], results: Union[PathLike, list[dict]], *, max_dets: int = 100,
                  ovd_split: Optional[dict[str, Sequence[int]]] = None, allow_empty: bool = False,
                  image_ids: Optional[Sequence[Any]] = None, verbose: bool = False) -> dict[str, float]:
    """Evaluate bbox detections against a COCO-format ground truth.

    Args:
        gt: annotation json path or its loaded dict.
        results: results list or a ``coco_instances_results.json`` path (``bbox`` XYWH, dataset category ids).
        max_dets: pycocotools' largest ``maxDets`` (100 for COCO).
        ovd_split: ``{"novel": ids, "base": ids}`` to override the automatic OV-COCO split (65-class jsons only).
        allow_empty: score an empty results list as 0 AP instead of raising :class:`ResultsError`.
        image_ids: evaluate only these images (the ones a run processed, as detectron2 does); default all.
        verbose: print pycocotools' summary.
    """
    cocoeval_mod = require("pycocotools.cocoeval", "eval", "COCO evaluation")
    coco_gt = _load_gt(gt)
    source = str(results) if not isinstance(results, list) else "results"
    dets = load_results(results) if not isinstance(results, list) else results
    dets = validate_results(dets, coco_gt.getImgIds(), coco_gt.getCatIds(), source=source, allow_empty=allow_empty)
    cats = coco_gt.loadCats(coco_gt.getCatIds())
    names = {c["id"]: c["name"] for c in cats}
    split = ovd_split if ovd_split is not None else ovd_split_category_ids(cats)

    if not dets:
        logger.warning("no detections to evaluate: all metrics are 0")
        metrics = {k: 0.0 for k in COCO_SUMMARY_KEYS}
        metrics.update({f"AP-{names[c]}": 0.0 for c in coco_gt.getCatIds()})
        if split is not None:
            metrics.update({k: 0.0 for k in ("AP50_split_target", "AP50_split_base", "AP50_split_all",
                                             "novel_AP50", "base_AP50", "all_AP50")})
        return metrics

    # pycocotools adds "area"/"id" to the dicts it gets and wants XYWH lists; give it copies.
    dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(dets)
        ev = cocoeval_mod.COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        logger.info("pycocotools summary:\n%s", out.getvalue())
    # pycocotools reports -1 where nothing was valid; detectron2 turns that into NaN.
    metrics = {k: float(v * 100) if v >= 0 else float("nan") for k, v in zip(COCO_SUMMARY_KEYS, ev.stats[:6])}
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        metrics[f"AP-{names[cid]}"] = float(np.mean(p) * 100) if p.size else float("nan")
    if split is not None:
        kw = dict(iou_thrs=ev.params.iouThrs, max_dets=ev.params.maxDets, max_det=max_dets)
        ids = ev.params.catIds
        novel = split_ap50(precision, ids, split["novel"], **kw)
        base = split_ap50(precision, ids, split["base"], **kw)
        all_ = split_ap50(precision, ids, list(split["novel"]) + list(split["base"]), **kw)
        metrics.update(AP50_split_target=novel, AP50_split_base=base, AP50_split_all=all_,
                       novel_AP50=novel * 100, base_AP50=base * 100, all_AP50=all_ * 100)
    return metrics
