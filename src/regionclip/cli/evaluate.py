"""``regionclip evaluate``: run the detector over a dataset, write the results and metrics JSON, print the table.

Resumable: finished images accumulate in ``<output-dir>/predictions.jsonl``; re-running the same command skips
them. See docs/EVALUATION.md for the scenarios that reproduce the original's evaluation commands.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.datasets import load_annotations, load_image_folder, load_registered
from ..evaluation import evaluate_dataset, format_metrics
from ..evaluation.inference import dataset_predictor, results_file_name
from ..evaluation.scenarios import SCENARIOS, get_scenario
from ..formats import merge_journals
from ..inference.presets import get_preset
from ..parallel.distributed import DistInfo, cleanup, init_distributed
from ..parallel.sharding import journals, rank_device
from ..text.vocabulary import resolve_names
from .argtypes import fraction, positive_int
from .common import (
    add_model_args,
    add_run_args,
    check_cheap_args,
    input_digests,
    load_model,
    postprocess_overrides,
    report_unprocessed,
    run_options,
    vocabulary_from_args,
)
from .evaluate_metrics import run_metric

NAME = "evaluate"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="evaluate on COCO / LVIS (or write results for an image folder)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS),
                   help="the original's evaluation setting: sets --preset and --dataset (see docs/EVALUATION.md)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="registered name (e.g. coco_2017_ovd_all_test, lvis_v1_val) or annotation json")
    d.add_argument("--images", help="a folder of images without annotations: writes results only")
    d.add_argument("--data-root", default="datasets", help="root of the registered datasets ($DETECTRON2_DATASETS)")
    d.add_argument("--image-root", help="image folder for a --dataset json path")
    d.add_argument("--regions", choices=["gt", "rpn"], help="GT boxes or RPN proposals (default: the preset's)")
    d.add_argument("--limit", type=positive_int, help="only the first N images (scored on those images only)")
    d.add_argument("--metric", choices=["detection", "region-accuracy", "proposals"], default="detection",
                   help="detection AP (default); region-accuracy: top-1/top-5 of GT boxes (paper Fig. 1b); proposals: "
                        "AR@100/300/1000 of the offline RPN (docs/EVALUATION.md)")
    d.add_argument("--rpn-nms-thresh", type=fraction, default=0.7, help="--metric proposals: RPN NMS (detectron2: 0.7)")
    r = p.add_argument_group("run")
    r.add_argument("-o", "--output-dir", help="default output/inference/<dataset>")
    r.add_argument("--no-resume", "--overwrite", dest="no_resume", action="store_true",
                   help="start over instead of skipping finished images")
    r.add_argument("--no-progress", action="store_true")
    add_model_args(p, default_preset=None)
    add_run_args(p)
    return p


def _dataset(args: argparse.Namespace):
    if args.images:
        return load_image_folder(args.images, resolve_names(args.vocab or "lvis1203")[0])
    if not args.dataset:
        raise ValueError("give --scenario, --dataset (registered name or annotation json) or --images")
    if Path(args.dataset).suffix == ".json":
        if not args.image_root:
            raise ValueError("--dataset given as a json path needs --image-root (the folder holding its images)")
        return load_annotations(args.dataset, args.image_root)
    return load_registered(args.dataset, args.data_root)


def run(args: argparse.Namespace) -> int:
    check_cheap_args(args)
    scenario = get_scenario(args.scenario) if args.scenario else None
    if scenario is not None:
        args.preset = args.preset or scenario.preset
        if not args.images:
            args.dataset = args.dataset or scenario.dataset
    preset = get_preset(args.preset) if args.preset else None
    regions = args.regions or (preset.regions if preset else "rpn")
    dataset = _dataset(args)
    if args.limit is not None:
        dataset.records = dataset.records[:args.limit]
    if args.metric != "detection":
        return run_metric(args, dataset)
    if regions == "gt" and not dataset.has_annotations:
        raise ValueError("--regions gt needs a dataset with annotations (GT boxes); an image folder has none")
    # The classifier's rows must be the dataset's classes in contiguous order: results map label -> category id.
    if args.vocab is not None and not args.images:
        raise ValueError("--vocab is for --images only: a dataset's classes come from its annotation file")
    args.vocab = list(dataset.class_names)
    dist = init_distributed(args.device if args.device.startswith("cuda") else "cpu")
    try:
        return _evaluate(args, dataset, regions, scenario, dist)
    finally:
        cleanup()


def _evaluate(args: argparse.Namespace, dataset: Any, regions: str, scenario: Any, dist: DistInfo) -> int:
    args.device = rank_device(args.device, dist)
    model = load_model(args, regions=regions, verbose=dist.is_main)
    vocab = vocabulary_from_args(model, args, verbose=not args.no_progress and dist.is_main)
    options = run_options(model, args)
    out_dir = Path(args.output_dir or Path("output") / "inference" / dataset.name)
    meta = {"preset": args.preset, "regions": regions, "limit": args.limit,
            "postprocess": postprocess_overrides(args), "dtype": options.dtype,
            **input_digests(model, args, vocab)}  # input files by content: an edited file is not resumed into
    # images stream through the pipeline (--num-workers decoding processes, --batch-size equal-size images per pass)
    metrics = evaluate_dataset(dataset, dataset_predictor(model.pipeline, vocab, options, regions), out_dir,
                               resume=not args.no_resume, progress=not args.no_progress, meta=meta, dist=dist)
    if not dist.is_main:
        return 0
    print(f"results: {out_dir / results_file_name(dataset)}")
    # every image of the dataset must have a journaled result: scores over fewer images are not the dataset's
    journal = merge_journals(journals(out_dir))
    missing = report_unprocessed([str(r.image_id) for r in dataset], journal.entries, journal.errors)
    if metrics is not None:
        print(f"metrics: {out_dir / 'metrics.json'}" + (f" (over {len(dataset) - missing} of {len(dataset)} images "
                                                         "only)" if missing else "") + "\n")
        print(format_metrics(metrics, label=args.preset or "ours"))
        if scenario is not None:
            print(f"\npublished ({scenario.name}): {scenario.reported}")
    return 1 if missing else 0
