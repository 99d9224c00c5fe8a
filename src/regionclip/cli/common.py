"""Arguments shared by the subcommands that run the detector."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..api import RegionCLIP
from ..checkpoint.io import content_sha256
from ..config import to_dict
from ..export import read_manifest
from ..inference.hardware import ACCELERATOR_CHUNK_SIZE, CPU_CHUNK_SIZE, REQUESTABLE_DTYPES, resolve_dtype
from ..inference.presets import PRESETS, LoadOptions
from ..pipeline import RunOptions
from ..text.vocabulary import Vocabulary, check_vocabulary_arg
from ..weights.pretrained import WeightsNotFound, resolve_weights
from .argtypes import fraction, nonneg_int, positive_int


def add_model_args(p: argparse.ArgumentParser, default_preset: Optional[str] = "custom") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", help="RegionCLIP checkpoint: a path or a released name (default: the preset's)")
    g.add_argument("--rpn-weights", help="offline RPN checkpoint (path or name); default: the preset's, else the RPN "
                   "stored in --weights")
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"scenario of the original (default {default_preset}; without one, the checkpoint kind picks "
                        "it); see README")
    g.add_argument("--vocab", help="class names: 'car,traffic cone', a text file (one per line), or coco65/lvis1203/...")
    g.add_argument("--concept-emb", "--class-embeddings", dest="concept_emb", help="class-embedding file [K, D] (e.g. lvis_1203_cls_emb.pth); row i = name i")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--vit-act", choices=["quick_gelu", "gelu"],
                   help="transformer checkpoints: MLP activation of a CLIP ViT (OpenAI: quick_gelu, most open_clip "
                        "models: gelu); the file's shapes cannot tell")
    g.add_argument("--text-causal", choices=["yes", "no"],
                   help="zero-shot-branch checkpoints: causal text attention (default: the branch's per-backbone choice)")
    g.add_argument("--non-strict", action="store_true", help="load checkpoints with missing/unexpected keys (reported)")
    g.add_argument("--strict-hash", action="store_true",
                   help="refuse a weight file whose sha256 differs from the expected one (WEIGHTS table / <file>.sha256 "
                        "sidecar) instead of warning")
    g.add_argument("--backend", choices=["torch", "onnxruntime", "openvino", "torch-export"], default="torch",
                   help="run the trunk, region head and RPN head from graphs written by `regionclip export` "
                        "(docs/EXPORT.md); CPU only")
    g.add_argument("--export-dir", help="the folder written by `regionclip export` (needed by --backend)")
    g.add_argument("--int8", action="store_true", help="with --backend onnxruntime: the int8 region head")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    q = p.add_argument_group("post-processing (per run: RunOptions.postprocess, starting from the preset's)")
    q.add_argument("--score-thresh", type=fraction, help="keep detections scoring at least this (0..1)")
    q.add_argument("--nms-thresh", type=fraction, help="IoU above which NMS removes a box (0..1)")
    q.add_argument("--max-dets", type=positive_int, dest="detections_per_image", help="detections kept per image")
    q.add_argument("--rpn-score", choices=["none", "raw", "sigmoid"],
                   help="RPN objectness multiplication: raw = the original's sqrt(p*logit)")
    q.add_argument("--soft-nms", choices=["gaussian", "linear", "hard"])
    q.add_argument("--apply-box-deltas", action="store_true", default=None,
                   help="apply class-agnostic box regression (fine-tuned checkpoints)")


def add_run_args(p: argparse.ArgumentParser, *, workers: Optional[int] = 2) -> None:
    """Per-run inference settings (:class:`regionclip.pipeline.RunOptions`), shared by every inference command.
    ``workers=None``: the command decodes in its own process and refuses ``--num-workers`` above 0."""
    r = p.add_argument_group("run")
    defaults = RunOptions()  # per-call defaults are defined once, on RunOptions
    r.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="images per backbone pass (equal sizes batch together)")
    r.add_argument("--dtype", choices=REQUESTABLE_DTYPES, default=defaults.dtype,
                   help="compute dtype of the region head (bfloat16: layer4 only, then the regions that decide the "
                        "detections again in float32); auto = the fastest dtype that keeps >= 99 %% of the float32 "
                        "detections: float32 for now (docs/DESIGN.md#trusted-bf16)")
    r.add_argument("--chunk-size", type=positive_int, default=defaults.chunk_size,
                   help="regions per region-head call (bounds memory; results unchanged; default: "
                        f"{CPU_CHUNK_SIZE} on CPU, {ACCELERATOR_CHUNK_SIZE} on GPUs)")
    r.add_argument("--max-proposals", type=positive_int, default=defaults.max_proposals, help="keep only the k best RPN proposals per image")
    r.add_argument("--num-workers", type=nonneg_int, default=workers,
                   help="decoding worker processes (0: in the main one)" if workers is not None else
                   "only 0: this command decodes in the main process (a larger value is refused)")
    r.add_argument("--max-pixels", type=nonneg_int, default=defaults.max_pixels,
                   help=f"skip images with more decoded pixels than this (default {defaults.max_pixels:,}; 0 = no limit)")
    r.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")


def postprocess_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The post-processing flags the user gave, by :class:`PostprocessConfig` field (what :func:`run_options`
    applies; each flag's dest is its field)."""
    keys = ["score_thresh", "nms_thresh", "detections_per_image", "rpn_score", "soft_nms", "apply_box_deltas"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_options(args: argparse.Namespace, *, regions: Optional[str] = None) -> LoadOptions:
    """The :class:`LoadOptions` of the command line: load-time flags only (validated before anything heavy
    happens); the per-run flags go to :func:`run_options`."""
    topts: dict[str, Any] = {}
    if getattr(args, "vit_act", None):
        topts["act"] = args.vit_act
    if getattr(args, "text_causal", None):
        topts["autoregressive"] = args.text_causal == "yes"
    return LoadOptions.create(args.weights, args.rpn_weights, preset=args.preset, device=args.device,
                              strict=not args.non_strict, strict_hash=getattr(args, "strict_hash", False),
                              regions=regions, transformer=topts, backend=getattr(args, "backend", "torch"),
                              export_dir=getattr(args, "export_dir", None),
                              backend_options={"int8": True} if getattr(args, "int8", False) else None)


def check_cheap_args(args: argparse.Namespace) -> None:
    """Argument errors that need no model: found in milliseconds instead of after an 18 s checkpoint load."""
    check_vocabulary_arg(getattr(args, "vocab", None))  # empty vocabulary, empty names, missing names file
    if getattr(args, "concept_emb", None) is not None and not Path(args.concept_emb).exists():
        try:
            resolve_weights(args.concept_emb, download=False)
        except WeightsNotFound:
            raise FileNotFoundError(f"--concept-emb {args.concept_emb}: no such file") from None
    for name in ("batch_size", "chunk_size", "max_proposals"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if (getattr(args, "num_workers", 0) or 0) < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if getattr(args, "int8", False) and getattr(args, "backend", "torch") == "torch":
        raise ValueError("--int8 runs the int8 region head of an export: use it with --backend onnxruntime "
                         "--export-dir DIR")
    if getattr(args, "backend", "torch") != "torch":
        if not args.export_dir:
            raise ValueError(f"--backend {args.backend} needs --export-dir (make one with `regionclip export`)")
        if not str(args.device).startswith("cpu"):
            raise ValueError(f"--backend {args.backend} runs on the CPU; use --device cpu or --backend torch")
        read_manifest(args.export_dir)  # a missing or foreign export folder fails before the model loads


def load_model(args: argparse.Namespace, *, regions: Optional[str] = None, verbose: bool = True) -> RegionCLIP:
    """Load the model once, print what was loaded and the settings the run uses (its post-processing flags
    applied, as :func:`run_options` will) in one line each."""
    check_cheap_args(args)
    model = RegionCLIP.load(load_options(args, regions=regions))
    if verbose and model.options.backend != "torch":
        log(f"backend: {model.detector!r}")
    if verbose:
        log(model.loaded.report.summary(max_items=4))
        log(model.settings.describe(model.run_options(**postprocess_overrides(args)).postprocess))
    return model


def vocabulary_from_args(model: RegionCLIP, args: argparse.Namespace, *, verbose: bool = True) -> Vocabulary:
    """The run's vocabulary: ``--vocab`` / ``--concept-emb``, else the settings' default (or the classes a fine-tuned
    checkpoint carries when neither is given)."""
    t0 = time.perf_counter()
    if args.vocab is None and args.concept_emb is None and model.vocabulary is not None:
        v = model.vocabulary
    else:
        v = model.make_vocabulary(args.vocab, args.concept_emb, show_progress=verbose and not getattr(args, "quiet",
                                                                                                       False))
    if verbose:
        log(f"vocabulary: {len(v)} classes from {v.source} in {time.perf_counter() - t0:.2f} s")
    return v


def input_digests(model: RegionCLIP, args: argparse.Namespace, vocab: Optional[Vocabulary] = None
                  ) -> dict[str, Optional[str]]:
    """sha256 of every input that changes results - the weights, the RPN weights, the class embeddings (file and
    the rows actually used) and the boxes file - for the resume fingerprint of a run's output folder. Contents, not
    paths: a file edited in place is a different run (refused on resume), the same file moved is the same run."""
    rpn = model.options.rpn_weights_name() if model.detector.rpn is not None else None
    emb = getattr(args, "concept_emb", None)
    boxes = getattr(args, "boxes", None)
    coco = getattr(args, "coco_json", None)
    return {
        "weights_sha256": content_sha256(model.weights_path) if model.weights_path is not None else None,
        "rpn_weights_sha256": content_sha256(resolve_weights(rpn, download=False)) if rpn else None,
        "concept_emb_sha256": content_sha256(resolve_weights(emb, download=False)) if emb else None,
        "class_embeddings_sha256": None if vocab is None else hashlib.sha256(
            vocab.class_embeddings.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest(),
        "boxes_sha256": content_sha256(boxes) if boxes else None,
        **({"coco_json_sha256": content_sha256(coco)} if coco else {}),
    }


def run_options(model: RegionCLIP, args: argparse.Namespace, **extra: Any) -> RunOptions:
    """The run's :class:`RunOptions`: the model's default post-processing, the post-processing flags
    (``--score-thresh`` ...) and the run flags (``--chunk-size`` ...; ``--dtype auto`` resolved here), each flag
    setting one field. The only place a command's per-run flags go; ``extra``: fields the command sets itself."""
    dtype = resolve_dtype(args.dtype, args.device)
    return model.run_options(batch_size=args.batch_size, dtype=dtype, chunk_size=args.chunk_size,
                             max_proposals=args.max_proposals, num_workers=args.num_workers or 0,
                             max_pixels=args.max_pixels or None, **postprocess_overrides(args), **extra)


def report_unprocessed(given: Sequence[str], finished: Iterable[str], failed: Iterable[str] = (), *,
                       what: str = "images") -> int:
    """Count (and say, in one line) the inputs that got neither a result nor a named error: a front end that
    processed fewer images than it was given must never end quietly with exit code 0."""
    seen = set(map(str, finished)) | set(map(str, failed))
    missing = [k for k in map(str, given) if k not in seen]
    if missing:
        log(f"{len(missing)} of {len(given)} {what} were not processed (no result and no error recorded), e.g. "
            f"{', '.join(missing[:3])}; run the same command again to retry them, and please report this bug")
    return len(missing)


def log(msg: str) -> None:
    """Command-line progress messages go to stderr, so stdout stays the command's result."""
    print(msg, file=sys.stderr, flush=True)


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
