"""``regionclip build-concepts``: a concept pool (nouns / noun phrases by frequency) parsed from captions.

Example::

    regionclip build-concepts captions.jsonl shards/ -o concepts.txt --min-count 5 --max-concepts 5000
    regionclip embed-concepts concepts.txt -o concept_emb.pth --weights RN50_sd.pth

Inputs: ``.txt`` (one caption per line), ``.jsonl`` / ``.tar`` shards / TSVs (every caption, tags joined).
Parser: ``--parser spacy`` (needs ``pip install spacy`` and ``python -m spacy download en_core_web_sm``),
``rules`` (built-in heuristic, no dependency) or ``auto`` (spaCy if its model loads, else rules).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from typing import Iterator

from regionclip.data.captions import iter_captions
from regionclip.text.concepts import DEFAULT_EXCLUDE, build_concept_pool, count_concepts, write_concepts
from regionclip.text.vocabulary import read_names_file

NAME = "build-concepts"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``build-concepts`` subcommand."""
    p = subparsers.add_parser(NAME, help="parse a noun concept pool from captions (for pretraining)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captions", nargs="+", help="caption files / shards / TSVs")
    p.add_argument("-o", "--output", required=True, help="concepts .txt (one per line, most frequent first)")
    p.add_argument("--parser", choices=("auto", "spacy", "rules"), default="auto", help="noun parser (default auto)")
    p.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline name or path")
    p.add_argument("--min-count", type=int, default=1, help="keep concepts seen at least this often (default 1)")
    p.add_argument("--max-concepts", type=int, default=None, help="keep at most this many (most frequent)")
    p.add_argument("--phrases", action="store_true", help="also compound noun phrases (spaCy only)")
    p.add_argument("--exclude", default=None,
                   help="file of concepts to drop (one per line); default: a short built-in list of generic "
                        "image words (picture, photo, view, ...); 'none' keeps everything")
    p.add_argument("--limit", type=int, default=None, help="read at most this many captions")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    """Execute the subcommand; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exclude = DEFAULT_EXCLUDE if args.exclude is None else (() if args.exclude == "none"
                                                             else read_names_file(args.exclude))
    captions: Iterator[str] = itertools.chain.from_iterable(iter_captions(p) for p in args.captions)
    if args.limit is not None:
        captions = itertools.islice(captions, args.limit)
    counts, backend = count_concepts(captions, args.parser, phrases=args.phrases, spacy_model=args.spacy_model)
    names = build_concept_pool(counts, min_count=args.min_count, max_concepts=args.max_concepts, exclude=exclude)
    out = write_concepts(names, args.output, counts)
    print(f"{NAME}: {len(names)} concepts ({backend} parser, {sum(counts.values())} noun occurrences, "
          f"{len(counts)} distinct) -> {out}", file=sys.stderr)
    return 0
