"""Proposal quality of an offline RPN: COCO average recall AR@100/300/1000, overall and per object size
(docs/EVALUATION.md#proposal-recall).

The metric is pycocotools' box evaluation with ``useCats = 0`` (class-agnostic) and ``maxDets = [100, 300, 1000]``:
for each area range (all / small / medium / large) and each proposal budget, recall is averaged over the IoU
thresholds 0.50:0.05:0.95 — the ``AR@k`` a COCO proposal leaderboard reports. Crowd GT boxes are "ignore" regions,
as in pycocotools; an area range without GT gives NaN.

Pure part: :func:`proposal_results` (proposals -> results-JSON entries) and :func:`coco_proposal_recall` (results
-> AR table). Runner: :func:`evaluate_proposals` runs an :class:`~regionclip.modeling.rpn.OfflineRPN` on the
dataset's images resized like the detector's input and rescales the proposals to the original image.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..config import InputConfig
from ..data.datasets import DetectionDataset, ImageRecord
from ..data.loader import batch_by_size, iter_loaded, make_loader
from ..structures import PreparedImage
from ..utils import require
from .inference import check_image_size, record_items, unreadable

__all__ = ["AR_MAX_DETS", "AREAS", "proposal_results", "coco_proposal_recall", "evaluate_proposals",
           "format_proposal_recall"]

AR_MAX_DETS: tuple[int, ...] = (100, 300, 1000)
AREAS: tuple[str, ...] = ("all", "small", "medium", "large")  # pycocotools' areaRngLbl order


def proposal_results(image_id: Any, boxes: Tensor, scores: Tensor, category_id: int = 1) -> list[dict[str, Any]]:
    """Results-JSON entries for one image's proposals (XYXY original pixels -> COCO XYWH).

    ``category_id`` is not looked at (:func:`coco_proposal_recall` scores class-agnostically).
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"proposals of image {image_id}: expected boxes [R, 4] and scores [R], got "
                         f"{tuple(boxes.shape)} and {tuple(scores.shape)}")
    b = boxes.detach().double().cpu()
    xywh = torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()
    return [{"image_id": image_id, "category_id": category_id, "bbox": bb, "score": float(s)}
            for bb, s in zip(xywh, scores.detach().double().cpu().tolist())]


def _coco_gt(annotations: Union[str, Path, dict[str, Any]]) -> Any:
    """A pycocotools COCO object; LVIS jsons (no ``iscrowd``) get ``iscrowd = 0`` so pycocotools can read them."""
    coco_mod = require("pycocotools.coco", extra="eval")
    data = copy.deepcopy(annotations) if isinstance(annotations, dict) else json.loads(
        Path(annotations).read_text(encoding="utf-8"))
    for ann in data.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    gt = coco_mod.COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_proposal_recall(annotations: Union[str, Path, dict[str, Any]], results: Sequence[dict[str, Any]],
                         image_ids: Optional[Sequence[Any]] = None,
                         max_dets: Sequence[int] = AR_MAX_DETS) -> dict[str, float]:
    """Class-agnostic COCO average recall in percent.

    Args:
        annotations: COCO/LVIS annotation json (path or loaded dict).
        results: :func:`proposal_results` entries of every image (any number per image; the best ``max(max_dets)``
            by score count).
        image_ids: the images to score (default: every image of the annotation file).
        max_dets: the proposal budgets.

    Returns:
        ``AR@{k}`` (all sizes) and ``AR{s,m,l}@{k}`` for every ``k`` (NaN where an area range has no GT).
    """
    cocoeval = require("pycocotools.cocoeval", extra="eval")
    gt = _coco_gt(annotations)
    ids = list(gt.getImgIds()) if image_ids is None else list(image_ids)
    out: dict[str, float] = {}
    if len(results) == 0:  # pycocotools cannot load an empty result list: nothing proposed, nothing recalled
        for a in AREAS:
            for k in max_dets:
                out[_key(a, k)] = 0.0 if _has_gt(gt, ids, a) else math.nan
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        # useCats=0 still gathers detections per category id of the GT file (COCOeval.computeIoU loops over
        # params.catIds), so a proposal under an id the file lacks would silently never match: use the first id.
        cat = sorted(gt.getCatIds())[0]
        dt = gt.loadRes([{**r, "category_id": cat} for r in results])
        ev = cocoeval.COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.params.useCats = 0
        ev.params.maxDets = [int(k) for k in max_dets]
        ev.evaluate()
        ev.accumulate()
    recall = ev.eval["recall"]  # [T, K(=1 with useCats 0), A, M]
    for ai, a in enumerate(ev.params.areaRngLbl):
        for mi, k in enumerate(ev.params.maxDets):
            r = recall[:, :, ai, mi]
            r = r[r > -1]  # -1: no GT in this area range (as COCOeval.summarize)
            out[_key(a, k)] = float(np.mean(r)) * 100.0 if r.size else math.nan
    return out


