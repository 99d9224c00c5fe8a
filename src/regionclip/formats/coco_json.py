"""Detections <-> COCO results dicts (``bbox`` XYWH in original pixels, optional RLE ``segmentation``).

The one place where a :class:`~regionclip.structures.Detections` becomes the original's
``coco_instances_results.json`` / ``lvis_instances_results.json`` entries, and back (for re-exporting a finished
journal in another format).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..structures import Detections
from ..utils import require


class ResultsError(ValueError):
    """A results list / results file / journal that is inconsistent (wrong labels, other settings, corrupt)."""


def _mask_util() -> Any:
    return require("pycocotools.mask", "eval", "writing or reading instance masks (RLE)")


def encode_masks(masks: Any) -> list[dict]:
    """[N, H, W] bool masks -> N COCO RLE dicts ``{"size": [H, W], "counts": str}`` (counts decoded to ASCII so
    the dict is JSON-serialisable)."""
    mask_util = _mask_util()
    arr = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    out = []
    for m in arr.astype(np.uint8):
        rle = mask_util.encode(np.asfortranarray(m))
        out.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return out


def decode_masks(rles: Sequence[dict], image_hw: tuple[int, int]) -> torch.Tensor:
    """COCO RLE dicts -> [N, H, W] bool tensor (an empty list gives [0, H, W])."""
    if not rles:
        return torch.zeros((0, *image_hw), dtype=torch.bool)
    mask_util = _mask_util()
    objs = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
             else r["counts"]} for r in rles]
    return torch.from_numpy(np.ascontiguousarray(mask_util.decode(objs).transpose(2, 0, 1)).astype(bool))


def check_labels(det: Detections, num_classes: int, what: str) -> None:
    """Raise :class:`ResultsError` when a label is outside ``[0, num_classes)``."""
    if len(det) == 0:
        return
    lo, hi = int(det.labels.min()), int(det.labels.max())
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        raise ResultsError(f"{what}: label {bad} but the vocabulary has {num_classes} classes; build the "
                           "predictor's vocabulary from the same class list as the category ids")


def detections_to_coco(det: Detections, image_id: Any, category_ids: Optional[Sequence[int]] = None
                       ) -> list[dict]:
    """COCO results dicts of one image, highest score first (stable for ties).

    Each dict: ``image_id``, ``category_id`` (``category_ids[label]``, default ``label + 1`` - the LVIS convention
    of the original), ``bbox`` [x, y, w, h] in original pixels (float32 boxes widened to Python floats, w = x2 - x1
    in float64), ``score``; plus ``segmentation`` (COCO RLE) when ``det.masks`` is not None.
    """
    if category_ids is not None:
        check_labels(det, len(category_ids), f"image {image_id}")
    elif len(det) and int(det.labels.min()) < 0:
        raise ResultsError(f"image {image_id}: negative label {int(det.labels.min())}")
    boxes = det.boxes.detach().float().cpu().tolist()
    scores = det.scores.detach().float().cpu().tolist()
    labels = det.labels.detach().cpu().tolist()
    out = []
    for b, s, lab in zip(boxes, scores, labels):
        cid = int(category_ids[lab]) if category_ids is not None else int(lab) + 1
        out.append({"image_id": image_id, "category_id": cid,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    if det.masks is not None and len(det):
        for r, rle in zip(out, encode_masks(det.masks)):
            r["segmentation"] = rle
    order = sorted(range(len(out)), key=lambda i: -out[i]["score"])
    return [out[i] for i in order]


def coco_to_detections(instances: Sequence[dict], image_hw: tuple[int, int], class_names: Sequence[str],
                       category_ids: Optional[Sequence[int]] = None, *, image_id: Any = None,
                       file_name: Optional[str] = None) -> Detections:
    """The inverse of :func:`detections_to_coco` (boxes back to XYXY float32; ``masks`` decoded when every
    instance has a ``segmentation``). ``category_ids`` maps ids back to labels (default ``id - 1``)."""
    id2label = {int(c): i for i, c in enumerate(category_ids)} if category_ids is not None else None
    boxes, scores, labels = [], [], []
    for r in instances:
        x, y, w, h = r["bbox"]
        boxes.append([x, y, x + w, y + h])
        scores.append(r["score"])
        cid = int(r["category_id"])
        if id2label is not None and cid not in id2label:
            raise ResultsError(f"image {image_id}: category_id {cid} is not one of the {len(id2label)} categories")
        labels.append(id2label[cid] if id2label is not None else cid - 1)
    segs = [r["segmentation"] for r in instances if r.get("segmentation") is not None]
    # masks only when every instance has one (segs holds exactly the non-missing segmentations)
    masks = decode_masks(segs, image_hw) if instances and len(segs) == len(instances) else None
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64),
                      (int(image_hw[0]), int(image_hw[1])), list(class_names), masks=masks, image_id=image_id,
                      file_name=file_name)


def categories(class_names: Sequence[str], category_ids: Optional[Sequence[int]] = None) -> list[dict]:
    """``[{"id", "name"}]`` of a vocabulary (ids default to ``index + 1``)."""
    ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(ids) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(ids)} category ids")
    return [{"id": int(c), "name": str(n)} for c, n in zip(ids, class_names)]
