"""Region-classification accuracy over GT boxes: the experiment of the paper's Fig. 1b (docs/EVALUATION.md).

Every (non-crowd, non-empty) GT box of a dataset is encoded by the model's region head (RoIAlign on the image
feature map -> res5 -> attention pool, the same path as detection in GT-box mode) and classified against the
dataset's whole vocabulary; a box counts as a top-k hit when its true class is among the k highest scores. This is
what Fig. 1b plots (top-1 on LVIS for CLIP vs RegionCLIP); for LVIS it is also split by category frequency
(rare / common / frequent).

The counting is pure (:func:`topk_hits`, :class:`RegionAccuracyCounts`, :func:`summarize_region_accuracy`); the
runner (:func:`evaluate_region_accuracy`) feeds them from :class:`~regionclip.pipeline.Pipeline`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..data.datasets import DetectionDataset, ImageRecord
from ..pipeline import Pipeline, RunOptions
from ..text.vocabulary import Vocabulary
from .inference import record_batches

__all__ = ["topk_hits", "RegionAccuracyCounts", "summarize_region_accuracy", "evaluate_region_accuracy",
           "format_region_accuracy"]

FREQUENCY_GROUPS = ("r", "c", "f")


def topk_hits(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Per box, whether its label is among the ``k`` highest scores, for each ``k``.

    Ties are broken by ``torch.topk``'s order (the lower class index first on CPU); with ``k`` larger than the
    number of classes every box is a hit.

    Args:
        scores: [R, K] class scores (probabilities or logits; only the order matters), no background column.
        labels: [R] true class indices in ``0..K-1``.
        ks: the ``k`` values.

    Returns:
        ``{k: [R] bool}``.
    """
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"topk_hits: expected scores [R, K] and labels [R], got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = int(scores.shape[1])
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"topk_hits: labels must be in 0..{num_classes - 1}, got {int(labels.min())}.."
                         f"{int(labels.max())}")
    kmax = min(max(ks), num_classes)
    top = scores.topk(kmax, dim=1).indices if scores.shape[0] else scores.new_zeros((0, kmax), dtype=torch.long)
    match = top == labels.to(top.device)[:, None]  # [R, kmax]
    return {k: match[:, :min(k, num_classes)].any(dim=1) for k in ks}


@dataclass
class RegionAccuracyCounts:
    """Per-class box counts and top-k hit counts; ``add`` accumulates, ``merge`` combines shards."""

    num_classes: int
    ks: tuple[int, ...] = (1, 5)
    boxes: np.ndarray = field(init=False)
    hits: dict[int, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError("region accuracy needs at least one class")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"k values must be >= 1, got {self.ks}")
        self.boxes = np.zeros(self.num_classes, np.int64)
        self.hits = {k: np.zeros(self.num_classes, np.int64) for k in self.ks}

    def add(self, scores: Tensor, labels: Tensor) -> None:
        """Count one image's (or any set of) boxes: scores [R, K], labels [R]."""
        if scores.shape[1:] != (self.num_classes,):
            raise ValueError(f"scores have {tuple(scores.shape[1:])} classes, the counts {self.num_classes}")
        hit = topk_hits(scores, labels, self.ks)
        lab = labels.cpu().numpy().astype(np.int64)
        self.boxes += np.bincount(lab, minlength=self.num_classes)
        for k in self.ks:
            self.hits[k] += np.bincount(lab, weights=hit[k].cpu().numpy(), minlength=self.num_classes).astype(np.int64)

    def merge(self, other: "RegionAccuracyCounts") -> None:
        if other.num_classes != self.num_classes or other.ks != self.ks:
            raise ValueError("cannot merge region-accuracy counts of different vocabularies / k values")
        self.boxes += other.boxes
        for k in self.ks:
            self.hits[k] += other.hits[k]


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else math.nan


