"""Concept pools parsed from captions: nouns (optionally compound noun phrases) kept by frequency (docs/DESIGN.md#pretraining,
open question 15.5 — the original's parsing procedure was never released; its configs use a 4764-noun pool
parsed from COCO captions).

Two parsers:

* ``"spacy"``: a spaCy English pipeline with a tagger (default ``en_core_web_sm``). Nouns = tokens with
  ``pos_ == "NOUN"``, lemmatised and lower-cased; with ``phrases=True`` also ``compound + noun`` phrases
  ("fire hydrant", "tennis racket"). spaCy is an optional dependency imported at point of use; its trained
  models are not published on PyPI (``python -m spacy download en_core_web_sm`` fetches the wheel from
  spaCy's GitHub releases), so the package index alone cannot install one.
* ``"rules"``: a dependency-free heuristic for caption language, always available. A caption is split at
  closed-class words (determiners, pronouns, prepositions, conjunctions, auxiliaries, numerals), common caption
  verbs and ``-ing`` forms; the last word of each remaining run is a noun head ("a **man** riding a red **bike**
  on the **street**"); heads that are common adjectives/adverbs are dropped and plurals are singularised with
  suffix rules and an irregular table. It misses compounds and errs on rare verbs; use spaCy for real pools.

``backend="auto"`` uses spaCy when the pipeline loads, else the rules (and says so in the log).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..utils import atomic_path, require

__all__ = ["extract_concepts", "count_concepts", "build_concept_pool", "singularize", "rule_based_nouns",
           "nouns_from_spacy_doc", "load_spacy", "write_concepts", "BACKENDS", "DEFAULT_EXCLUDE"]
logger = logging.getLogger(__name__)

BACKENDS = ("auto", "spacy", "rules")
DEFAULT_SPACY_MODEL = "en_core_web_sm"
# generic nouns that name no object in a region (image-level or spatial words); removable with exclude=()
DEFAULT_EXCLUDE = frozenset("""
picture photo photograph image view shot scene closeup close front side top bottom middle background foreground
lot lots couple group bunch pair kind type thing something area way day time
""".split())

_CLOSED = frozenset("""
a an the this that these those some any each every another other others such no all both either neither
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs there here
what which who whom whose where when why how whatever whoever
of on in at by for with without from to into onto upon over under below above beneath beside besides between
among amongst through across along around behind near next against toward towards about after before during
inside outside within up down out off away back together past via per than like as while
and or but nor so yet if then because though although whether
is are was were be been being am isn't aren't wasn't weren't do does did doing done have has had having
can could will would shall should may might must
not very too also just only still even really quite rather almost well again
one two three four five six seven eight nine ten eleven twelve several many few much more most less least
first second third lots
""".split())
_VERBS = frozenset("""
sit sits sat stand stands stood hold holds held ride rides rode look looks looked walk walks walked play plays
played lay lays laid lie lies eat eats ate wear wears wore fly flies flew carry carries carried watch watches
watched take takes took show shows showed shown cross crosses crossed hang hangs hung pose poses posed run runs ran
make makes made get gets got go goes went come comes came see sees saw seen use uses used pull pulls pulled
push pushes pushed throw throws threw catch catches caught swing swings swung drive drives drove driven
park parked fill filled cover covered surround surrounded line lined stack stacked top topped prepare prepared
wait waits waited lean leans leaned rest rests rested point points pointed grow grows grew contain contains
appear appears seem seems try tries tried rid
""".split())
_ADJECTIVES = frozenset("""
red white black blue green yellow brown orange pink purple gray grey silver golden gold dark light bright
large big small little tiny huge giant long short tall high low wide narrow thick thin young old new modern
empty full open closed clean dirty wet dry hot cold warm fresh different various same other many few several
good nice beautiful pretty cute happy busy sunny cloudy snowy grassy wooden metal plastic colorful single
double round square front back left right top bottom together alone outside inside nearby ready
""".split())
_ING_NOUNS = frozenset("""
building buildings ceiling ceilings clothing painting paintings ring rings king kings wing wings string strings
spring thing things evening morning pudding icing frosting topping toppings railing railings awning awnings
stocking stockings sibling siblings swing swings wedding sign signing dressing bedding sling crossing
""".split())
_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "mice": "mouse", "teeth": "tooth", "feet": "foot",
    "geese": "goose", "knives": "knife", "leaves": "leaf", "shelves": "shelf", "wolves": "wolf",
    "loaves": "loaf", "calves": "calf", "halves": "half", "wives": "wife", "lives": "life", "scarves": "scarf",
    "oxen": "ox", "dice": "die", "people": "person", "shoes": "shoe", "toes": "toe", "canoes": "canoe",
    "horses": "horse", "houses": "house", "buses": "bus", "glasses": "glasses", "skis": "ski",
    "cookies": "cookie", "movies": "movie", "ties": "tie", "pies": "pie", "lies": "lie",
}
_INVARIANT = frozenset("""
bus grass glass glasses dress gas class boss cross kiss mattress compass canvas lens news species series sheep
fish deer scissors pants jeans shorts trousers tennis physics bus status circus cactus octopus walrus hippopotamus
citrus asparagus hummus couscous bonus virus campus atlas iris chassis police cattle
""".split())
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def singularize(word: str) -> str:
    """English plural -> singular by an irregular table and suffix rules (``boxes`` -> ``box``, ``puppies`` ->
    ``puppy``, ``men`` -> ``man``); words that are not plurals come back unchanged."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _INVARIANT or len(w) <= 3 or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2]
    if w.endswith("oes") and len(w) > 4:
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


