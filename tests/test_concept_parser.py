"""Concept pools from captions: the rule-based extractor, the spaCy glue, frequency filtering and the CLI."""
from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from regionclip.cli.main import main
from regionclip.text.concepts import (build_concept_pool, count_concepts, nouns_from_spacy_doc, rule_based_nouns,
                                      singularize)

CAPTIONS = [
    "A man riding a red bike on the street.",
    "Two dogs playing in the grass near a wooden fence",
    "a red and white bus parked next to a building",
    "Several giraffes are standing under trees",
    "A woman holding an umbrella while walking with children",
    "A dog sitting on a bench next to a man",
]
HAS_SPACY = importlib.util.find_spec("spacy") is not None


def _has_model(name: str) -> bool:
    if not HAS_SPACY:
        return False
    import spacy

    return spacy.util.is_package(name)


@pytest.mark.parametrize("caption, nouns", [
    (CAPTIONS[0], ["man", "bike", "street"]),
    (CAPTIONS[1], ["dog", "grass", "fence"]),
    (CAPTIONS[2], ["bus", "building"]),
    (CAPTIONS[3], ["giraffe", "tree"]),
    (CAPTIONS[4], ["woman", "umbrella", "child"]),
])
def test_rule_based_nouns(caption, nouns):
    assert rule_based_nouns(caption) == nouns


@pytest.mark.parametrize("plural, singular", [("boxes", "box"), ("puppies", "puppy"), ("men", "man"),
                                              ("buses", "bus"), ("glass", "glass"), ("tomatoes", "tomato"),
                                              ("shoes", "shoe"), ("cats", "cat"), ("benches", "bench")])
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_frequency_filter_order_and_exclusions():
    counts, backend = count_concepts(CAPTIONS + ["a picture of a dog"], "rules")
    assert backend == "rules" and counts["dog"] == 3 and counts["man"] == 2
    assert build_concept_pool(counts, min_count=2) == ["dog", "man"]  # "picture" is in the default exclude list
    pool = build_concept_pool(counts, max_concepts=4)
    assert pool[:2] == ["dog", "man"] and len(pool) == 4 and pool[2:] == sorted(pool[2:])
    assert "picture" in build_concept_pool(counts, exclude=())
    with pytest.raises(ValueError):
        build_concept_pool(Counter(), min_count=0)


@pytest.mark.skipif(not HAS_SPACY, reason="spaCy is not installed (.ci/install-pretrain.sh installs it)")
def test_spacy_doc_glue_with_given_annotations():
    """Our noun / compound-phrase extraction on a Doc with given POS, lemmas and dependencies (no model needed)."""
    from spacy.tokens import Doc
    from spacy.vocab import Vocab

    words = ["two", "fire", "hydrants", "near", "tennis", "rackets"]
    doc = Doc(Vocab(), words=words, pos=["NUM", "NOUN", "NOUN", "ADP", "NOUN", "NOUN"],
              lemmas=["two", "fire", "hydrant", "near", "tennis", "racket"],
              deps=["nummod", "compound", "ROOT", "prep", "compound", "pobj"], heads=[2, 2, 2, 2, 5, 3])
    assert nouns_from_spacy_doc(doc) == ["fire", "hydrant", "tennis", "racket"]
    assert nouns_from_spacy_doc(doc, phrases=True) == ["fire", "hydrant", "fire hydrant", "tennis", "racket",
                                                       "tennis racket"]


@pytest.mark.skipif(not _has_model("en_core_web_sm"),
                    reason="spaCy model en_core_web_sm is not installed: it is not published on PyPI, so CI cannot "
                           "install it offline (`python -m spacy download en_core_web_sm` needs GitHub)")
def test_spacy_parser_finds_caption_nouns():
    counts, backend = count_concepts(CAPTIONS, "spacy")
    assert backend == "spacy"
    assert {"man", "bike", "street", "dog", "grass", "fence", "bus", "giraffe", "tree", "woman", "umbrella",
            "child"} <= set(counts)


def test_explicit_spacy_backend_without_model_fails_clearly():
    if _has_model("definitely_not_a_model"):
        pytest.skip("unexpected model")
    with pytest.raises((RuntimeError, ImportError), match="definitely_not_a_model|spacy"):
        count_concepts(["a dog"], "spacy", spacy_model="definitely_not_a_model")


def test_build_concepts_cli(tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "concepts.txt"
    assert main(["build-concepts", str(caps), "-o", str(out), "--parser", "rules", "--min-count", "2"]) == 0
    assert out.read_text().splitlines() == ["dog", "man"]
    assert (tmp_path / "concepts.txt.counts.tsv").read_text().splitlines() == ["dog\t2", "man\t2"]
    assert "2 concepts (rules parser" in capsys.readouterr().err
