"""``regionclip extract-regions``: region features (and classes) of many images into a resumable sharded store.

Examples::

    regionclip extract-regions photos/ --regions rpn --topk 100 -o feats/          # spec §6 mode A
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

from .common import add_model_args, postprocess_overrides


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
    p.add_argument("--topk", type=int, help="RPN proposals kept per image (the original's README uses 100)")
    p.add_argument("-o", "--output-dir", default="output/regions")
    p.add_argument("--format", choices=["shards", "original"], default="shards",
                   help="original: also write the original tool's per-image <name>.pth dicts to OUTPUT/original/")
    p.add_argument("--batch-size", type=int, default=1, help="images per backbone pass (equal sizes batch together)")
    p.add_argument("--num-workers", type=int, default=2, help="decoding worker processes (0: in the main process)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype (autocast; bfloat16 also on CPU). See docs/BENCHMARKS.md for the accuracy cost")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the stored feats/probs")
    p.add_argument("--chunk-size", type=int, help="regions per RoI-head call (memory bound; results unchanged)")
    p.add_argument("--pad-mixed-sizes", action="store_true",
                   help="batch images of different sizes with zero padding as the original's batched eval "
                   "(changes border features); default: only equal sizes share a batch")
    p.add_argument("--shard-mb", type=float, default=256.0, help="write a shard every this many MB")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output folder's results first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p, default_preset=None)
    return p


def run(args: argparse.Namespace) -> int:
    from ..api import RegionCLIP
    from ..data.loader import attach_boxes, items_from_coco, items_from_inputs, read_boxes_file
    from ..engine.extract import ExtractConfig, extract_regions
    from ..presets import get_preset
    from ..text.vocabulary import checkpoint_fingerprint

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
        items = attach_boxes(items, read_boxes_file(args.boxes), source=args.boxes)
    if args.regions == "boxes" and any(it.boxes is None for it in items):
        raise ValueError("--regions boxes needs --boxes FILE or --coco-json (its annotations are the boxes)")

    preset = get_preset(args.preset) if args.preset else None
    weights = args.weights or (preset.weights if preset else "regionclip_pretrained-cc_rn50")
    rpn = args.rpn_weights or (preset.rpn_weights if preset and not args.weights else None)
    if args.regions == "boxes":
        rpn = None  # user boxes need no proposals; do not load an RPN file
    model = RegionCLIP.from_pretrained(weights, rpn, preset=args.preset, device=args.device,
                                       strict=not args.non_strict, **postprocess_overrides(args))
    emb = names = None
    wants_vocab = args.regions == "detections" or args.vocab is not None or args.concept_emb is not None
    if wants_vocab:
        vocab = args.vocab if args.vocab is not None else (preset.vocabulary if preset else None)
        names = model.set_vocabulary(vocab, args.concept_emb, show_progress=not args.quiet)
        emb = model.detector.class_embeddings
    if args.regions != "boxes" and model.detector.rpn is None:
        raise ValueError(f"{weights} has no RPN weights: pass --rpn-weights (e.g. rpn_lvis_866), or use "
                         "--regions boxes with --boxes / --coco-json")

    out = Path(args.output_dir)
    if args.overwrite and out.exists():
        for sub in ("shards", "original"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "index.json").unlink(missing_ok=True)
    cfg = ExtractConfig(regions=args.regions, topk=args.topk, batch_size=args.batch_size,
                        num_workers=args.num_workers, dtype=args.dtype, save_dtype=args.save_dtype,
                        chunk_size=args.chunk_size, pad_mixed_sizes=args.pad_mixed_sizes, shard_mb=args.shard_mb,
                        write_original=args.format == "original")
    wpath = model.weights_path
    model_id = f"{wpath}#{checkpoint_fingerprint(wpath)[:16]}" if wpath is not None else str(weights)
    if model.detector.rpn is not None and args.regions != "boxes":
        model_id += f"+rpn:{rpn or 'in-checkpoint'}"
    summary = extract_regions(model.detector, items, out, cfg, class_embeddings=emb, class_names=names,
                              model_id=model_id, progress=not args.quiet)
    new = summary.num_images - summary.num_done_before - summary.num_errors
    print(f"{new} images extracted in {summary.seconds:.1f} s ({summary.images_per_s:.2f} images/s on "
          f"{args.device}, {args.dtype}); {summary.num_done_before} were already done, {summary.num_errors} "
          f"failed; {summary.num_regions} regions in {out / 'index.json'}")
    return 0 if summary.num_errors == 0 else 1
