"""CLIP byte-pair-encoding tokenizer, behaving exactly like the original RegionCLIP / OpenAI CLIP one (docs/DESIGN.md#text-encoder).

Text is cleaned with ``ftfy.fix_text`` + two rounds of HTML unescaping + whitespace collapsing, lower-cased,
split with CLIP's regular expression, byte-encoded and merged with the 48,894 BPE merges shipped as package
data (:func:`regionclip.assets.bpe_path`). A tokenized sequence is ``[SOT] + ids + [EOT]``, cut to the
context length (77) **without** re-appending the EOT, then zero-padded - exactly what RegionCLIP's
``convert_example_to_features_bpe`` does. (open_clip instead overwrites the last kept token with EOT; the two
agree on every sequence that fits.)

Like the original, the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a text are mapped to
the special ids rather than spelled out.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import ftfy
import regex
import torch
from torch import Tensor

from regionclip.assets import bpe_path as _default_bpe_path

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # merges actually used by CLIP; the file holds more lines than that

# CLIP's pre-tokenizer: special tokens, English contractions, runs of letters, single digits, runs of
# other non-space symbols. `regex` (not `re`) is needed for the \p{..} Unicode classes.
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the remaining 68 (control chars, space, ...) go to code points
    256.. so that BPE never has to deal with whitespace or control characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clean_text(text: str) -> str:
    """The original's ``whitespace_clean(basic_clean(text)).lower()``: ftfy, double HTML unescape,
    collapse whitespace runs to one space, strip, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipTokenizer:
    """CLIP BPE tokenizer (vocabulary 49408: 256 bytes, 256 bytes+``</w>``, 48894 merges, SOT, EOT).

    Args:
        bpe_path: gzip'd merges file; defaults to the copy shipped with the package.
        context_length: sequence length produced by :meth:`__call__` (77 for every CLIP model).
    """

    def __init__(self, bpe_path: Optional[Union[str, Path]] = None, context_length: int = CONTEXT_LENGTH):
        path = Path(bpe_path) if bpe_path is not None else _default_bpe_path()
        if not path.exists():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {path} (reinstall regionclip; the file is "
                                    "package data under regionclip/assets/clip_bpe/)")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; only the first _NUM_MERGES merges are part of CLIP's vocabulary.
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
        b2u = _byte_to_unicode()
        vocab = list(b2u.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = b2u
        self.byte_decoder = {u: b for b, u in b2u.items()}
        self.context_length = int(context_length)
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        if (len(self.encoder), self.sot_id, self.eot_id) != (VOCAB_SIZE, SOT_ID, EOT_ID):
            raise ValueError(f"{path} is not CLIP's bpe_simple_vocab_16e6 merges file (vocabulary size "
                             f"{len(self.encoder)}, expected {VOCAB_SIZE})")
        self._cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> str:
        """Merge one pre-token (already byte-encoded) into space-separated BPE symbols."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)  # end-of-word marker on the last character
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after cleaning, without SOT/EOT and without any length limit."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self._bpe(piece).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` up to cleaning (special ids are spelled out, ``</w>`` becomes a space)."""
        symbols = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace").replace("</w>", " ")

    def num_tokens(self, text: str) -> int:
        """Length of ``[SOT] + encode(text) + [EOT]``; more than the context length means truncation."""
        return len(self.encode(text)) + 2

    def tokenize_with_lengths(self, texts: Sequence[str],
                              context_length: Optional[int] = None) -> tuple[Tensor, list[int]]:
        """Like :meth:`__call__`, also returning each text's untruncated length (SOT and EOT included);
        a length above ``context_length`` means the row was truncated."""
        length = int(context_length or self.context_length)
        out = torch.zeros(len(texts), length, dtype=torch.long)
        full_lengths = []
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            full_lengths.append(len(ids))
            ids = ids[:length]  # the original cuts without re-appending the EOT
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, full_lengths

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> Tensor:
        """Tokenize like RegionCLIP: ``[SOT] + ids + [EOT]``, cut to ``context_length`` (the EOT may be cut
        off), padded with 0.

        Args:
            texts: one string or a sequence of N strings.
            context_length: defaults to the tokenizer's (77).

        Returns:
            LongTensor[N, context_length].
        """
        return self.tokenize_with_lengths([texts] if isinstance(texts, str) else texts, context_length)[0]


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """A process-wide tokenizer over the packaged merges (building one takes ~0.3 s)."""
    return ClipTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH) -> Tensor:
    """``default_tokenizer()(texts, context_length)`` -> LongTensor[N, context_length]."""
    return default_tokenizer()(texts, context_length)
