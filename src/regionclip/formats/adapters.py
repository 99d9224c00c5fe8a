"""Adapters to other libraries' detection types: ``supervision.Detections`` and the Hugging Face
zero-shot-object-detection pipeline output. Both directions, so results can be drawn / tracked with supervision or
compared with a ``transformers`` pipeline."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..structures import Detections
from ..utils import require


def _supervision() -> Any:
    return require("supervision", "supervision", "to_supervision / from_supervision")


def to_supervision(det: Detections) -> Any:
    """``supervision.Detections`` with ``xyxy`` [N, 4] float32 (original pixels), ``confidence`` [N] float32,
    ``class_id`` [N] int64 (contiguous labels), ``data["class_name"]`` [N] str and ``mask`` [N, H, W] bool when
    ``det.masks`` is set."""
    sv = _supervision()
    masks = det.masks.detach().cpu().numpy().astype(bool) if det.masks is not None else None
    return sv.Detections(xyxy=det.boxes.detach().float().cpu().numpy().reshape(-1, 4),
                         confidence=det.scores.detach().float().cpu().numpy(),
                         class_id=det.labels.detach().cpu().numpy().astype(np.int64), mask=masks,
                         data={"class_name": np.asarray(det.names, dtype=str)})


def from_supervision(sv_det: Any, class_names: Sequence[str], image_size: Optional[tuple[int, int]] = None
                     ) -> Detections:
    """:class:`Detections` from a ``supervision.Detections``. ``class_id`` indexes ``class_names``; when it is
    missing, ``data["class_name"]`` is looked up in ``class_names``. ``image_size`` (H, W) is required unless the
    detections carry masks (whose shape gives it). Missing ``confidence`` -> 1."""
    n = len(sv_det)
    names = list(class_names)
    if sv_det.class_id is not None:
        labels = np.asarray(sv_det.class_id, np.int64)
    elif "class_name" in getattr(sv_det, "data", {}):
        index = {c: i for i, c in enumerate(names)}
        unknown = sorted({str(c) for c in sv_det.data["class_name"]} - set(index))
        if unknown:
            raise ValueError(f"class names {unknown[:5]} are not in class_names; pass the full vocabulary")
        labels = np.asarray([index[str(c)] for c in sv_det.data["class_name"]], np.int64)
    else:
        raise ValueError("supervision.Detections without class_id or data['class_name']: labels are unknown")
    masks = None
    if sv_det.mask is not None:
        masks = torch.from_numpy(np.asarray(sv_det.mask, bool))
        if image_size is None:
            image_size = (int(masks.shape[1]), int(masks.shape[2]))
    if image_size is None:
        raise ValueError("from_supervision needs image_size=(H, W): supervision.Detections does not store it")
    conf = np.ones(n, np.float32) if sv_det.confidence is None else np.asarray(sv_det.confidence, np.float32)
    return Detections(torch.from_numpy(np.asarray(sv_det.xyxy, np.float32).reshape(-1, 4).copy()),
                      torch.from_numpy(conf.copy()), torch.from_numpy(labels.copy()),
                      (int(image_size[0]), int(image_size[1])), names, masks=masks)


def to_hf(det: Detections) -> list[dict]:
    """The Hugging Face ``zero-shot-object-detection`` pipeline output: ``[{"score", "label", "box": {"xmin",
    "ymin", "xmax", "ymax"}}]``, highest score first, label = class name. Unlike the pipeline (which rounds
    boxes to int pixels) coordinates stay floats, so nothing is lost."""
    boxes = det.boxes.detach().float().cpu().reshape(-1, 4).tolist()
    scores = det.scores.detach().float().cpu().tolist()
    out: list[dict[str, Any]] = [
        {"score": float(s), "label": n, "box": {"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]}}
        for b, s, n in zip(boxes, scores, det.names)]
    order = sorted(range(len(out)), key=lambda i: -out[i]["score"])
    return [out[i] for i in order]


def from_hf(results: Sequence[dict], class_names: Sequence[str], image_size: tuple[int, int]) -> Detections:
    """:class:`Detections` from a zero-shot-object-detection pipeline output (labels looked up in
    ``class_names``; the pipeline output has no image size, so ``image_size`` (H, W) is required)."""
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({r["label"] for r in results} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in class_names; pass the vocabulary the pipeline was run "
                         "with (candidate_labels)")
    boxes = [[r["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for r in results]
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor([r["score"] for r in results], dtype=torch.float32),
                      torch.tensor([index[r["label"]] for r in results], dtype=torch.int64),
                      (int(image_size[0]), int(image_size[1])), list(class_names))
