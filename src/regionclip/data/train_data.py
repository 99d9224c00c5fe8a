"""Training data: augmentation, the dataset of training samples, and the deterministic samplers (docs/DESIGN.md#transfer-learning).

Determinism is what makes ``--resume`` exact: the order of images is a pure function of ``(seed, rank, world
size)`` (one seeded permutation per epoch, optionally with repeat-factor sampling), and every sample carries its
own augmentation seed (derived from its position in that order). Resuming at iteration ``k`` replays the index
arithmetic of the first ``k`` batches — no image is read — and continues exactly where the interrupted run was,
whatever the number of data-loader workers.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..utils import require
from .datasets import LVIS_MAX_BOXES_PER_IMAGE, DetectionDataset, ImageRecord
from .images import load_image, resize_image, resized_shape

__all__ = ["TrainSample", "TrainingDataset", "TrainingSampleError", "TrainingSampler", "GroupedBatchSampler", "filter_empty_records",
           "repeat_factors", "load_segmentations", "polygons_to_roi_masks", "sample_seed"]

Polygons = list[np.ndarray]  # one instance: list of [2k] float arrays (x0, y0, x1, y1, ...)


@dataclass
class TrainSample:
    """One augmented training image. ``boxes`` [G, 4] XYXY float32 and ``polygons`` in the resized (and flipped)
    frame of ``image`` (uint8 RGB [3, h, w]); ``labels`` [G] contiguous base-class indices."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    image_id: Any
    polygons: Optional[list[Polygons]] = None


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at global ``position`` of the index stream (independent of workers)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, position]).generate_state(1)[0])


def filter_empty_records(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """detectron2 ``FILTER_EMPTY_ANNOTATIONS``: drop images without a single non-crowd annotation."""
    return [r for r in records if bool((~r.iscrowd).any())]


def repeat_factors(records: Sequence[ImageRecord], num_classes: int, threshold: float = 0.001) -> np.ndarray:
    """LVIS repeat factors (detectron2 ``repeat_factors_from_category_frequency``).

    ``f(c)`` = fraction of images containing class ``c``; ``r(c) = max(1, sqrt(threshold / f(c)))``; an image's
    factor is the max over its classes (1 for an image without annotations).
    """
    counts = np.zeros(num_classes, np.float64)
    for r in records:
        counts[np.unique(r.labels)] += 1
    freq = counts / max(1, len(records))
    with np.errstate(divide="ignore"):
        cat_rep = np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, np.inf)))
    return np.array([max([1.0] + [float(cat_rep[c]) for c in np.unique(r.labels)]) for r in records], np.float64)


def load_segmentations(dataset: DetectionDataset) -> dict[Any, list[Any]]:
    """Per image, the ``segmentation`` of each annotation, in the order of :class:`ImageRecord`'s boxes.

    The dataset readers keep boxes only; masks are needed just for mask-head training, so they are read here
    from the same file with the same rules (file order, categories of the dataset, LVIS's 500-box cap).
    """
    if dataset.annotation_file is None:
        raise ValueError(f"dataset {dataset.name!r} has no annotation file; mask training needs segmentations")
    with open(dataset.annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    keep = set(dataset.category_ids)
    out: dict[Any, list[Any]] = {}
    for a in data.get("annotations", []):
        if a["category_id"] in keep:
            out.setdefault(a["image_id"], []).append(a.get("segmentation"))
    if dataset.kind == "lvis":
        out = {k: v[:LVIS_MAX_BOXES_PER_IMAGE] for k, v in out.items()}
    for r in dataset.records:
        n = len(out.get(r.image_id, []))
        if n != len(r.boxes):
            raise ValueError(f"{dataset.annotation_file}: image {r.image_id} has {len(r.boxes)} boxes but {n} "
                             "segmentations after filtering; the file and the dataset disagree")
    return out


def _polygons_of(seg: Any, box_xyxy: np.ndarray, image_id: Any) -> Polygons:
    if isinstance(seg, list) and seg and all(isinstance(p, (list, tuple)) and len(p) >= 6 for p in seg):
        return [np.asarray(p, np.float64) for p in seg]
    # RLE / missing masks of non-crowd objects are rare (none in COCO or LVIS); the box is a usable stand-in.
    warnings.warn(f"image {image_id}: segmentation is not a polygon list; using its box as the mask target",
                  UserWarning, stacklevel=3)
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], np.float64)]


