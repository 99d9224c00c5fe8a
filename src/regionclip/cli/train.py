"""``regionclip train``: open-vocabulary transfer learning from a recipe (configs/*.yaml).

Single process:   regionclip train --config configs/coco_ovd_rn50.yaml
Several GPUs:     torchrun --nproc-per-node 8 -m regionclip.cli.main train --config configs/coco_ovd_rn50.yaml
Override fields:  --set solver.max_iter=1000 --set data.train.json=my.json
Continue a run:   the same command with --resume (exactly the losses of an uninterrupted run)
"""
from __future__ import annotations

import argparse

from regionclip.engine.transfer import load_config, run_transfer

from .common import add_recipe_args, run_recipe

NAME = "train"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="fine-tune an open-vocabulary detector (COCO OVD / LVIS / your data)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, "recipe YAML (see configs/); omitted: the built-in defaults")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the exit code."""

    return run_recipe(args, load_config, run_transfer)
