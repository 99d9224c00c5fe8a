"""``regionclip pretrain``: region-text pretraining on image-caption data (docs/DESIGN.md#pretraining), from a recipe.

Single process:   regionclip pretrain --config configs/pretrain_rn50.yaml
Several GPUs:     torchrun --nproc-per-node 8 -m regionclip.cli.main pretrain --config configs/pretrain_rn50.yaml
Override fields:  --set solver.max_iter=1000 --set data.paths=[shards/]
Continue a run:   the same command with --resume

The checkpoints (<output_dir>/model_*.safetensors) use the released key layout and work with
`regionclip detect --weights ...`, `extract-regions` and as `model.weights` of `regionclip train`.
"""
from __future__ import annotations

import argparse

from regionclip.engine.pretrain import load_pretrain_config, run_pretraining

from .common import add_recipe_args, run_recipe

NAME = "pretrain"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand."""
    p = subparsers.add_parser(NAME, help="region-text pretraining on image-caption pairs (student/teacher CLIP)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, "recipe YAML (see configs/pretrain_*.yaml); omitted: the built-in defaults")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the exit code."""

    return run_recipe(args, load_pretrain_config, run_pretraining)
