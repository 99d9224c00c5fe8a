"""``regionclip train``: open-vocabulary transfer learning from a recipe (configs/*.yaml).

Single process:   regionclip train --config configs/coco_ovd_rn50.yaml
Several GPUs:     torchrun --nproc-per-node 8 -m regionclip.cli.main train --config configs/coco_ovd_rn50.yaml
Override fields:  --set solver.max_iter=1000 --set data.train.json=my.json
Continue a run:   the same command with --resume (exactly the losses of an uninterrupted run)
"""
from __future__ import annotations

import argparse
import json
import logging

NAME = "train"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="fine-tune an open-vocabulary detector (COCO OVD / LVIS / your data)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (see configs/); omitted: the built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set solver.base_lr=0.01 (repeatable; values are YAML)")
    p.add_argument("-o", "--output-dir", help="shortcut for --set train.output_dir=...")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    from regionclip.config import to_dict
    from regionclip.engine.transfer import load_config, run_transfer

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    last = run_transfer(cfg, resume=args.resume)
    if last:
        print(json.dumps({k: v for k, v in last.items() if not isinstance(v, dict)}))
    return 0
