"""``regionclip pretrain``: region-text pretraining on image-caption data (spec §9), from a recipe.

Single process:   regionclip pretrain --config configs/pretrain_rn50.yaml
Several GPUs:     torchrun --nproc-per-node 8 -m regionclip.cli.main pretrain --config configs/pretrain_rn50.yaml
Override fields:  --set solver.max_iter=1000 --set data.paths=[shards/]
Continue a run:   the same command with --resume

The checkpoints (<output_dir>/model_*.safetensors) use the released key layout and work with
`regionclip detect --weights ...`, `extract-regions` and as `model.weights` of `regionclip train`.
"""
from __future__ import annotations

import argparse
import json
import logging

NAME = "pretrain"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand."""
    p = subparsers.add_parser(NAME, help="region-text pretraining on image-caption pairs (student/teacher CLIP)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (see configs/pretrain_*.yaml); omitted: the built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set solver.base_lr=0.01 (repeatable; values are YAML)")
    p.add_argument("-o", "--output-dir", help="shortcut for --set train.output_dir=...")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the exit code."""
    from regionclip.config import to_dict
    from regionclip.engine.pretrain import load_pretrain_config, run_pretraining

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_pretrain_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    last = run_pretraining(cfg, resume=args.resume)
    if last:
        print(json.dumps({k: v for k, v in last.items() if not isinstance(v, dict)}))
    return 0