def _key(area: str, k: int) -> str:
    return f"AR@{k}" if area == "all" else f"AR{area[0]}@{k}"


def _has_gt(gt: Any, ids: Sequence[Any], area: str) -> bool:
    lo, hi = {"all": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}[area]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=list(ids)))
    return any(not a.get("iscrowd", 0) and lo <= a["area"] <= hi for a in anns)


@torch.no_grad()
def evaluate_proposals(rpn: torch.nn.Module, dataset: DetectionDataset, input_cfg: InputConfig = InputConfig(), *,
                       max_dets: Sequence[int] = AR_MAX_DETS, progress: bool = True,
                       max_pixels: Optional[int] = None, num_workers: int = 0, batch_size: int = 1
                       ) -> dict[str, Any]:
    """AR@k of ``rpn`` (an :class:`OfflineRPN`, whose ``post_nms_topk`` should be >= ``max(max_dets)``) on
    ``dataset``: each image resized by ``input_cfg`` (the detector's test resize), proposals rescaled to the
    original image and clipped to it (detectron2 ``detector_postprocess``).

    Images are decoded in ``num_workers`` DataLoader processes (0 = in this one) and up to ``batch_size`` images
    of equal resized size share an RPN pass (no padding); an unreadable image stops the run naming it."""
    if dataset.annotation_file is None:
        raise ValueError(f"dataset {dataset.name!r} has no annotation file: proposal recall needs GT boxes")
    post = int(getattr(getattr(rpn, "cfg", None), "post_nms_topk", max(max_dets)))
    if post < max(max_dets):
        raise ValueError(f"the RPN keeps {post} proposals per image but AR@{max(max_dets)} needs "
                         f"{max(max_dets)}; build it with post_nms_topk >= {max(max_dets)}")
    cat_id = int(dataset.category_ids[0]) if dataset.category_ids else 1
    records = list(dataset.records)
    items = record_items(records)
    results: list[dict[str, Any]] = []
    num_props = 0

    def decoded() -> Iterator[tuple[ImageRecord, PreparedImage]]:
        loader = make_loader(items, input_cfg, num_workers=num_workers, max_pixels=max_pixels)
        for loaded in iter_loaded(loader, items):
            rec = records[loaded.index]
            if loaded.error is not None or loaded.prepared is None:
                raise unreadable(loaded.error or f"{rec.file_name}: could not be decoded")
            check_image_size(rec, loaded.prepared.original_hw)
            yield rec, loaded.prepared

    with tqdm(total=len(records), disable=not progress, desc=f"proposals {dataset.name}", unit="img") as bar:
        for group in batch_by_size(decoded(), batch_size, lambda g: g[1].resized_hw):
            for (rec, p), prop in zip(group, rpn([p.image for _, p in group])):
                (oh, ow), (rh, rw) = p.original_hw, p.resized_hw
                boxes = prop.boxes.float().cpu()
                boxes = boxes * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh])
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
                num_props += len(boxes)
                results += proposal_results(rec.image_id, boxes, prop.objectness_logits.float().cpu(), cat_id)
            bar.update(len(group))
    out: dict[str, Any] = dict(coco_proposal_recall(dataset.annotation_file, results,
                                                    [r.image_id for r in records], max_dets))
    out["num_images"] = len(records)
    out["proposals_per_image"] = num_props / max(1, len(records))
    return out


def format_proposal_recall(metrics: dict[str, Any], label: str = "rpn") -> str:
    """A markdown table: one row, AR@k for all sizes then per size at every k."""
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("AR@"))
    cols = [f"AR@{k}" for k in ks] + [f"AR{s}@{k}" for s in "sml" for k in ks]

    def fmt(v: Any) -> str:
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    return "\n".join(["| RPN | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                      f"| {label} | " + " | ".join(fmt(metrics.get(c)) for c in cols) + " |"])
