"""Run a predictor over a dataset, resumably, and evaluate the results (docs/DESIGN.md#results-files).

The predictor is any callable ``predict(records: list[ImageRecord]) -> list[Detections]`` whose labels index
``dataset.class_names``; this keeps the loop testable without the detector (tests pass a fake built from GT).

Long runs are resumable: each finished image is appended as one JSON line to ``predictions.jsonl`` (first line: a
``meta`` fingerprint of the run's settings) and flushed; a re-run skips the image ids already there. The final
``coco_instances_results.json`` / ``lvis_instances_results.json`` and ``metrics.json`` are written atomically.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from tqdm import tqdm

from ..data.datasets import DetectionDataset, ImageRecord
from ..parallel.distributed import DistInfo
from ..formats.coco_json import check_labels
from ..pipeline import Pipeline, RunOptions
from ..parallel.sharding import ShardedResults, shard_items
from ..structures import Detections, Proposals
from ..text.vocabulary import Vocabulary
from .coco import evaluate_coco
from .lvis import evaluate_lvis
from .report import write_metrics_json
from .results import ResultsError

PathLike = Union[str, os.PathLike]
Predictor = Callable[[list[ImageRecord]], list[Detections]]
logger = logging.getLogger(__name__)

PREDICTIONS_JSONL = "predictions.jsonl"


def results_file_name(dataset: DetectionDataset) -> str:
    """The original's file name for the dataset's kind (docs/DESIGN.md#results-files)."""
    return "lvis_instances_results.json" if dataset.kind == "lvis" else "coco_instances_results.json"


def dataset_predictor(pipeline: Pipeline, vocabulary: Vocabulary, options: RunOptions, regions: str = "rpn"
                      ) -> Predictor:
    """``predict(records) -> list[Detections]`` through the one pipeline: RPN proposals (``regions="rpn"``) or the
    records' GT boxes (``"gt"``), used by ``regionclip evaluate`` and by evaluation during training.

    GT mode builds each record's regions in the resized frame exactly as the original's test mapper does
    (:meth:`ImageRecord.region_boxes_resized`: crowd removed, whole-number json boxes truncated after scaling,
    clipped, empty removed); an image left without regions gets no detections (the original has nothing to
    classify), not an error.
    """
    if regions not in ("rpn", "gt"):
        raise ValueError(f"regions must be 'rpn' or 'gt', got {regions!r}")

    def empty(rec: ImageRecord) -> Detections:
        return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                          (rec.height, rec.width), list(vocabulary.names), image_id=rec.image_id)

    def predict(records: list[ImageRecord]) -> list[Detections]:
        out: list[Optional[Detections]] = [None] * len(records)
        prepared, props, idx = [], [], []
        for i, rec in enumerate(records):
            p = pipeline.prepare(rec.file_name, max_pixels=options.max_pixels)
            if p.original_hw != (rec.height, rec.width):
                raise ValueError(f"{rec.file_name} is {p.original_hw[1]}x{p.original_hw[0]} but its annotation says "
                                 f"{rec.width}x{rec.height}; the boxes would be misplaced")
            if regions == "gt":
                boxes, _ = rec.region_boxes_resized(p.resized_hw)
                if len(boxes) == 0:
                    out[i] = empty(rec)
                    continue
                props.append(Proposals(torch.from_numpy(boxes).float(), None))
            prepared.append(p)
            idx.append(i)
        for s in range(0, len(prepared), options.batch_size):
            chunk = slice(s, s + options.batch_size)
            try:
                dets = pipeline.detect_prepared(prepared[chunk], vocabulary, options,
                                                regions=props[chunk] if regions == "gt" else None)
            except Exception as e:  # name the images: evaluation needs every one of them, so this stops the run
                raise RuntimeError(f"{type(e).__name__} while running the model on "
                                   f"{', '.join(records[i].file_name for i in idx[chunk])}: {e}") from e
            for i, det in zip(idx[chunk], dets):
                det.image_id = records[i].image_id
                out[i] = det
        return [d for d in out if d is not None]

    return predict


