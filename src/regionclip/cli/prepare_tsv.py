"""``regionclip prepare-tsv``: write the ``.lineidx`` sidecar (byte offset of every row) of the original's TSVs.

Pretraining on the original's TSV pairs (docs/PRETRAINING.md) reads rows at random through these sidecars; the
original needs them as well. Example::

    regionclip prepare-tsv data/cc3m.images.tsv data/cc3m.text.tsv

Writes ``<name>.lineidx`` beside each file (atomically: a stopped run leaves the old sidecar or none) and prints
its path.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data.captions import write_lineidx

NAME = "prepare-tsv"
_SIDECARS = (".lineidx", ".linelist")


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``prepare-tsv`` subcommand."""
    p = subparsers.add_parser(NAME, help="write the .lineidx sidecars of image / text TSV files (pretraining)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tsv", nargs="+", help="image or text TSV files (rows: key<TAB>value)")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the exit code."""
    paths = [Path(t) for t in args.tsv]
    for p in paths:  # every argument checked before any sidecar is written
        if p.suffix in _SIDECARS:
            raise ValueError(f"{p} is a sidecar, not a TSV: give the .tsv file it belongs to")
        if not p.is_file():
            raise FileNotFoundError(f"no such TSV file: {p}")
    for p in paths:
        print(write_lineidx(p))
    return 0
