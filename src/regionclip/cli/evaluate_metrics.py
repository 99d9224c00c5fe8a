"""``regionclip evaluate --metric region-accuracy | proposals`` (docs/EVALUATION.md): the non-AP metrics.

* ``region-accuracy``: top-1 / top-5 classification of every GT box against the dataset's vocabulary (paper
  Fig. 1b), per frequency group for LVIS; any checkpoint ``--weights`` loads (plain OpenAI CLIP included).
* ``proposals``: COCO AR@100/300/1000 (all / small / medium / large) of the offline RPN ``--rpn-weights`` (or the
  ``offline_*`` RPN stored in ``--weights``).

Both write ``<output-dir>/<metric>.json`` atomically and print a table.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..checkpoint.io import load_state_dict
from ..checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from ..data.datasets import DetectionDataset
from ..evaluation.proposals import AR_MAX_DETS, evaluate_proposals, format_proposal_recall
from ..evaluation.region_accuracy import evaluate_region_accuracy, format_region_accuracy
from ..evaluation.report import write_metrics_json
from ..modeling.rpn import build_offline_rpn
from ..weights.pretrained import resolve_weights
from .common import load_model, log, run_options, vocabulary_from_args

__all__ = ["run_metric", "load_rpn_for_recall"]


def _out_dir(args: argparse.Namespace, dataset: DetectionDataset) -> Path:
    return Path(args.output_dir or Path("output") / "inference" / dataset.name)


def run_metric(args: argparse.Namespace, dataset: DetectionDataset) -> int:
    """Dispatch on ``args.metric`` (the dataset is already loaded and cut to ``--limit``)."""
    if not dataset.has_annotations:
        raise ValueError(f"--metric {args.metric} needs a dataset with annotations (GT boxes); --images has none")
    if args.metric == "region-accuracy":
        return _region_accuracy(args, dataset)
    if args.metric == "proposals":
        return _proposals(args, dataset)
    raise ValueError(f"unknown --metric {args.metric!r}")


def _region_accuracy(args: argparse.Namespace, dataset: DetectionDataset) -> int:
    if args.vocab is not None:
        raise ValueError("--vocab is not used with --metric region-accuracy: the classes are the dataset's")
    args.vocab = list(dataset.class_names)
    model = load_model(args, regions="gt", verbose=not args.no_progress)
    vocab = vocabulary_from_args(model, args, verbose=not args.no_progress)
    options = run_options(model, args)
    metrics: dict[str, Any] = evaluate_region_accuracy(model.pipeline, dataset, vocab, options,
                                                       progress=not args.no_progress)
    metrics["weights"] = str(model.weights_path)
    out = _out_dir(args, dataset) / "region_accuracy.json"
    write_metrics_json(metrics, out)
    print(f"metrics: {out}\n")
    print(format_region_accuracy(metrics, label=Path(str(model.weights_path)).stem))
    return 0


def load_rpn_for_recall(weights: str, *, nms_thresh: float = 0.7, post_nms_topk: int = max(AR_MAX_DETS),
                        device: str = "cpu") -> Any:
    """An :class:`OfflineRPN` from a released/trained RPN file (or a RegionCLIP file with ``offline_*`` keys),
    keeping ``post_nms_topk`` proposals per image after NMS at ``nms_thresh``."""
    raw = load_state_dict(resolve_weights(weights))
    sd, _ = rpn_state_dict_from_checkpoint(raw)
    if not sd:
        raise ValueError(f"{weights}: holds no offline RPN (no backbone.* / proposal_generator.* / offline_* keys); "
                         "give a detectron2 RPN file with --rpn-weights")
    rpn = build_offline_rpn(infer_rpn_config(sd, nms_thresh=nms_thresh, post_nms_topk=post_nms_topk))
    rpn.load_state_dict(sd, strict=True)
    return rpn.to(device)


def _proposals(args: argparse.Namespace, dataset: DetectionDataset) -> int:
    source = args.rpn_weights or args.weights
    if source is None:
        raise ValueError("--metric proposals needs --rpn-weights (an RPN file, path or released name) or --weights "
                         "(a checkpoint carrying the offline RPN)")
    rpn = load_rpn_for_recall(source, nms_thresh=args.rpn_nms_thresh, device=args.device)
    log(f"RPN: {source} ({rpn.cfg.arch}, NMS {rpn.cfg.nms_thresh}, {rpn.cfg.post_nms_topk} proposals per image)")
    metrics: dict[str, Any] = evaluate_proposals(rpn, dataset, progress=not args.no_progress,
                                                 max_pixels=args.max_pixels or None, num_workers=args.num_workers,
                                                 batch_size=args.batch_size)
    metrics["rpn_weights"] = str(source)
    out = _out_dir(args, dataset) / "proposals.json"
    write_metrics_json(metrics, out)
    print(f"metrics: {out}\n")
    print(format_proposal_recall(metrics, label=Path(str(source)).stem))
    return 0
