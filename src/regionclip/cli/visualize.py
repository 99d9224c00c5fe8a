"""``regionclip visualize``: draw a results JSON on its images (the original's ``visualize_json_results.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from regionclip.assets import BUILTIN_VOCABULARIES, lvis_categories, vocabulary
from regionclip.data.datasets import load_annotations, load_image_folder, load_registered
from regionclip.evaluation.visualize import render_results

from .argtypes import fraction, nonneg_float, nonneg_int, positive_int

NAME = "visualize"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="draw detections of a results JSON on the images",
        description="Draw coco_instances_results.json / lvis_instances_results.json on the dataset images. Images "
                    "come from an annotation json (--dataset, a registered name or a path, with --image-root) or "
                    "from an image folder (--images, image_id = position in sorted order, category_id = vocabulary "
                    "index + 1, as `regionclip evaluate` writes for folders).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="results JSON; several -> drawn side by side")
    p.add_argument("--output", required=True, help="output folder (one image per input image)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="registered dataset name (e.g. coco_2017_ovd_all_test) or annotation json")
    src.add_argument("--images", help="folder of images (the README's custom-image setting)")
    p.add_argument("--data-root", default="datasets", help="root of registered datasets ($DETECTRON2_DATASETS)")
    p.add_argument("--image-root", help="image folder for --dataset given as a json path")
    p.add_argument("--vocab", default="lvis1203",
                   help="class names for --images: built-in (lvis1203, coco65, ...), 'a,b,c' or a text file")
    p.add_argument("--conf-threshold", type=fraction, default=0.5, help="draw predictions with score > this")
    p.add_argument("--show-unique-boxes", action="store_true",
                   help="each box once (first = best class), from the first --max-boxes predictions")
    p.add_argument("--max-boxes", type=nonneg_int, default=30, help="with --show-unique-boxes only")
    p.add_argument("--small-region-px", type=nonneg_float, default=0.0,
                   help="with --show-unique-boxes: skip boxes with w*h below this (8100 = 90x90 in the scripts)")
    p.add_argument("--format", dest="image_format", choices=["png", "jpg", "webp"],
                   help="output format (default: the input image's)")
    p.add_argument("--grid", type=positive_int, metavar="COLUMNS", help="also write grid.<ext> with all images")
    p.set_defaults(func=run)
    return p


def _parse_vocab(vocab: str) -> list[str]:

    if vocab.lower().replace("-", "").replace("_", "") in BUILTIN_VOCABULARIES:
        if vocab.lower().startswith("lvis"):
            # labels as the original shows them: detectron2 thing_classes = synonyms[0] (docs/DESIGN.md#visualisation)

            cats = lvis_categories()
            return [c["synonyms"][0] for c in cats if vocab.endswith("1203") or c["frequency"] != "r"]
        return vocabulary(vocab)
    if Path(vocab).is_file():
        return [ln.strip() for ln in Path(vocab).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [n.strip() for n in vocab.split(",") if n.strip()]


def run(args: argparse.Namespace) -> int:

    if args.images:
        ds = load_image_folder(args.images, _parse_vocab(args.vocab))
    elif Path(args.dataset).suffix == ".json":
        if not args.image_root:
            raise SystemExit("--dataset given as a json path needs --image-root (the folder holding its images)")
        ds = load_annotations(args.dataset, args.image_root)
    else:
        ds = load_registered(args.dataset, args.data_root)
    names = dict(zip(ds.category_ids, ds.display_names))
    written = render_results(args.input if len(args.input) > 1 else args.input[0],
                             [(r.image_id, r.file_name) for r in ds], names, args.output,
                             conf_threshold=args.conf_threshold, show_unique_boxes=args.show_unique_boxes,
                             max_boxes=args.max_boxes, small_region_px=args.small_region_px,
                             image_format=args.image_format, grid_columns=args.grid)
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0