def rule_based_nouns(caption: str) -> list[str]:
    """Noun heads of one caption by the boundary heuristic of the module docstring (singular, lower case)."""
    out: list[str] = []
    run: list[str] = []

    def close() -> None:
        if run:
            head = run[-1]
            if head not in _ADJECTIVES and not head.endswith(("ly", "'s")):
                out.append(singularize(head))
            run.clear()

    for word in _WORD.findall(caption.lower()):
        boundary = (word in _CLOSED or word in _VERBS or (word.endswith("ing") and word not in _ING_NOUNS)
                    or (word.endswith("ed") and len(word) > 4))
        if boundary:
            close()
        else:
            run.append(word)
    close()
    return [w for w in out if len(w) > 1]


def nouns_from_spacy_doc(doc: Any, phrases: bool = False) -> list[str]:
    """Nouns (lemma, lower case) of a parsed spaCy ``Doc``; with ``phrases`` also ``compound* + noun``."""
    out = []
    for tok in doc:
        if tok.pos_ != "NOUN":
            continue
        lemma = (tok.lemma_ or tok.text).lower().strip()
        if not lemma.isalpha():
            continue
        out.append(lemma)
        if phrases:
            compounds = [c for c in tok.children if c.dep_ == "compound" and c.i < tok.i]
            if compounds:
                words = [(c.lemma_ or c.text).lower() if c.pos_ == "NOUN" else c.text.lower() for c in compounds]
                out.append(" ".join(words + [lemma]))
    return out


def load_spacy(model: str = DEFAULT_SPACY_MODEL) -> Any:
    """Load a spaCy pipeline (NER disabled: it is not needed for nouns) with actionable errors."""

    spacy = require("spacy", "concepts", "parsing nouns from captions")
    try:
        return spacy.load(model, disable=["ner"])
    except OSError as e:
        raise RuntimeError(f"spaCy model {model!r} is not installed: `python -m spacy download {model}` (it is "
                           "not on PyPI), or use --parser rules") from e


def count_concepts(captions: Iterable[str], backend: str = "auto", *, phrases: bool = False,
                   spacy_model: str = DEFAULT_SPACY_MODEL, batch_size: int = 256) -> tuple[Counter, str]:
    """Count noun (phrase) occurrences in ``captions``; returns (counts, the backend actually used)."""
    if backend not in BACKENDS:
        raise ValueError(f"parser must be one of {BACKENDS}, got {backend!r}")
    nlp = None
    if backend in ("auto", "spacy"):
        try:
            nlp = load_spacy(spacy_model)
        except (ImportError, RuntimeError) as e:
            if backend == "spacy":
                raise
            logger.warning("spaCy unavailable (%s): using the rule-based noun extractor", e)
    counts: Counter = Counter()
    if nlp is not None:
        for doc in nlp.pipe((c.lower() for c in captions), batch_size=batch_size):
            counts.update(nouns_from_spacy_doc(doc, phrases))
        return counts, "spacy"
    if phrases:
        logger.warning("noun phrases need the spaCy parser; the rule-based extractor gives single nouns")
    for c in captions:
        counts.update(rule_based_nouns(c))
    return counts, "rules"


def build_concept_pool(counts: Counter, *, min_count: int = 1, max_concepts: Optional[int] = None,
                       exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Concepts seen at least ``min_count`` times, most frequent first (ties alphabetical), minus ``exclude``,
    at most ``max_concepts``."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    drop = {e.lower() for e in exclude}
    kept = sorted(((n, c) for n, c in counts.items() if c >= min_count and n not in drop),
                  key=lambda nc: (-nc[1], nc[0]))
    names = [n for n, _ in kept]
    return names[:max_concepts] if max_concepts is not None else names


def extract_concepts(captions: Iterable[str], backend: str = "auto", *, min_count: int = 1,
                     max_concepts: Optional[int] = None, phrases: bool = False,
                     exclude: Iterable[str] = DEFAULT_EXCLUDE,
                     spacy_model: str = DEFAULT_SPACY_MODEL) -> list[str]:
    """``count_concepts`` + ``build_concept_pool`` in one call."""
    counts, _ = count_concepts(captions, backend, phrases=phrases, spacy_model=spacy_model)
    return build_concept_pool(counts, min_count=min_count, max_concepts=max_concepts, exclude=exclude)


def write_concepts(names: Sequence[str], path: Union[str, Path], counts: Optional[Counter] = None) -> Path:
    """One concept per line (the format ``embed-concepts`` reads); with ``counts`` a ``name\\tcount`` TSV is also
    written next to it (``<path>.counts.tsv``). Atomic writes."""

    if not names:
        raise ValueError("the concept pool is empty: lower --min-count or give more captions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = [(path, "".join(f"{n}\n" for n in names))]
    if counts is not None:
        outputs.append((path.with_name(path.name + ".counts.tsv"), "".join(f"{n}\t{counts[n]}\n" for n in names)))
    for target, text in outputs:
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path
