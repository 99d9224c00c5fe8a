#!/usr/bin/env bash
# Optional dependency of the pretraining tests (called by scripts/test.sh after the package install):
# spaCy for `regionclip build-concepts --parser spacy` (tests/test_concept_parser.py exercises our glue on
# hand-annotated spaCy Docs). spaCy's trained English pipelines (en_core_web_sm) are not published on PyPI
# and cannot be installed from the package index, so the test that needs one skips with that reason; the
# rule-based parser needs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
$PIP install -q "spacy>=3.7,<4"
