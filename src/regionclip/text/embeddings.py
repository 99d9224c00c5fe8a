"""Concept / class embeddings exactly as RegionCLIP's ``tools/extract_concept_features.py``
(docs/DESIGN.md#class-embeddings).

For each concept: fill it into every template (commas removed, ``+`` -> space), tokenize (77, EOT may be cut),
encode with the text tower (EOT pooling + projection, no normalisation) and take the plain mean over the
templates. The result is **not** normalised; classifiers normalise rows at use time.

The text tower comes in built (:func:`regionclip.factory.load_text_tower` reads it from a weight file); the
files the embeddings are saved to are :mod:`regionclip.checkpoint.embedding_files`. The compute dtype comes in
resolved ("float32" / "bfloat16"; "auto" is resolved by the caller with
:func:`regionclip.inference.hardware.resolve_text_dtype`).

Speed (:class:`PromptEncoder`): the N x T prompts are encoded in batches of ``batch_size`` prompts that span
names, and only the part of each prompt that is not shared with its template's leading tokens runs through the
text tower (the template prefix's keys/values are computed once; see
:mod:`regionclip.modeling.text_encoder`, ``PrefixedTokens``). Each prompt stops at its pooled (EOT) token, and
the last layer runs only at that token. With the 81 templates and LVIS names a prompt averages 9 tokens of
which 3.7 are its own, against 77 in the original; the result equals the original's procedure up to float
rounding (tests/test_text_embedding_cache.py).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from regionclip.modeling.text_encoder import CLIPTextTransformer, PrefixedTokens, PrefixStates
from regionclip.text.prompts import fill_template, resolve_templates, validate_names
from regionclip.text.tokenizer import ClipTokenizer, default_tokenizer
from regionclip.utils import COMPUTE_DTYPES

AVERAGE_MODES = ("mean", "normalized")
# The text tower's compute dtypes: the package's compute dtypes (utils.COMPUTE_DTYPES) but float16 (the tower's
# residual stream and LayerNorms stay float32 under autocast; only bfloat16 was measured within the agreement bar)
TEXT_DTYPES = tuple(d for d in COMPUTE_DTYPES if d != "float16")
DEFAULT_BATCH_SIZE = 1024  # prompts per forward (~4k packed tokens): fastest of 256/512/1024 on a loaded 2-core CPU


@torch.inference_mode()
def encode_tokens(encoder: CLIPTextTransformer, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """Encode LongTensor[P, 77] in batches -> Tensor[P, D] (unnormalised), on the encoder's device.

    Each batch is cut after its last pooled position (the largest EOT index): under the causal mask later
    positions cannot influence the pooled one, so this is exact up to float rounding and 3-6x faster for the
    short prompts of class names. (Template prompts are faster still through :class:`PromptEncoder`.)
    """
    device = encoder.text_projection.device
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size].to(device)
        length = int(chunk.argmax(dim=-1).max()) + 1
        out.append(encoder.encode_text(chunk[:, :length]))
    return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim, device=device)


class PromptEncoder:
    """Per-template text features of names, batched across names with shared template prefixes.

    Args:
        encoder: a loaded :class:`CLIPTextTransformer` (its device is used).
        templates: T templates with ``{}`` (already resolved, see :func:`resolve_templates`).
        tokenizer: default the packaged CLIP BPE.
        batch_size: prompts per forward pass.
        dtype: "float32" or "bfloat16" (the linear layers in bf16 under autocast; LayerNorms, the residual stream
            and the attention softmax stay float32); "auto" is resolved by the caller
            (:func:`regionclip.inference.hardware.resolve_text_dtype`).

    The template prefixes' keys/values are computed on first use and reused for every later call, so one
    instance serves a whole vocabulary computed chunk by chunk.
    """

    def __init__(self, encoder: CLIPTextTransformer, templates: Sequence[str], *,
                 tokenizer: Optional[ClipTokenizer] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 dtype: str = "float32") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in TEXT_DTYPES:
            raise ValueError(f"dtype must be one of {TEXT_DTYPES}, got {dtype!r} (resolve 'auto' first with "
                             "regionclip.inference.hardware.resolve_text_dtype)")
        self.encoder = encoder
        self.dtype = dtype
        self.templates = list(templates)
        self.tok = tokenizer or default_tokenizer()
        self.batch_size = batch_size
        ctx = encoder.context_length
        # [SOT] + the tokens of the text before the first {}: what every prompt of the template should start
        # with. Prompts are compared token by token against it, so a template whose tokenization does depend
        # on the name (no space before {}) only shares the part that really matches.
        self.prefix_ids = [([self.tok.sot_id] + self.tok.encode(t.split("{}", 1)[0]))[:ctx] for t in self.templates]
        self._states: Optional[PrefixStates] = None

    @property
    def device(self) -> torch.device:
        return self.encoder.text_projection.device

    def _prefix_states(self) -> PrefixStates:
        if self._states is None:
            lengths = torch.tensor([len(p) for p in self.prefix_ids])
            ids = torch.zeros(len(self.prefix_ids), int(lengths.max()), dtype=torch.long)
            for i, p in enumerate(self.prefix_ids):
                ids[i, :len(p)] = torch.tensor(p)
            with torch.inference_mode(), self._autocast():
                self._states = self.encoder.encode_prefixes(ids.to(self.device), lengths.to(self.device))
        return self._states

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == "bfloat16")

    def _tails(self, names: Sequence[str]) -> tuple[list[list[int]], list[int], list[str]]:
        """Per prompt (name-major, template-minor): its own tail ids (from the first token not shared with the
        template prefix to the pooled token), the shared length, and the names whose prompts were truncated."""
        ctx = self.encoder.context_length
        tails: list[list[int]] = []
        shared: list[int] = []
        too_long: list[str] = []
        for name in names:
            cut = False
            for template, prefix in zip(self.templates, self.prefix_ids):
                ids = [self.tok.sot_id] + self.tok.encode(fill_template(template, name)) + [self.tok.eot_id]
                cut |= len(ids) > ctx
                ids = ids[:ctx]  # the original cuts without re-appending the EOT
                pooled = ids.index(max(ids))  # torch.argmax's choice: the first largest id
                p = 0
                while p < min(len(prefix), pooled) and ids[p] == prefix[p]:
                    p += 1
                tails.append(ids[p:pooled + 1])
                shared.append(p)
            if cut:
                too_long.append(name)
        return tails, shared, too_long

    def features(self, names: Sequence[str]) -> tuple[Tensor, list[str]]:
        """-> (float32 Tensor[C, T, D] on the encoder's device, names whose prompts exceed the context)."""
        tails, shared, too_long = self._tails(names)
        states = self._prefix_states()
        n_t = len(self.templates)
        # Sorted by tail length (then template): most batches hold equal-length rows, which need no padding at
        # all in the attention step, and rows of a template sit together.
        order = sorted(range(len(tails)), key=lambda i: (len(tails[i]), i % n_t))
        feats = torch.empty(len(tails), self.encoder.embed_dim, device=self.device)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                span = len(tails[rows[-1]])  # the longest: rows are sorted by length
                ids = torch.tensor([tails[r] + [0] * (span - len(tails[r])) for r in rows], dtype=torch.long)
                batch = PrefixedTokens(ids.to(self.device), states,
                                       torch.tensor([r % n_t for r in rows], device=self.device),
                                       torch.tensor([shared[r] for r in rows], device=self.device))
                feats[torch.tensor(rows, device=self.device)] = self.encoder.encode_text(batch).float()
        return feats.view(len(names), n_t, self.encoder.embed_dim), too_long


def _reduce(features: Tensor, average: str) -> Tensor:
    """features: [C, T, D] per-template features -> [C, D]."""
    if average == "mean":  # the original: plain mean of unnormalised features
        return features.mean(dim=1)
    # zero-shot-branch style: normalise each template's feature, average, renormalise
    return F.normalize(F.normalize(features, dim=-1).mean(dim=1), dim=-1)


def concept_embeddings(names: Sequence[str], encoder: CLIPTextTransformer, *,
                       templates: Optional[Union[str, Sequence[str], Path]] = None, average: str = "mean",
                       batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False,
                       tokenizer: Optional[ClipTokenizer] = None, dtype: str = "float32") -> Tensor:
    """Template-averaged text embeddings of ``names``.

    Args:
        names: N concept / class names (row i of the result = names[i]). Empty names raise, duplicates warn.
        encoder: a loaded :class:`CLIPTextTransformer` (its device is used).
        templates: see :func:`regionclip.text.prompts.resolve_templates`; default the 81 RegionCLIP templates.
        average: ``"mean"`` (original: mean of unnormalised features, result unnormalised) or
            ``"normalized"`` (normalise each, average, renormalise; result has unit rows).
        batch_size: prompts per forward pass (they span names).
        show_progress: show a tqdm bar (concepts, with concepts/s).
        dtype: the text tower's compute dtype, see :class:`PromptEncoder`.

    Returns:
        float32 Tensor[N, D] on the encoder's device.

    Warns:
        UserWarning: a prompt longer than the context length; it is truncated exactly as the original does
            (the EOT is cut off and pooling takes the largest remaining token id).
    """
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    names = validate_names(names, source="concept list")
    prompt_encoder = PromptEncoder(encoder, resolve_templates(templates), tokenizer=tokenizer, batch_size=batch_size,
                                   dtype=dtype)
    return embed_with(prompt_encoder, names, average, show_progress=show_progress)


def embed_with(prompt_encoder: PromptEncoder, names: Sequence[str], average: str = "mean", *,
               show_progress: bool = False) -> Tensor:
    """:func:`concept_embeddings` with a ready :class:`PromptEncoder` (no name validation) -> Tensor[N, D]."""
    names = list(names)
    # a step = a few full batches of prompts: the progress bar moves every few seconds, batches stay full
    per_step = max(1, math.ceil(4 * prompt_encoder.batch_size / len(prompt_encoder.templates)))
    too_long: list[str] = []
    rows: list[Tensor] = []
    bar = None
    if show_progress:
        bar = tqdm(total=len(names), unit="concept", desc="text embeddings", smoothing=0.1)
    try:
        for start in range(0, len(names), per_step):
            chunk = names[start:start + per_step]
            feats, cut = prompt_encoder.features(chunk)
            too_long += cut
            rows.append(_reduce(feats, average))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if too_long:
        ctx = prompt_encoder.encoder.context_length
        shown = [n if len(n) <= 60 else n[:57] + "..." for n in too_long[:3]]
        warnings.warn(f"{len(too_long)} name(s) give prompts longer than {ctx} tokens and were truncated like "
                      f"the original (EOT cut off): {shown}{' ...' if len(too_long) > 3 else ''}",
                      UserWarning, stacklevel=3)
    # outside inference mode: the result may later meet autograd (e.g. a training concept pool)
    return torch.cat(rows)


__all__ = ["AVERAGE_MODES", "DEFAULT_BATCH_SIZE", "TEXT_DTYPES", "PromptEncoder", "concept_embeddings", "embed_with",
           "encode_tokens"]
