"""Run a predictor over a dataset, resumably, and evaluate the results (docs/DESIGN.md#results-files).

A predictor is any callable ``predict(records) -> iterable of (record, Detections)``: one pair per record, in any
order, each as soon as it is finished (labels index ``dataset.class_names``). :func:`dataset_predictor` is the
detector's, streamed through :meth:`Pipeline.iter_batches` (decoding workers, equal-size batches);
:func:`batch_predictor` makes one of a plain ``fn(records) -> list[Detections]`` (tests pass a fake built from GT).

Long runs are resumable: each finished image is appended as one JSON line to ``predictions.jsonl`` (first line: a
``meta`` fingerprint of the run's settings) and fsynced; a re-run skips the image ids already there. The final
``coco_instances_results.json`` / ``lvis_instances_results.json`` and ``metrics.json`` are written atomically.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..data.datasets import DetectionDataset, ImageRecord
from ..data.images import ImageReadError
from ..data.loader import InferenceItem
from ..formats.coco_json import check_labels
from ..parallel.distributed import DistInfo
from ..parallel.sharding import ShardedResults, shard_items
from ..pipeline import ItemBatch, ItemError, Pipeline, RunOptions, run_batch
from ..structures import Detections, Proposals
from ..text.vocabulary import Vocabulary
from .coco import evaluate_coco
from .lvis import evaluate_lvis
from .report import write_metrics_json
from .results import ResultsError

PathLike = Union[str, os.PathLike]
Predictor = Callable[[Sequence[ImageRecord]], Iterable[tuple[ImageRecord, Detections]]]
logger = logging.getLogger(__name__)

PREDICTIONS_JSONL = "predictions.jsonl"
# evaluation scores every image of the dataset, so a failed one ends the run (detect goes on past it)
_STOPS = ("; evaluation scores every image of the dataset, so it stops here: fix or remove the image and run the "
          "same command again (finished images are kept)")


def results_file_name(dataset: DetectionDataset) -> str:
    """The original's file name for the dataset's kind (docs/DESIGN.md#results-files)."""
    return "lvis_instances_results.json" if dataset.kind == "lvis" else "coco_instances_results.json"


def _names(records: Sequence[ImageRecord], k: int = 3) -> str:
    return ", ".join(r.file_name for r in records[:k]) + (f" (+{len(records) - k})" if len(records) > k else "")


def check_image_size(rec: ImageRecord, original_hw: tuple[int, int]) -> None:
    """Refuse an image whose decoded size is not its annotation's: its GT boxes would be misplaced."""
    if tuple(original_hw) != (rec.height, rec.width):
        raise ValueError(f"{rec.file_name} is {original_hw[1]}x{original_hw[0]} but its annotation says "
                         f"{rec.width}x{rec.height}; the boxes would be misplaced")


def unreadable(error: str) -> ImageReadError:
    """The error that ends an evaluation at an image that could not be decoded (every image must be scored)."""
    return ImageReadError(error + _STOPS)


def record_items(records: Sequence[ImageRecord]) -> list[InferenceItem]:
    """The records as pipeline inputs, keyed by position (image ids need not be distinct as strings elsewhere)."""
    return [InferenceItem(key=str(i), file_name=r.file_name, image_id=r.image_id) for i, r in enumerate(records)]


def record_batches(pipeline: Pipeline, records: Sequence[ImageRecord], options: RunOptions
                   ) -> Iterator[tuple[list[ImageRecord], ItemBatch]]:
    """``records`` decoded through :meth:`Pipeline.iter_batches` (``options.num_workers`` DataLoader workers,
    up to ``options.batch_size`` images of equal resized size per batch), as ``(records, batch)`` in the batch's
    order. An image that cannot be read, or whose size is not its annotation's, stops the stream naming it."""
    records = list(records)
    for b in pipeline.iter_batches(record_items(records), options):
        if isinstance(b, ItemError):
            raise unreadable(b.error)
        recs = [records[int(it.key)] for it in b.items]
        for rec, p in zip(recs, b.prepared):
            check_image_size(rec, p.original_hw)
        yield recs, b


def batch_predictor(fn: Callable[[list[ImageRecord]], Sequence[Detections]], batch_size: int = 1) -> Predictor:
    """A :data:`Predictor` from ``fn(records) -> list[Detections]`` (one per record, in order), called on
    ``batch_size`` records at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def predict(records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, Detections]]:
        for s in range(0, len(records), batch_size):
            batch = list(records[s:s + batch_size])
            try:
                dets = fn(batch)
            except StopIteration as e:
                # raised on, it would end the caller's loop as if the images had run out (PEP 479 aside)
                raise RuntimeError(f"the predictor raised StopIteration on {_names(batch)} (a bug in the "
                                   "predictor)") from e
            if len(dets) != len(batch):
                raise ResultsError(f"predictor returned {len(dets)} results for {len(batch)} images")
            yield from zip(batch, dets)

    return predict


def dataset_predictor(pipeline: Pipeline, vocabulary: Vocabulary, options: RunOptions, regions: str = "rpn"
                      ) -> Predictor:
    """The detector as a :data:`Predictor`: the records stream through :meth:`Pipeline.iter_batches` (decoded in
    ``options.num_workers`` DataLoader workers, ``options.batch_size`` equal-size images per model pass), with
    RPN proposals (``regions="rpn"``) or the records' GT boxes (``"gt"``); used by ``regionclip evaluate`` and by
    evaluation during training.

    GT mode builds each record's regions in the resized frame exactly as the original's test mapper does
    (:meth:`ImageRecord.region_boxes_resized`: crowd removed, whole-number json boxes truncated after scaling,
    clipped, empty removed); an image left without regions gets no detections (the original has nothing to
    classify), not an error. An image that cannot be read, whose size is not its annotation's, or on which the
    model fails stops the stream with an error naming it (pairs already yielded stay valid).
    """
    if regions not in ("rpn", "gt"):
        raise ValueError(f"regions must be 'rpn' or 'gt', got {regions!r}")
    if regions == "rpn" and getattr(pipeline.model, "rpn", None) is None:
        raise RuntimeError("this model has no region proposal network: evaluate with GT boxes (regions='gt'), or "
                           "load RPN weights (e.g. --rpn-weights rpn_lvis_866.pth)")

    def empty(rec: ImageRecord) -> Detections:
        return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                          (rec.height, rec.width), list(vocabulary.names), image_id=rec.image_id)

    def detect(b: ItemBatch) -> list[Detections]:
        return pipeline.detect_prepared(b.prepared, vocabulary, options, regions=b.regions)

    def predict(records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, Detections]]:
        for recs, b in record_batches(pipeline, records, options):
            if regions == "gt":
                keep, props = [], []
                for j, (rec, p) in enumerate(zip(recs, b.prepared)):
                    boxes, _ = rec.region_boxes_resized(p.resized_hw)
                    if len(boxes) == 0:
                        yield rec, empty(rec)
                        continue
                    keep.append(j)
                    props.append(Proposals(torch.from_numpy(boxes).float(), None))
                if not keep:
                    continue
                recs = [recs[j] for j in keep]
                b = ItemBatch([b.items[j] for j in keep], [b.prepared[j] for j in keep], props)
            for rec, det in zip(recs, run_batch(b, detect)):  # a failing image is pinned down and named
                if isinstance(det, ItemError):
                    raise RuntimeError(det.error + _STOPS)
                det.image_id = rec.image_id
                yield rec, det

    return predict


def run_inference(dataset: DetectionDataset, predict: Predictor, output_dir: PathLike, *, resume: bool = True,
                  progress: bool = True, meta: Optional[Mapping[str, Any]] = None,
                  dist: Optional[DistInfo] = None) -> Optional[list[dict]]:
    """Predict every image of ``dataset`` and return all detections in results-JSON format (dataset order).

    Finished images stream into a journal through the one results writer (:mod:`regionclip.formats`), so a killed
    run resumes where it stopped; a predictor that raises stops the run with the images finished before it kept.
    Under ``torchrun`` (``dist`` with several ranks) the images are sharded and rank 0 merges the journals
    (:mod:`regionclip.parallel.sharding`); other ranks return None.

    Args:
        dataset: the images (and, for category ids, the class table).
        predict: a :data:`Predictor` (batching, if any, is its own: :class:`RunOptions` ``batch_size``).
        output_dir: where the journal(s) and the results JSON go.
        resume: skip images already journaled; ``False`` starts over.
        progress: show a tqdm bar with ETA.
        meta: settings fingerprint stored in / checked against the journal (dataset name and size are added).
    """
    dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))
    settings = {"dataset": dataset.name, "num_images": len(dataset), **(meta or {})}
    keys = [str(r.image_id) for r in dataset]
    with ShardedResults(Path(output_dir), dataset.class_names, dataset.category_ids, settings=settings, dist=dist,
                        resume=resume, results_name=results_file_name(dataset), images_name=None) as res:
        left = [r for r in dataset if str(r.image_id) not in res.done]
        todo = shard_items(left, dist.rank, dist.world_size, cost=lambda r: 1.0 + len(r.boxes),
                           key=lambda r: str(r.image_id))
        if len(left) < len(dataset) and dist.is_main:
            logger.info("resuming: %d of %d images already done", len(dataset) - len(left), len(dataset))
        bar = tqdm(total=len(dataset), initial=len(dataset) - len(left), unit="img",
                   disable=not progress or not dist.is_main, desc=f"evaluate {dataset.name}", dynamic_ncols=True)
        if todo:
            _journal(predict, todo, res.writer, len(dataset.category_ids), bar, dist.world_size)
        bar.close()
        return res.finalize(order=keys)


def _journal(predict: Predictor, todo: list[ImageRecord], writer: Any, num_classes: int, bar: Any, step: int
             ) -> None:
    """Write each (record, detections) of ``predict(todo)`` as it comes; every record exactly once."""
    pending = {str(r.image_id): r for r in todo}
    try:
        stream = predict(todo)
    except StopIteration as e:  # raised on, it would read as "no more images" to a caller iterating over us
        raise RuntimeError(f"the predictor raised StopIteration on {_names(todo)} (a bug in the predictor)") from e
    for rec, det in stream:
        if pending.pop(str(rec.image_id), None) is None:
            raise ResultsError(f"the predictor returned image {rec.image_id} ({rec.file_name}) twice or without "
                               "being given it (a bug in the predictor)")
        check_labels(det, num_classes, f"image {rec.image_id}")
        writer.add(str(rec.image_id), det, image_id=rec.image_id, file_name=rec.file_name)
        bar.update(step)
    if pending:
        missing = list(pending.values())
        raise ResultsError(f"predictor returned {len(todo) - len(missing)} results for {len(todo)} images: none "
                           f"for {_names(missing)} (a bug in the predictor)")


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
                     resume: bool = True, progress: bool = True,
                     meta: Optional[Mapping[str, Any]] = None, dist: Optional[DistInfo] = None
                     ) -> Optional[dict[str, Any]]:
    """Predict, write ``<output_dir>/{coco,lvis}_instances_results.json``, evaluate, write ``metrics.json``.

    Returns the metrics, or ``None`` for datasets without annotations (image folders).
    """
    results = run_inference(dataset, predict, output_dir, resume=resume, progress=progress, meta=meta, dist=dist)
    if results is None:  # not rank 0 of a sharded run: rank 0 scores the merged results
        return None
    if not dataset.has_annotations:
        return None
    # A model that detects nothing is a legitimate (bad) result: score it 0 rather than fail.
    metrics = evaluate_results(dataset, results, allow_empty=True)
    write_metrics_json(metrics, Path(output_dir) / "metrics.json")
    return metrics