def summarize_region_accuracy(counts: RegionAccuracyCounts, frequencies: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracies in percent.

    ``top{k}``: over all boxes (box-weighted, as Fig. 1b); ``mean_class_top{k}``: mean over the classes that have
    boxes; with LVIS ``frequencies`` (one of r/c/f per class) also ``top{k}_{r,c,f}`` over the boxes of each group
    and ``num_boxes_{r,c,f}``. A group without boxes gives NaN.
    """
    out: dict[str, Any] = {"num_boxes": int(counts.boxes.sum()), "num_classes": counts.num_classes,
                           "num_classes_with_boxes": int((counts.boxes > 0).sum())}
    present = counts.boxes > 0
    for k in counts.ks:
        out[f"top{k}"] = _pct(counts.hits[k].sum(), counts.boxes.sum())
        out[f"mean_class_top{k}"] = (float(np.mean(counts.hits[k][present] / counts.boxes[present]) * 100.0)
                                     if present.any() else math.nan)
    if frequencies:
        freq = np.asarray(list(frequencies))
        if len(freq) != counts.num_classes:
            raise ValueError(f"{len(freq)} frequencies for {counts.num_classes} classes")
        for g in FREQUENCY_GROUPS:
            sel = freq == g
            out[f"num_boxes_{g}"] = int(counts.boxes[sel].sum())
            for k in counts.ks:
                out[f"top{k}_{g}"] = _pct(counts.hits[k][sel].sum(), counts.boxes[sel].sum())
    return out


def _scores_of(pipeline: Pipeline, records: Sequence[ImageRecord], vocabulary: Vocabulary, options: RunOptions
               ) -> Iterable[tuple[int, Tensor, Tensor]]:
    """(images done, scores [R, K], labels [R]) per model batch: GT boxes built exactly as GT-mode detection builds
    them, the images streamed through the pipeline (decoding workers, equal-size batches; an unreadable image stops
    the run naming it)."""
    has_bg = bool(pipeline.model.has_background)
    for recs, b in record_batches(pipeline, records, options):
        regions = [rec.region_boxes_resized(p.resized_hw) for rec, p in zip(recs, b.prepared)]
        keep = [j for j, (boxes, _) in enumerate(regions) if len(boxes)]
        if not keep:
            yield len(recs), torch.zeros(0, len(vocabulary)), torch.zeros(0, dtype=torch.long)
            continue
        feats = pipeline.features([b.prepared[j] for j in keep], options)
        emb = pipeline.encode(feats, [torch.from_numpy(regions[j][0]).float().to(pipeline.device) for j in keep],
                              options)
        probs = pipeline.classify(emb, vocabulary)
        if has_bg:  # a fine-tuned head's background column is not a class of the vocabulary
            probs = probs[:, :-1]
        labels = np.concatenate([np.asarray(regions[j][1], np.int64) for j in keep])
        yield len(recs), probs.float().cpu(), torch.from_numpy(labels)


def evaluate_region_accuracy(pipeline: Pipeline, dataset: DetectionDataset, vocabulary: Vocabulary,
                             options: RunOptions = RunOptions(), *, ks: Sequence[int] = (1, 5),
                             progress: bool = True) -> dict[str, Any]:
    """Top-k region-classification accuracy of ``pipeline``'s model on ``dataset``'s GT boxes.

    ``vocabulary`` row i must be the dataset's class i (``dataset.class_names``). Returns
    :func:`summarize_region_accuracy` plus ``num_images``.
    """
    if not dataset.has_annotations:
        raise ValueError(f"dataset {dataset.name!r} has no annotations: region accuracy needs GT boxes and labels")
    if len(vocabulary) != len(dataset.class_names):
        raise ValueError(f"the vocabulary has {len(vocabulary)} classes but dataset {dataset.name!r} has "
                         f"{len(dataset.class_names)}; row i must embed the dataset's class i")
    counts = RegionAccuracyCounts(len(dataset.class_names), tuple(int(k) for k in ks))
    records = list(dataset.records)
    with tqdm(total=len(records), disable=not progress, desc=f"region accuracy {dataset.name}", unit="img") as bar:
        for done, scores, labels in _scores_of(pipeline, records, vocabulary, options):
            if len(labels):
                counts.add(scores, labels)
            bar.update(done)
    out = summarize_region_accuracy(counts, dataset.frequencies if dataset.kind == "lvis" else ())
    out["num_images"] = len(records)
    return out


def format_region_accuracy(metrics: dict[str, Any], label: str = "ours") -> str:
    """A markdown table: top-k overall (and per LVIS frequency group), plus the box counts."""
    ks = sorted(int(k[3:]) for k in metrics if k.startswith("top") and k[3:].isdigit())
    groups = [g for g in FREQUENCY_GROUPS if f"num_boxes_{g}" in metrics]
    cols = [f"top-{k}" for k in ks] + [f"top-{k} {g}" for k in ks for g in groups] + ["boxes"]
    vals = [metrics[f"top{k}"] for k in ks] + [metrics[f"top{k}_{g}"] for k in ks for g in groups]

    def fmt(v: Optional[float]) -> str:
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    row = [fmt(v) for v in vals] + [str(metrics["num_boxes"])]
    return "\n".join(["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                      f"| {label} | " + " | ".join(row) + " |"])
