"""``regionclip detect``: images or folders in, a COCO-style results JSON (+ annotated images) out."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_model_args, load_model, read_user_boxes


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("detect", help="zero-shot detection on images", description=__doc__)
    p.add_argument("images", nargs="*", help="image files or folders (default: the two bundled demo images)")
    p.add_argument("--boxes", help="classify these boxes instead of RPN proposals: COCO json or {file: [[x1,y1,x2,y2]]}")
    p.add_argument("-o", "--output-dir", default="output/detect")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype of the backbone and region head (autocast; RPN and classifier stay float32; "
                        "bfloat16 also on CPU, float16 GPU only). Accuracy cost: docs/BENCHMARKS.md")
    p.add_argument("--no-vis", action="store_true", help="do not write annotated images")
    p.add_argument("--vis-conf-threshold", type=float, default=0.05)
    p.add_argument("--vis-max-boxes", type=int, default=25)
    p.add_argument("--vis-small-region-px", type=float, default=8100.0, help="skip boxes smaller than this area")
    add_model_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..assets import BUILTIN_VOCABULARIES, dataset_category_ids, demo_image_paths
    from ..utils import write_json_atomic
    from ..data.images import list_images

    files: list[Path] = []
    for x in (args.images or [str(p) for p in demo_image_paths()]):
        files += list_images(x)
    boxes = read_user_boxes(args.boxes, files) if args.boxes else None
    model = load_model(args)
    model.detector.compute_dtype = args.dtype
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model.class_names
    # results use the dataset's category ids for built-in vocabularies (COCO ids for coco65, LVIS ids for
    # lvis1203), else class index + 1 (the LVIS convention of the original's lvis_instances_results.json)
    vocab = args.vocab if args.vocab is not None else (model.preset.vocabulary if model.preset else None)
    cat_ids = list(range(1, len(names) + 1))
    if isinstance(vocab, str) and vocab.lower().replace("-", "").replace("_", "") in BUILTIN_VOCABULARIES:
        cat_ids = dataset_category_ids(vocab)
    results, images_meta, done, errors = [], [], [], []
    t0 = time.perf_counter()
    bar = tqdm(total=len(files), desc="detect", unit="img")
    for i, det in _detect_all(model, files, boxes, args.batch_size, errors):
        image_id = i + 1  # position in the input list, also for skipped images (ids stay stable across runs)
        if det is not None:
            results += det.to_coco_json(image_id, cat_ids)
            h, w = det.image_size
            images_meta.append({"id": image_id, "file_name": str(files[i]), "height": h, "width": w})
            done.append((files[i], det))
        bar.update(1)
    bar.close()
    dt = time.perf_counter() - t0
    dataset = {"images": images_meta, "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, names)]}
    res_path = write_json_atomic(results, out_dir / "results.json")
    write_json_atomic(dataset, out_dir / "images.json")
    print(f"{len(done)} images in {dt:.1f} s ({len(done) / max(dt, 1e-9):.3f} images/s on {args.device}); "
          f"{len(results)} detections -> {res_path}")
    if not args.no_vis:
        # the original's visualisation settings (spec §7): unique boxes, first N by score, no tiny boxes
        from PIL import Image

        from ..data.images import load_image
        from ..visualize import draw_results, select_predictions

        id2name = dict(zip(cat_ids, names))
        for f, det in done:
            preds = select_predictions(det.to_coco_json(0, cat_ids), conf_threshold=args.vis_conf_threshold,
                                       show_unique_boxes=True, max_boxes=args.vis_max_boxes,
                                       small_region_px=args.vis_small_region_px)
            img = Image.fromarray(load_image(f).permute(1, 2, 0).numpy())
            out = out_dir / f"{f.stem}_vis.jpg"
            tmp = out.with_name(f".{out.name}.tmp")
            draw_results(img, preds, id2name).save(tmp, format="JPEG", quality=92)
            tmp.replace(out)
            print(f"wrote {out} ({len(preds)} boxes)")
    if errors:
        print(f"{len(errors)} image(s) skipped:\n" + "\n".join(f"  {e}" for e in errors), file=sys.stderr)
        return 1
    return 0


def _detect_all(model, files: list[Path], boxes, batch_size: int, errors: list[str]):
    """Yield (index, Detections | None) in input order. An unreadable image is reported and skipped (None) instead
    of ending the run: the other images' results are still written."""
    from ..data.images import ImageReadError

    for s in range(0, len(files), batch_size):
        chunk = [str(f) for f in files[s:s + batch_size]]
        bx = boxes[s:s + batch_size] if boxes is not None else None
        try:
            yield from enumerate(model.detect(chunk, bx), start=s)
            continue
        except ImageReadError:
            pass
        for j, f in enumerate(chunk):  # find the bad image(s) of this batch, keep the others
            try:
                yield s + j, model.detect([f], [bx[j]] if bx is not None else None)[0]
            except ImageReadError as e:
                errors.append(str(e))
                print(f"skipping: {e}", file=sys.stderr)
                yield s + j, None
