"""Run a predictor over a dataset, resumably, and evaluate the results (spec §4.9).

The predictor is any callable ``predict(records: list[ImageRecord]) -> list[Detections]`` whose labels index
``dataset.class_names``; this keeps the loop testable without the detector (tests pass a fake built from GT).

Long runs are resumable: each finished image is appended as one JSON line to ``predictions.jsonl`` (first line: a
``meta`` fingerprint of the run's settings) and flushed; a re-run skips the image ids already there. The final
``coco_instances_results.json`` / ``lvis_instances_results.json`` and ``metrics.json`` are written atomically.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from regionclip.data.datasets import DetectionDataset, ImageRecord
from regionclip.structures import Detections

from .report import write_metrics_json
from .results import ResultsError, require, write_json_atomic

PathLike = Union[str, os.PathLike]
Predictor = Callable[[list[ImageRecord]], list[Detections]]
logger = logging.getLogger(__name__)

PREDICTIONS_JSONL = "predictions.jsonl"


def results_file_name(dataset: DetectionDataset) -> str:
    """The original's file name for the dataset's kind (spec §4.9)."""
    return "lvis_instances_results.json" if dataset.kind == "lvis" else "coco_instances_results.json"


def detections_to_results(det: Detections, record: ImageRecord, category_ids: Sequence[int]) -> list[dict]:
    """COCO-format dicts for one image, highest score first, with RLE ``segmentation`` when masks exist."""
    num = len(category_ids)
    if len(det) and int(det.labels.max()) >= num or len(det) and int(det.labels.min()) < 0:
        raise ResultsError(f"image {record.image_id}: predictor returned label {int(det.labels.max())} but the "
                           f"dataset has {num} classes; build the predictor's vocabulary from dataset.class_names")
    out = det.to_coco_json(record.image_id, category_ids)
    if det.masks is not None and len(det):
        mask_util = require("pycocotools.mask")
        import numpy as np

        for r, m in zip(out, det.masks.detach().cpu().numpy().astype(np.uint8)):
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
    order = sorted(range(len(out)), key=lambda i: -out[i]["score"])
    return [out[i] for i in order]


def _read_jsonl(path: Path, meta: Mapping[str, Any]) -> dict[Any, list[dict]]:
    """Finished images of an earlier run. A partial last line (killed mid-write) is cut off; a different ``meta``
    is an error because mixing settings would silently corrupt the metrics."""
    done: dict[Any, list[dict]] = {}
    good_end = 0
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            good_end += len(line) + (1 if i < len(lines) - 1 else 0)
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(ln.strip() for ln in lines[i + 1:]):
                raise ResultsError(f"{path} line {i + 1} is corrupt (not only the last line); delete the file to "
                                   "start the run over")
            logger.warning("%s: dropping a partial last line left by an interrupted run", path)
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        if i == 0:
            if entry.get("meta") != json.loads(json.dumps(dict(meta))):
                raise ResultsError(f"{path} was written by a run with other settings ({entry.get('meta')} vs "
                                   f"{dict(meta)}); use another --output-dir or pass --no-resume to start over")
        else:
            done[entry["image_id"]] = entry["instances"]
        good_end += len(line) + 1
    return done


def run_inference(dataset: DetectionDataset, predict: Predictor, output_dir: PathLike, *, batch_size: int = 1,
                  resume: bool = True, progress: bool = True, meta: Optional[Mapping[str, Any]] = None,
                  ) -> list[dict]:
    """Predict every image of ``dataset`` and return all detections in results-JSON format (dataset order).

    Args:
        dataset: the images (and, for category ids, the class table).
        predict: ``predict(records) -> list[Detections]``, one per record, labels index ``dataset.class_names``.
        output_dir: where ``predictions.jsonl`` accumulates.
        batch_size: records per ``predict`` call.
        resume: skip images already in ``predictions.jsonl``; ``False`` starts the file over.
        progress: show a tqdm bar with ETA.
        meta: settings fingerprint stored in / checked against the jsonl (dataset name and size are added).
    """
    from tqdm import tqdm

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PREDICTIONS_JSONL
    meta = {"dataset": dataset.name, "num_images": len(dataset), "num_classes": len(dataset.class_names),
            **(meta or {})}
    done = _read_jsonl(path, meta) if resume and path.exists() else {}
    if not done or not path.exists():
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
    todo = [r for r in dataset if r.image_id not in done]
    if done:
        logger.info("resuming: %d of %d images already done", len(dataset) - len(todo), len(dataset))
    bar = tqdm(total=len(dataset), initial=len(dataset) - len(todo), unit="img", disable=not progress,
               desc=f"evaluate {dataset.name}", dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            dets = predict(batch)
            if len(dets) != len(batch):
                raise ResultsError(f"predictor returned {len(dets)} results for {len(batch)} images")
            for rec, det in zip(batch, dets):
                inst = detections_to_results(det, rec, dataset.category_ids)
                f.write(json.dumps({"image_id": rec.image_id, "instances": inst}) + "\n")
                done[rec.image_id] = inst
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return [r for rec in dataset for r in done.get(rec.image_id, [])]


def evaluate_results(dataset: DetectionDataset, results: Union[PathLike, list[dict]], *,
                     allow_empty: bool = False) -> dict[str, Any]:
    """COCO or LVIS metrics of ``results`` against the dataset's annotation file, over the dataset's images only
    (a dataset cut with ``records[:n]`` is scored on those n images; LVIS images dropped by the loader are not
    scored either, as in the original)."""
    if dataset.annotation_file is None:
        raise ResultsError(f"dataset {dataset.name!r} has no annotations ({dataset.kind}); nothing to evaluate "
                           "against - only the results JSON can be written")
    ids = [r.image_id for r in dataset]
    if dataset.kind == "lvis":
        from .lvis import evaluate_lvis

        return evaluate_lvis(dataset.annotation_file, results, allow_empty=allow_empty, image_ids=ids)
    from .coco import evaluate_coco

    return evaluate_coco(dataset.annotation_file, results, allow_empty=allow_empty, image_ids=ids)


def evaluate_dataset(dataset: DetectionDataset, predict: Predictor, output_dir: PathLike, *,
                     batch_size: int = 1, resume: bool = True, progress: bool = True,
                     meta: Optional[Mapping[str, Any]] = None) -> Optional[dict[str, Any]]:
    """Predict, write ``<output_dir>/{coco,lvis}_instances_results.json``, evaluate, write ``metrics.json``.

    Returns the metrics, or ``None`` for datasets without annotations (image folders).
    """
    results = run_inference(dataset, predict, output_dir, batch_size=batch_size, resume=resume,
                            progress=progress, meta=meta)
    write_json_atomic(results, Path(output_dir) / results_file_name(dataset))
    if not dataset.has_annotations:
        return None
    # A model that detects nothing is a legitimate (bad) result: score it 0 rather than fail.
    metrics = evaluate_results(dataset, results, allow_empty=True)
    write_metrics_json(metrics, Path(output_dir) / "metrics.json")
    return metrics