def run_inference(dataset: DetectionDataset, predict: Predictor, output_dir: PathLike, *, batch_size: int = 1,
                  resume: bool = True, progress: bool = True, meta: Optional[Mapping[str, Any]] = None,
                  dist: Optional[DistInfo] = None) -> Optional[list[dict]]:
    """Predict every image of ``dataset`` and return all detections in results-JSON format (dataset order).

    Finished images stream into a journal through the one results writer (:mod:`regionclip.formats`), so a killed
    run resumes where it stopped. Under ``torchrun`` (``dist`` with several ranks) the images are sharded and rank 0
    merges the journals (:mod:`regionclip.parallel.sharding`); other ranks return None.

    Args:
        dataset: the images (and, for category ids, the class table).
        predict: ``predict(records) -> list[Detections]``, one per record, labels index ``dataset.class_names``.
        output_dir: where the journal(s) and the results JSON go.
        batch_size: records per ``predict`` call.
        resume: skip images already journaled; ``False`` starts over.
        progress: show a tqdm bar with ETA.
        meta: settings fingerprint stored in / checked against the journal (dataset name and size are added).
    """
    dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))
    settings = {"dataset": dataset.name, "num_images": len(dataset), **(meta or {})}
    keys = [str(r.image_id) for r in dataset]
    with ShardedResults(Path(output_dir), dataset.class_names, dataset.category_ids, settings=settings, dist=dist,
                        resume=resume, results_name=results_file_name(dataset), images_name=None,
                        fsync=False) as res:
        left = [r for r in dataset if str(r.image_id) not in res.done]
        todo = shard_items(left, dist.rank, dist.world_size, cost=lambda r: 1.0 + len(r.boxes),
                           key=lambda r: str(r.image_id))
        if len(left) < len(dataset) and dist.is_main:
            logger.info("resuming: %d of %d images already done", len(dataset) - len(left), len(dataset))
        bar = tqdm(total=len(dataset), initial=len(dataset) - len(left), unit="img",
                   disable=not progress or not dist.is_main, desc=f"evaluate {dataset.name}", dynamic_ncols=True)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            try:
                dets = predict(batch)
            except StopIteration as e:
                # raised on: a caller iterating over this run would read it as "no more images" (PEP 479 aside)
                raise RuntimeError(f"the predictor raised StopIteration on "
                                   f"{', '.join(r.file_name for r in batch)} (a bug in the predictor)") from e
            if len(dets) != len(batch):
                raise ResultsError(f"predictor returned {len(dets)} results for {len(batch)} images")
            for rec, det in zip(batch, dets):
                check_labels(det, len(dataset.category_ids), f"image {rec.image_id}")
                res.writer.add(str(rec.image_id), det, image_id=rec.image_id, file_name=rec.file_name)
            res.writer.sync()
            bar.update(len(batch) * dist.world_size)
        bar.close()
        return res.finalize(order=keys)


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

        return evaluate_lvis(dataset.annotation_file, results, allow_empty=allow_empty, image_ids=ids)

    return evaluate_coco(dataset.annotation_file, results, allow_empty=allow_empty, image_ids=ids)


def evaluate_dataset(dataset: DetectionDataset, predict: Predictor, output_dir: PathLike, *,
                     batch_size: int = 1, resume: bool = True, progress: bool = True,
                     meta: Optional[Mapping[str, Any]] = None, dist: Optional[DistInfo] = None
                     ) -> Optional[dict[str, Any]]:
    """Predict, write ``<output_dir>/{coco,lvis}_instances_results.json``, evaluate, write ``metrics.json``.

    Returns the metrics, or ``None`` for datasets without annotations (image folders).
    """
    results = run_inference(dataset, predict, output_dir, batch_size=batch_size, resume=resume,
                            progress=progress, meta=meta, dist=dist)
    if results is None:  # not rank 0 of a sharded run: rank 0 scores the merged results
        return None
    if not dataset.has_annotations:
        return None
    # A model that detects nothing is a legitimate (bad) result: score it 0 rather than fail.
    metrics = evaluate_results(dataset, results, allow_empty=True)
    write_metrics_json(metrics, Path(output_dir) / "metrics.json")
    return metrics
