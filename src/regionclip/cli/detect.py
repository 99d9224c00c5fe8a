"""``regionclip detect``: images or folders in, a COCO-style results JSON (+ other formats, annotated images) out.

Results stream to ``<output-dir>/predictions.jsonl`` as images finish; re-running the same command resumes
(finished images are skipped, failed ones retried). An image that cannot be used (unreadable, too large, bad
boxes) is reported with its name and skipped; the others are written, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from ..assets import demo_image_paths
from ..data.images import decode_image, image_size
from ..data.loader import InferenceItem, items_from_inputs
from ..formats import FORMATS, ResultsWriter, export_journal, match_boxes, read_boxes_file
from ..utils import atomic_path
from ..visualize import MAX_SIDE, bounded_size, draw_results, select_predictions
from .common import add_model_args, add_run_args, check_cheap_args, load_model, log, run_options, vocabulary_from_args


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("detect", help="zero-shot detection on images", description=__doc__)
    p.add_argument("images", nargs="*", help="image files, folders or .txt lists (default: the two bundled demo "
                   "images)")
    p.add_argument("--boxes", help="classify these boxes instead of RPN proposals: COCO json, {file: [[x1,y1,x2,y2]]} "
                   "or CSV file_name,x1,y1,x2,y2")
    p.add_argument("-o", "--output-dir", default="output/detect")
    p.add_argument("--format", choices=FORMATS, default="coco",
                   help="results format besides the COCO results.json: jsonl, csv or yolo (labels/ + classes.txt)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an earlier run")
    p.add_argument("--no-vis", action="store_true", help="do not write annotated images")
    p.add_argument("--vis-conf-threshold", type=float, default=0.05)
    p.add_argument("--vis-max-boxes", type=int, default=25)
    p.add_argument("--vis-small-region-px", type=float, default=8100.0, help="skip boxes smaller than this area")
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
    model = load_model(args, regions="gt" if args.boxes else None)
    vocab = vocabulary_from_args(model, args)
    options = run_options(model, args)
    out_dir = Path(args.output_dir)
    settings = {"weights": str(model.weights_path), "settings": model.settings.describe(),
                "postprocess": options.postprocess.__dict__, "boxes": args.boxes, "dtype": options.dtype,
                "max_proposals": options.max_proposals, "vocabulary_source": vocab.source}
    writer = ResultsWriter(out_dir, vocab.names, vocab.category_ids, settings=settings, resume=not args.overwrite)
    todo = [it for it in items if it.key not in writer.done]
    if len(todo) < len(items):
        log(f"resuming: {len(items) - len(todo)} of {len(items)} images already done in {writer.path}")
    names = dict(zip(vocab.category_ids, vocab.names))
    t0, n_done, n_dets = time.perf_counter(), 0, 0
    with writer, _progress(len(items), len(items) - len(todo), args.quiet) as bar:
        for res in model.run(todo, options, vocabulary=vocab, boxes_source=args.boxes or "") if todo else []:
            it = res.item
            if res.error is not None:
                writer.add_error(it.key, res.error, file_name=it.file_name)
                log(f"skipping {it.file_name}: {res.error}")
            else:
                assert res.detections is not None
                instances = writer.add(it.key, res.detections, image_id=it.image_id, file_name=it.file_name)
                n_done, n_dets = n_done + 1, n_dets + len(instances)
                if not args.no_vis:
                    _visualize(it, instances, names, out_dir, args)
            bar.update(1)
            bar.set_postfix_str(f"{n_done / max(time.perf_counter() - t0, 1e-9):.3f} img/s")
        results = writer.finalize(order=[it.key for it in items])
    dt = time.perf_counter() - t0
    extra = export_journal(writer.journal, args.format, out_dir, order=[it.key for it in items])
    errors = writer.errors
    print(f"{n_done} images in {dt:.1f} s ({n_done / max(dt, 1e-9):.3f} images/s on {args.device}, {options.dtype}); "
          f"{len(results)} detections -> {out_dir / writer.results_name}" + (f", {extra}" if extra else ""))
    if errors:
        log(f"{len(errors)} image(s) skipped (listed in {writer.path}):\n"
            + "\n".join(f"  {k}: {e}" for k, e in errors.items()))
        return 1
    return 0


def _progress(total: int, initial: int, quiet: bool):
    from tqdm import tqdm

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
