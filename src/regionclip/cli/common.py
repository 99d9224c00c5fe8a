"""Arguments shared by the subcommands that run the detector."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

from ..presets import PRESETS


def add_model_args(p: argparse.ArgumentParser, default_preset: Optional[str] = "custom") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", help="RegionCLIP checkpoint: a path or a released name (default: the preset's)")
    g.add_argument("--rpn-weights", help="offline RPN checkpoint (path or name); default: the preset's, else the RPN "
                   "stored in --weights")
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"scenario of the original (default {default_preset}); see README")
    g.add_argument("--vocab", help="class names: 'car,traffic cone', a text file (one per line), or coco65/lvis1203/...")
    g.add_argument("--concept-emb", help="concept-embedding file [K, D] (e.g. lvis_1203_cls_emb.pth); row i = name i")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--vit-act", choices=["quick_gelu", "gelu"],
                   help="transformer checkpoints: MLP activation of a CLIP ViT (OpenAI: quick_gelu, most open_clip "
                        "models: gelu); the file's shapes cannot tell")
    g.add_argument("--text-causal", choices=["yes", "no"],
                   help="zero-shot-branch checkpoints: causal text attention (default: the branch's per-backbone choice)")
    g.add_argument("--non-strict", action="store_true", help="load checkpoints with missing/unexpected keys (reported)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    q = p.add_argument_group("post-processing (override the preset)")
    q.add_argument("--score-thresh", type=float)
    q.add_argument("--nms-thresh", type=float)
    q.add_argument("--max-dets", type=int, dest="detections_per_image")
    q.add_argument("--rpn-score", choices=["none", "raw", "sigmoid"],
                   help="RPN objectness multiplication: raw = the original's sqrt(p*logit)")
    q.add_argument("--soft-nms", choices=["gaussian", "linear", "hard"])
    q.add_argument("--apply-box-deltas", action="store_true", default=None,
                   help="apply class-agnostic box regression (fine-tuned checkpoints)")


def postprocess_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ["score_thresh", "nms_thresh", "detections_per_image", "rpn_score", "soft_nms", "apply_box_deltas"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_model(args: argparse.Namespace, *, verbose: bool = True):
    from ..api import RegionCLIP
    from ..presets import get_preset

    preset = get_preset(args.preset) if args.preset else None
    weights = args.weights or (preset.weights if preset else "regionclip_pretrained-cc_rn50")
    rpn = args.rpn_weights or (preset.rpn_weights if preset and preset.regions == "rpn" and not args.weights else None)
    topts = {}
    if getattr(args, "vit_act", None):
        topts["act"] = args.vit_act
    if getattr(args, "text_causal", None):
        topts["autoregressive"] = args.text_causal == "yes"
    model = RegionCLIP.from_pretrained(weights, rpn, preset=args.preset, device=args.device,
                                       strict=not args.non_strict, transformer_options=topts or None,
                                       **postprocess_overrides(args))
    if verbose and model.loaded is not None:
        print(model.loaded.report.summary(max_items=4))
    vocab = args.vocab if args.vocab is not None else (preset.vocabulary if preset else None)
    concept_emb = args.concept_emb
    if concept_emb is None and args.vocab is None and preset is not None and preset.concept_emb and not args.weights:
        # the released embedding file of the preset's vocabulary, if the user has it locally (otherwise the
        # embeddings are computed with the checkpoint's own text encoder and cached)
        from ..pretrained import WeightsNotFound, resolve_weights

        try:
            concept_emb = str(resolve_weights(preset.concept_emb, download=False))
        except WeightsNotFound:
            concept_emb = None
    t0 = time.perf_counter()
    names = model.set_vocabulary(vocab, concept_emb, show_progress=verbose)
    if verbose:
        src = f"from {concept_emb}" if concept_emb else "from the checkpoint's text encoder (disk-cached)"
        print(f"vocabulary: {len(names)} classes, embeddings {src} in {time.perf_counter() - t0:.2f} s")
    return model


def read_user_boxes(path: str, files: list[Path]) -> list[Any]:
    """Boxes per image from a COCO json (images + annotations, XYWH) or {file_name: [[x1,y1,x2,y2], ...]}."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    by_name: dict[str, list[list[float]]] = {}
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        id2name = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
        for a in data["annotations"]:
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            by_name.setdefault(id2name[a["image_id"]], []).append([x, y, x + w, y + h])
    elif isinstance(data, dict):
        by_name = {Path(k).name: v for k, v in data.items()}
    else:
        raise ValueError(f"{path}: expected a COCO json or {{file_name: [[x1, y1, x2, y2], ...]}}")
    out = []
    for f in files:
        if f.name not in by_name:
            raise ValueError(f"{path} has no boxes for image {f.name}")
        out.append(by_name[f.name])
    return out


def add_recipe_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """Arguments of the recipe-driven commands (``train``, ``pretrain``)."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set solver.base_lr=0.01 (repeatable; values are YAML)")
    p.add_argument("-o", "--output-dir", help="shortcut for --set train.output_dir=...")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run_recipe(args: argparse.Namespace, load_config: Any, run: Any) -> int:
    """Resolve a recipe (YAML + ``--set`` overrides), print it or run it, print the last metrics line."""
    import logging

    from ..config import to_dict

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    last = run(cfg, resume=args.resume)
    if last:
        print(json.dumps({k: v for k, v in last.items() if not isinstance(v, dict)}))
    return 0
