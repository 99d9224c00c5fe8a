"""``regionclip extract-regions``: region features (and classes) of many images into a resumable sharded store.

Examples::

    regionclip extract-regions photos/ --regions rpn --topk 100 -o feats/          # docs/DESIGN.md#region-features mode A
    regionclip extract-regions photos/ --regions detections --vocab lvis1203 -o dets/   # mode B
    regionclip extract-regions --coco-json instances_val2017.json --image-root val2017/ --regions boxes -o gt/
    regionclip extract-regions photos/ --regions boxes --boxes boxes.csv --vocab "cat,dog" -o boxes/

Re-running the same command resumes (finished images are skipped). Read the output with
``regionclip.engine.extract.load_regions(output_dir)``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..data.loader import items_from_coco, items_from_inputs
from ..engine.extract import DTYPES, ExtractConfig, extract_regions, load_index
from ..formats import match_boxes, read_boxes_file
from ..parallel.distributed import DistInfo, barrier, cleanup, init_distributed
from ..parallel.sharding import rank_device
from ..text.name_cache import checkpoint_fingerprint
from .argtypes import positive_float, positive_int
from .common import (
    add_model_args,
    add_run_args,
    check_cheap_args,
    input_digests,
    load_model,
    log,
    report_unprocessed,
    run_options,
    vocabulary_from_args,
)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("extract-regions", help="region features of many images (resumable, sharded)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files, folders, or .txt lists of image paths")
    p.add_argument("--coco-json", help="take the images (and, with --regions boxes, the boxes) from a COCO/LVIS json")
    p.add_argument("--image-root", help="folder the --coco-json file names are relative to")
    p.add_argument("--regions", choices=["rpn", "detections", "boxes"], default="rpn",
                   help="rpn: top-k RPN proposals; detections: classified + post-processed (needs a vocabulary); "
                   "boxes: user boxes from --boxes or --coco-json (default rpn)")
    p.add_argument("--boxes", help="user boxes: CSV file_name,x1,y1,x2,y2 / JSON {file: [[x1,y1,x2,y2]]} / COCO json")
    p.add_argument("--topk", type=positive_int, dest="max_proposals",
                   help="RPN proposals kept per image (the original's README uses 100); the same as --max-proposals")
    p.add_argument("-o", "--output-dir", default="output/regions")
    p.add_argument("--format", choices=["shards", "original"], default="shards",
                   help="original: also write the original tool's per-image <name>.pth dicts to OUTPUT/original/")
    p.add_argument("--save-dtype", choices=list(DTYPES), default=ExtractConfig.save_dtype,
                   help="dtype of the stored feats/probs")
    p.add_argument("--pad-mixed-sizes", action="store_true",
                   help="batch images of different sizes with zero padding as the original's batched eval "
                   "(changes border features); default: only equal sizes share a batch")
    p.add_argument("--shard-mb", type=positive_float, default=256.0, help="write a shard every this many MB")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output folder's results first")
    add_model_args(p, default_preset=None)
    add_run_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_cheap_args(args)
    if args.coco_json and args.images:
        raise ValueError("give either images/folders or --coco-json, not both")
    if args.coco_json:
        items = items_from_coco(args.coco_json, args.image_root or Path(args.coco_json).parent,
                                with_boxes=args.regions == "boxes" and not args.boxes)
    elif args.images:
        items = items_from_inputs(args.images)
    else:
        raise ValueError("no input: pass image files / folders / .txt lists, or --coco-json with --image-root")
    if args.boxes:
        for it, b in zip(items, match_boxes(items, read_boxes_file(args.boxes), source=args.boxes)):
            it.boxes = b
    if args.regions == "boxes" and any(it.boxes is None for it in items):
        raise ValueError("--regions boxes needs --boxes FILE or --coco-json (its annotations are the boxes)")
    dist = init_distributed(args.device if args.device.startswith("cuda") else "cpu")
    try:
        return _extract(args, items, dist)
    finally:
        cleanup()


def _extract(args: argparse.Namespace, items: list, dist: DistInfo) -> int:
    args.device = rank_device(args.device, dist)
    # user boxes need no proposals: do not load an RPN file
    model = load_model(args, regions="gt" if args.regions == "boxes" else None, verbose=dist.is_main)
    vocab = None
    if args.regions == "detections" or args.vocab is not None or args.concept_emb is not None:
        vocab = vocabulary_from_args(model, args, verbose=dist.is_main)
    if args.regions != "boxes" and model.detector.rpn is None:
        raise ValueError(f"{model.weights_path} has no RPN weights: pass --rpn-weights (e.g. rpn_lvis_866), or use "
                         "--regions boxes with --boxes / --coco-json")
    out = Path(args.output_dir)
    if args.overwrite and out.exists() and dist.is_main:
        for sub in ("shards", "original"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "index.json").unlink(missing_ok=True)
    barrier()  # no rank reads the folder before rank 0 has cleared it
    # the run flags (--chunk-size, --max-proposals/--topk, --dtype, post-processing ...) -> cfg.run, in one place
    cfg = ExtractConfig(regions=args.regions, run=run_options(model, args, pad_mixed_sizes=args.pad_mixed_sizes),
                        save_dtype=args.save_dtype, shard_mb=args.shard_mb, write_original=args.format == "original")
    wpath = model.weights_path
    model_id = f"{wpath}#{checkpoint_fingerprint(wpath)[:16]}" if wpath is not None else "<weights>"
    rpn = "none"
    if model.detector.rpn is not None and args.regions != "boxes":
        rpn = args.rpn_weights or model.options.rpn_weights_name() or "in-checkpoint"
    # every input file by content (the class embeddings are keyed by the store itself): a file edited in place is
    # another run, refused on resume; the weights path stays first (search reads it to embed text queries)
    digests = input_digests(model, args)
    model_id += f"+rpn:{rpn}+inputs:" + ",".join(f"{k.replace('_sha256', '')}={v[:16]}"
                                                 for k, v in digests.items() if v is not None)
    summary = extract_regions(model.pipeline, items, out, cfg, vocabulary=vocab, model_id=model_id,
                              progress=not args.quiet,
                              boxes_source=args.boxes or args.coco_json or "", dist=dist)
    if not dist.is_main:
        return 0
    new = summary.num_images - summary.num_done_before - summary.num_errors
    print(f"{new} images extracted in {summary.seconds:.1f} s ({summary.images_per_s:.2f} images/s on "
          f"{args.device}, {cfg.run.dtype}); {summary.num_done_before} were already done, {summary.num_errors} "
          f"failed; {summary.num_regions} regions in {out / 'index.json'}")
    if summary.num_errors:
        log(f"{summary.num_errors} image(s) skipped: see 'errors' in {out / 'index.json'}")
    index = load_index(out)  # what the store holds, not what the run counted
    missing = report_unprocessed([it.key for it in items], (im["key"] for im in index.get("images", [])),
                                 (e["key"] for e in index.get("errors", [])))
    return 0 if summary.num_errors == 0 and missing == 0 else 1
