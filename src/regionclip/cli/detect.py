"""``regionclip detect``: images or folders in, a COCO-style results JSON (+ other formats, annotated images) out.

Runs on one process or sharded under ``torchrun`` (docs/DESIGN.md#sharding). Results stream to ``<output-dir>/predictions.jsonl`` as images finish; re-running the same command resumes
(finished images are skipped, failed ones retried). An image that cannot be used (unreadable, too large, bad
boxes) is reported with its name and skipped; the others are written, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..assets import demo_image_paths
from ..data.images import decode_image, image_size
from ..data.loader import InferenceItem, items_from_inputs
from ..evaluation.visualize import MAX_SIDE, bounded_size, draw_results, select_predictions
from ..formats import FORMATS, export_journal, match_boxes, read_boxes_file
from ..parallel.distributed import DistInfo, broadcast_object, cleanup, init_distributed
from ..parallel.sharding import ShardedResults, rank_device, shard_items
from ..utils import atomic_path
from .argtypes import fraction, nonneg_float, nonneg_int
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
    p = sub.add_parser("detect", help="zero-shot detection on images", description=__doc__)
    p.add_argument("images", nargs="*", help="image files, folders or .txt lists (default: the two bundled demo "
                   "images)")
    p.add_argument("--boxes", help="classify these boxes instead of RPN proposals: COCO json, {file: [[x1,y1,x2,y2]]} "
                   "or CSV file_name,x1,y1,x2,y2")
    p.add_argument("-o", "--output-dir", default="output/detect")
    p.add_argument("--format", choices=FORMATS, default="coco",
                   help="results format besides the COCO results.json: jsonl, csv or yolo (labels/ + classes.txt)")
    p.add_argument("--overwrite", "--no-resume", dest="overwrite", action="store_true",
                   help="start over instead of resuming an earlier run")
    p.add_argument("--no-vis", action="store_true", help="do not write annotated images")
    p.add_argument("--vis-conf-threshold", type=fraction, default=0.05)
    p.add_argument("--vis-max-boxes", type=nonneg_int, default=25)
    p.add_argument("--vis-small-region-px", type=nonneg_float, default=8100.0, help="skip boxes smaller than this area")
    add_model_args(p)
    add_run_args(p)
    return p


def _items(args: argparse.Namespace) -> list[InferenceItem]:
    items = items_from_inputs(args.images or [str(p) for p in demo_image_paths()])
    for i, it in enumerate(items):
        it.image_id = i + 1  # position in the input list, also for skipped images (ids stay stable across runs)
    if args.boxes:
        for it, b in zip(items, match_boxes(items, read_boxes_file(args.boxes), source=args.boxes)):
            it.boxes = b
    return items


def run(args: argparse.Namespace) -> int:
    check_cheap_args(args)
    items = _items(args)  # bad paths / boxes files fail here, before the model loads
    dist = init_distributed(args.device if args.device.startswith("cuda") else "cpu")
    try:
        return _run(args, items, dist)
    finally:
        cleanup()


def _run(args: argparse.Namespace, items: list[InferenceItem], dist: DistInfo) -> int:
    args.device = rank_device(args.device, dist)
    model = load_model(args, regions="gt" if args.boxes else None, verbose=dist.is_main)
    vocab = vocabulary_from_args(model, args, verbose=dist.is_main)
    options = run_options(model, args)
    out_dir = Path(args.output_dir)
    # the settings fingerprint of the journal: a resumed run with other settings or other input files (by content)
    # is refused; the settings are the RunOptions this run uses (its --score-thresh etc. applied)
    settings = {"settings": model.settings.describe(options.postprocess), "postprocess": options.postprocess.__dict__,
                "dtype": options.dtype, "max_proposals": options.max_proposals,
                **input_digests(model, args, vocab)}
    keys = [it.key for it in items]
    names = dict(zip(vocab.category_ids, vocab.names))
    t0, n_done = time.perf_counter(), 0
    with ShardedResults(out_dir, vocab.names, vocab.category_ids, settings=settings, dist=dist, what="detect run",
                        resume=not args.overwrite) as res:
        left = [it for it in items if it.key not in res.done]
        todo = shard_items(left, dist.rank, dist.world_size)
        if len(left) < len(items) and dist.is_main:
            log(f"resuming: {len(items) - len(left)} of {len(items)} images already done in {out_dir}")
        with _progress(len(items), len(items) - len(left), args.quiet or not dist.is_main) as bar:
            for r in model.run(todo, options, vocabulary=vocab, boxes_source=args.boxes or "") if todo else []:
                it = r.item
                if r.error is not None:
                    res.writer.add_error(it.key, r.error, file_name=it.file_name)
                    log(f"skipping {it.file_name}: {r.error}")
                else:
                    assert r.detections is not None
                    instances = res.writer.add(it.key, r.detections, image_id=it.image_id, file_name=it.file_name)
                    n_done += 1
                    if not args.no_vis:
                        _visualize(it, instances, names, out_dir, args)
                bar.update(dist.world_size)  # the other ranks advance at about the same pace
                bar.set_postfix_str(f"{n_done / max(time.perf_counter() - t0, 1e-9):.3f} img/s")
        results = res.finalize(order=keys)
        dt = time.perf_counter() - t0
        errors: dict[str, str] = {}
        n_bad = 0
        if dist.is_main:
            merged = res.merged()
            errors = merged.errors
            extra = export_journal(merged, args.format, out_dir, order=keys)
            n_all = len(merged.entries)
            print(f"{n_all} images in {dt:.1f} s ({n_all / max(dt, 1e-9):.3f} images/s on {dist.world_size} "
                  f"process{'es' if dist.distributed else ''}, {args.device}, {options.dtype}); "
                  f"{len(results or [])} detections -> {out_dir / res.results_name}" + (f", {extra}" if extra else ""))
            if errors:
                log(f"{len(errors)} image(s) skipped (listed in the journal of {out_dir}):\n"
                    + "\n".join(f"  {k}: {e}" for k, e in errors.items()))
            n_bad = len(errors) + report_unprocessed(keys, merged.entries, errors)
    return 1 if broadcast_object(n_bad) else 0


def _progress(total: int, initial: int, quiet: bool):
    return tqdm(total=total, initial=initial, desc="detect", unit="img", disable=quiet, dynamic_ncols=True)


def _visualize(it: InferenceItem, instances: list[dict], names: dict[int, str], out_dir: Path,
               args: argparse.Namespace) -> None:
    """The original's visualisation rules (docs/DESIGN.md#visualisation): unique boxes, first N by score, no tiny
    boxes; written atomically next to the results."""
    preds = select_predictions(instances, conf_threshold=args.vis_conf_threshold, show_unique_boxes=True,
                               max_boxes=args.vis_max_boxes, small_region_px=args.vis_small_region_px)
    h, w = image_size(it.file_name)
    bw, bh = bounded_size((w, h), MAX_SIDE)  # a 100 MP input gives a bounded JPEG, decoded reduced
    decoded = decode_image(it.file_name, target_size=(bh, bw), max_pixels=args.max_pixels or None)
    img = Image.fromarray(decoded.image.permute(1, 2, 0).numpy())
    with atomic_path(out_dir / f"{Path(it.file_name).stem}_vis.jpg") as tmp:
        draw_results(img, preds, names, source_size=(w, h)).save(tmp, format="JPEG", quality=92)
