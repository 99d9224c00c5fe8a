"""CLIP BPE tokenizer: identical ids to open_clip's copy of OpenAI's tokenizer, RegionCLIP's truncation."""
from __future__ import annotations

import gzip

import pytest
import torch

from regionclip.assets import bpe_path
from regionclip.text.tokenizer import CONTEXT_LENGTH, EOT_ID, SOT_ID, ClipTokenizer, clean_text, default_tokenizer

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

AWKWARD = [
    "a photo of a cat.",
    "",
    "   \t\n  ",
    "Hello, World!!! ...",
    "naïve café — résumé, Ümlaut ß",
    "東京タワーの写真",
    "Привет мир",
    "emoji 🚗🚦 👩‍👩‍👧 🇫🇷",
    "&amp;lt;b&amp;gt; html &quot;entities&quot; &#39;quoted&#39; &nbsp;",
    "mojibake: cafÃ© â€œquoteâ€\x9d",
    "don't we'll they're I'M",
    "123,456.78 $%^&*()_+ {} [] <> ~`",
    "hot+dog, bat_(animal)",
    "tabs\tand\nnew   lines",
    "zero\u200bwidth and\u00a0nbsp",
    "CamelCaseWordsAndUPPERCASE",
    "supercalifragilisticexpialidocious" * 3,
    "word " * 100,  # > 77 tokens
]


@pytest.fixture(scope="module")
def theirs() -> "open_clip_tokenizer.SimpleTokenizer":
    return open_clip_tokenizer.SimpleTokenizer()


def test_packaged_bpe_is_clips(theirs) -> None:
    with gzip.open(bpe_path(), "rb") as a, gzip.open(open_clip_tokenizer.default_bpe(), "rb") as b:
        assert a.read() == b.read()
    ours = default_tokenizer()
    assert ours.encoder["<|startoftext|>"] == SOT_ID == theirs.sot_token_id
    assert ours.encoder["<|endoftext|>"] == EOT_ID == theirs.eot_token_id
    assert ours.vocab_size == theirs.vocab_size == 49408


@pytest.mark.parametrize("text", AWKWARD)
def test_ids_match_open_clip(theirs, text: str) -> None:
    ours = default_tokenizer()
    assert ours.encode(text) == theirs.encode(text)
    ids_ours, ids_theirs = ours(text)[0], theirs(text)[0]
    n = ours.num_tokens(text)
    if n <= CONTEXT_LENGTH:
        assert torch.equal(ids_ours, ids_theirs)
    else:
        # Same first 76; at the last position the original keeps the 77th BPE token (EOT cut off) whereas
        # open_clip overwrites it with EOT.
        full = [SOT_ID] + ours.encode(text) + [EOT_ID]
        assert torch.equal(ids_ours[:-1], ids_theirs[:-1])
        assert int(ids_ours[-1]) == full[CONTEXT_LENGTH - 1] != EOT_ID
        assert int(ids_theirs[-1]) == EOT_ID
        assert EOT_ID not in ids_ours.tolist()


def test_layout_sot_eot_padding() -> None:
    tok = default_tokenizer()
    out = tok(["", "a photo of a dog."])
    assert out.shape == (2, CONTEXT_LENGTH) and out.dtype == torch.long
    assert out[0, :2].tolist() == [SOT_ID, EOT_ID] and not out[0, 2:].any()
    n = tok.num_tokens("a photo of a dog.")
    assert out[1, 0] == SOT_ID and out[1, n - 1] == EOT_ID and not out[1, n:].any()
    assert tok(["a"], context_length=5).shape == (1, 5)


def test_truncation_reports_full_length() -> None:
    tok = default_tokenizer()
    ids, lengths = tok.tokenize_with_lengths(["word " * 100, "short"])
    assert lengths[0] == 102 and lengths[1] == 3
    assert ids[0].tolist() == ([SOT_ID] + tok.encode("word " * 100))[:CONTEXT_LENGTH]


def test_cleaning_and_decode_roundtrip() -> None:
    tok = default_tokenizer()
    assert clean_text("  A&amp;amp;B \n\t C  ") == "a&b c"  # double html unescape, whitespace, lower case
    assert tok.encode("Hot  Dog") == tok.encode("hot dog")
    assert tok.decode(tok.encode("a photo of a traffic cone.")).strip() == "a photo of a traffic cone ."


def test_special_token_strings_map_to_special_ids() -> None:
    # Faithful to OpenAI/RegionCLIP: the literal marker in a text is the special token (open_clip renamed it).
    assert default_tokenizer().encode("a <|endoftext|> b")[1] == EOT_ID


def test_wrong_bpe_file_is_rejected(tmp_path) -> None:
    bad = tmp_path / "bpe.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not CLIP's"):
        ClipTokenizer(bad)
    with pytest.raises(FileNotFoundError, match="package data"):
        ClipTokenizer(tmp_path / "missing.gz")
