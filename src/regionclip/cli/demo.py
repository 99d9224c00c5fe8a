"""``regionclip demo``: the Gradio web demo, offline, with local weights (needs ``pip install 'regionclip[demo]'``).

The model loads once at start; vocabularies are embedded on first use with the checkpoint's own text encoder (81
prompt templates; cached in memory and on disk, so COCO-65 / LVIS-1203 are slow only the first time - or
precompute them with ``regionclip embed-concepts``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..api import RegionCLIP
from ..demo import build_demo, launch_demo
from ..inference.presets import PRESETS
from ..search import RegionIndex
from ..utils import require
from .common import load_options


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="web demo (Gradio) in the browser", description=__doc__)
    p.add_argument("--weights", help="RegionCLIP checkpoint: a path or a released name (default: the preset's)")
    p.add_argument("--rpn-weights", help="offline RPN checkpoint for 'RPN proposals' (default: the preset's, else "
                   "the RPN stored in --weights; without one, only user boxes can be classified)")
    p.add_argument("--preset", default="custom", choices=sorted(PRESETS),
                   help="scenario of the original: sets post-processing and RPN defaults (default custom)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for the whole network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", type=Path, help="disk cache of vocabulary embeddings (default "
                   "$REGIONCLIP_CACHE/text_embeddings)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this are refused")
    p.add_argument("--non-strict", action="store_true", help="load checkpoints with missing/unexpected keys")
    p.add_argument("--index", type=Path, help="a region index (regionclip index) for the Search tab")
    p.add_argument("--image-root", type=Path, help="folder the indexed image paths are relative to (Search tab)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    # fail before the (slow) model load when the extra is missing
    require("gradio", "demo", "the web demo")
    index = RegionIndex.open(args.index) if args.index else None  # a bad index fails before the model loads
    options = load_options(args)  # the load flags -> LoadOptions, as every command (post-processing: per request)
    print(f"loading {options.weights_name()}" + (f" + RPN {options.rpn_weights_name()}"
                                                 if options.rpn_weights_name() else "") + " ...", flush=True)
    model = RegionCLIP.load(options)
    print(model.loaded.report.summary(max_items=4))
    print(model.settings.describe())  # the per-request default post-processing (score / max boxes: the sliders)
    if model.detector.rpn is None:
        print("no RPN loaded: the demo classifies boxes drawn or typed by the user (--rpn-weights for proposals)")
    demo = build_demo(model, cache_dir=args.cache_dir, max_queue=args.max_queue, search_index=index,
                      image_root=args.image_root)
    print(f"open http://{'localhost' if args.host in ('0.0.0.0', '127.0.0.1') else args.host}:{args.port} "
          "(Ctrl+C to stop)", flush=True)
    try:
        launch_demo(demo, host=args.host, port=args.port, block=True)
    except KeyboardInterrupt:
        pass
    return 0