def polygons_to_roi_masks(polygons: Sequence[Polygons], gt_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Mask targets: each RoI's matched GT polygons cropped to the RoI and rasterised at ``size`` x ``size``.

    detectron2's ``PolygonMasks.crop_and_resize`` step for step: translate by the box origin, scale by
    ``size / max(box side, 0.1)`` (box in float32, as the original's), rasterise with the COCO API's polygon
    rasteriser and take the union of an instance's parts. The rasteriser matters: PIL's fill rule differs from
    COCO's on ~5 % of the 28x28 target pixels (docs/TRAINING.md#fidelity). Returns [F, size, size] float32 in {0, 1}.
    """
    mask_util = require("pycocotools.mask", "train", "mask-head training (polygon mask targets)")
    out = torch.zeros(len(gt_index), size, size, dtype=torch.float32)
    for i, (g, box) in enumerate(zip(gt_index.tolist(), boxes.detach().float().cpu().numpy())):
        w, h = box[2] - box[0], box[3] - box[1]
        ratio_w, ratio_h = size / max(w, 0.1), size / max(h, 0.1)
        parts = []
        for poly in polygons[g]:
            p = np.array(poly, dtype=np.float64)
            p[0::2] = (p[0::2] - box[0]) * ratio_w
            p[1::2] = (p[1::2] - box[1]) * ratio_h
            parts.append(p)
        if parts:
            rle = mask_util.merge(mask_util.frPyObjects(parts, size, size))
            out[i] = torch.from_numpy(mask_util.decode(rle).astype(np.float32))
    return out


class TrainingSampleError(ValueError):
    """A training image that could not be turned into a sample (named in the message)."""


class TrainingDataset(torch.utils.data.Dataset):
    """Images + non-crowd annotations, with multi-scale resize and horizontal flip (detectron2's train mapper).

    Indexed by ``(record index, augmentation seed)`` keys from :class:`GroupedBatchSampler`: the seed picks the
    shorter side from ``min_sizes`` and the flip, so a sample is the same in every run and in every worker.
    """

    def __init__(self, records: Sequence[ImageRecord], min_sizes: Sequence[int] = (640, 672, 704, 736, 768, 800),
                 max_size: int = 1333, flip: bool = True,
                 segmentations: Optional[dict[Any, list[Any]]] = None) -> None:
        if not records:
            raise ValueError("no training images (after removing images without annotations)")
        if not min_sizes:
            raise ValueError("min_sizes must list at least one shorter-side size")
        self.records = list(records)
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.flip = flip
        self.segmentations = segmentations

    def __len__(self) -> int:
        return len(self.records)

    def aspect_groups(self) -> np.ndarray:
        """0 for landscape (w > h), 1 otherwise — detectron2's two aspect-ratio groups."""
        return np.array([0 if r.width > r.height else 1 for r in self.records], np.int64)

    def __getitem__(self, key: Any) -> TrainSample:
        index, seed = key if isinstance(key, tuple) else (int(key), 0)
        rec = self.records[index]
        try:
            return self._sample(rec, seed)
        except Exception as e:
            # Named, and never a StopIteration: re-raised from a DataLoader worker that would end the epoch as if
            # the data had run out. Training needs every image, so this stops the run (the error says which image).
            msg = str(e) or type(e).__name__
            raise TrainingSampleError(msg if rec.file_name in msg else f"training image {rec.file_name} "
                                      f"(id {rec.image_id}): {type(e).__name__}: {msg}") from e

    def _sample(self, rec: ImageRecord, seed: int) -> TrainSample:
        rng = np.random.default_rng(seed)
        short = int(self.min_sizes[int(rng.integers(len(self.min_sizes)))])
        flip = bool(self.flip and rng.random() < 0.5)
        img = load_image(rec.file_name)
        h, w = int(img.shape[1]), int(img.shape[2])
        if (h, w) != (rec.height, rec.width):
            raise ValueError(f"{rec.file_name}: image is {w}x{h} but its annotation says {rec.width}x{rec.height}")
        nh, nw = resized_shape(h, w, short, self.max_size)
        img = resize_image(img, short, self.max_size)
        sx, sy = nw / w, nh / h
        keep = ~rec.iscrowd
        boxes = rec.boxes[keep].astype(np.float64) * np.array([sx, sy, sx, sy])
        # a bbox written with integers stays an integer array in detectron2's mapper: its resized coordinates are
        # truncated toward zero (as in GT-mode inference, ImageRecord.region_boxes_resized)
        boxes = np.where(rec.int_box_flags[keep][:, None], np.trunc(boxes), boxes)
        polys = None
        if self.segmentations is not None:
            segs = [s for s, k in zip(self.segmentations.get(rec.image_id, []), keep) if k]
            polys = [[p * np.tile([sx, sy], len(p) // 2) for p in _polygons_of(s, b, rec.image_id)]
                     for s, b in zip(segs, rec.boxes[keep])]
        if flip:
            img = img.flip(-1)
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], axis=1)
            if polys is not None:
                polys = [[np.stack([nw - p[0::2], p[1::2]], 1).reshape(-1) for p in inst] for inst in polys]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        # detectron2 filter_empty_instances: Boxes.nonempty(threshold=1e-5)
        nonempty = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        labels = rec.labels[keep][nonempty]
        if polys is not None:
            polys = [p for p, k in zip(polys, nonempty) if k]
        return TrainSample(img.contiguous(), torch.from_numpy(boxes[nonempty].astype(np.float32)).reshape(-1, 4),
                           torch.from_numpy(labels.astype(np.int64)), rec.image_id, polys)


class TrainingSampler:
    """Infinite stream of ``(record index, global position)`` for one rank.

    Epoch ``e`` is a permutation drawn from ``default_rng([seed, e])``; with ``repeat_factors`` each image first
    appears ``floor(r) + Bernoulli(frac(r))`` times (detectron2 ``RepeatFactorTrainingSampler``). Global positions
    are dealt round-robin to the ranks (``position % world_size == rank``), so ranks never share a sample.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 repeat_factors: Optional[np.ndarray] = None) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.repeat_factors = None if repeat_factors is None else np.asarray(repeat_factors, np.float64)

    def _epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
        if self.repeat_factors is None:
            return rng.permutation(self.size)
        whole = np.floor(self.repeat_factors)
        reps = whole + (rng.random(self.size) < self.repeat_factors - whole)
        return rng.permutation(np.repeat(np.arange(self.size), reps.astype(np.int64)))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position, epoch = 0, 0
        while True:
            order = self._epoch(epoch)
            # this rank's entries of the epoch: positions congruent to rank modulo world size
            first = (self.rank - position) % self.world_size
            for j in range(first, len(order), self.world_size):
                yield int(order[j]), position + j
            position += len(order)
            epoch += 1


class GroupedBatchSampler:
    """Batches of ``(index, augmentation seed)`` keys, grouped by aspect ratio (detectron2
    ``AspectRatioGroupedDataset``): images go to a buffer per group and a batch is emitted when one buffer is full.

    ``start_batch`` skips the first batches by index arithmetic only (exact resume).
    """

    def __init__(self, sampler: TrainingSampler, batch_size: int, groups: Optional[np.ndarray] = None,
                 seed: int = 0, start_batch: int = 0) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size per rank must be positive, got {batch_size}")
        self.sampler, self.batch_size, self.groups = sampler, batch_size, groups
        self.seed, self.start_batch = seed, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        emitted = 0
        for index, position in self.sampler:
            g = int(self.groups[index]) if self.groups is not None else 0
            buf = buffers.setdefault(g, [])
            buf.append((index, position))
            if len(buf) == self.batch_size:
                emitted += 1
                # seeds only for emitted batches: replaying 180k skipped batches stays index arithmetic
                batch = [(i, sample_seed(self.seed, p)) for i, p in buf] if emitted > self.start_batch else None
                buf.clear()
                if batch is not None:
                    yield batch
