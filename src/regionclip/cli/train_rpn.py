"""``regionclip train-rpn``: train the class-agnostic offline RPN (R50-FPN / R50-C4) on a COCO / LVIS json.

Original recipes:  regionclip train-rpn --config configs/rpn_coco48_c4.yaml      (rpn_coco_48 settings)
                   regionclip train-rpn --config configs/rpn_lvis866_fpn.yaml    (rpn_lvis_866 settings)
Your data:         regionclip train-rpn --config configs/rpn_lvis866_fpn.yaml --set data.train.name=null \\
                       --set data.train.json=my.json --set data.train.image_root=imgs --set model.weights=rpn_lvis_866
Several GPUs:      torchrun --nproc-per-node 8 -m regionclip.cli.main train-rpn --config ...
Continue a run:    the same command with --resume

Checkpoints (<output-dir>/model_*.safetensors) hold the detectron2 RPN keys: use one as --rpn-weights, and compare
it with a released RPN by `regionclip evaluate --metric proposals` (docs/RPN.md).
"""
from __future__ import annotations

import argparse

from regionclip.engine.rpn_train import load_rpn_config, run_rpn_training

from .common import add_recipe_args, run_recipe

NAME = "train-rpn"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="train the class-agnostic offline RPN (proposals for your domain)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, "RPN recipe YAML (configs/rpn_*.yaml); omitted: detectron2's R50-FPN defaults")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the exit code."""

    return run_recipe(args, load_rpn_config, run_rpn_training)
