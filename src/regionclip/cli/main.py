"""``regionclip <subcommand>``: one console script; each subcommand module has ``register`` and ``run``."""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..utils import quiet_forked_children

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # "no space left on device", "disk quota exceeded"

# subcommand modules, in help order (each defines register(subparsers) -> parser and run(args) -> int)
SUBCOMMANDS = [
    "regionclip.cli.detect",
    "regionclip.cli.train",
    "regionclip.cli.train_rpn",
    "regionclip.cli.embed_concepts",
    "regionclip.cli.evaluate",
    "regionclip.cli.visualize",
    "regionclip.cli.extract_regions",
    "regionclip.cli.pretrain",
    "regionclip.cli.prepare_tsv",
    "regionclip.cli.build_concepts",
    "regionclip.cli.demo",
    "regionclip.cli.index",
    "regionclip.cli.search",
    "regionclip.cli.convert",
    "regionclip.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionclip", description="RegionCLIP zero-shot / open-vocabulary detection")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod_name in SUBCOMMANDS:
        mod = importlib.import_module(mod_name)
        p = mod.register(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_forked_children()  # Ctrl-C: this function's one line, no traceback from a DataLoader worker
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        # every long command journals finished work atomically, so stopping here keeps what is done
        print(f"regionclip {args.command}: interrupted; finished work is kept - run the same command again to "
              "resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        # user-facing errors (bad input, missing weights, wrong checkpoint) as one clear message, no traceback
        if getattr(args, "debug", False):
            raise
        print(f"regionclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_FULL or getattr(args, "debug", False):
            raise
        # journals cut a half-written line back and atomic writes delete their temp file, so what is on disk is
        # complete: say where, and how to go on
        where = Path(e.filename).parent if e.filename else Path(getattr(args, "output_dir", None) or ".")
        print(f"regionclip {args.command}: error: no space left on the disk of {where} ({e.strerror}); free some "
              "space or pass -o/--output-dir on another disk, then run the same command again (finished work is kept)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
