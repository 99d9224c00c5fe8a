"""CLIP text transformer (RegionCLIP's ``lang_encoder``), docs/DESIGN.md#text-encoder.

State-dict keys equal the released checkpoints' ``lang_encoder.*`` keys without the prefix, which are also
OpenAI CLIP's top-level text keys: ``token_embedding.weight``, ``positional_embedding``,
``transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.*, ln_1.*, mlp.c_fc.*,
mlp.c_proj.*, ln_2.*}``, ``ln_final.*``, ``text_projection``.

Fast path for many short prompts (:class:`PrefixedTokens`): prompts built from templates share their leading
tokens (``[SOT] a photo of a``). Under the causal mask the hidden states - hence every layer's keys and values -
at those positions do not depend on what follows, so they are computed once per template
(:meth:`CLIPTextTransformer.encode_prefixes`) and each prompt runs only its own tail, from the first token that
differs up to the pooled (EOT) token. The tails are packed without padding for the per-token layers (projections,
MLP, LayerNorm: almost all the FLOPs); only the tiny attention step uses a padded layout with a mask. Results
equal :meth:`CLIPTextTransformer.encode_text` on the full prompts up to float rounding.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regionclip.config import ClipTextConfig

from .layers import SelfAttention


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (CLIP does this so fp16 text towers stay stable)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation the OpenAI weights were trained with (not ``nn.GELU``)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # inference: the same operations in one buffer instead of three (bitwise equal; halves the memory
        # traffic, which matters on CPUs where the MLP's elementwise step costs almost as much as its GEMMs)
        out = x * 1.702
        return torch.sigmoid_(out).mul_(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads, causal=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (keys ``resblocks.N.*``)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)

    def blocks(self) -> list[ResidualAttentionBlock]:
        """The blocks in order (``nn.Sequential`` iterates as plain ``nn.Module``)."""
        out: list[ResidualAttentionBlock] = []
        for block in self.resblocks:
            if not isinstance(block, ResidualAttentionBlock):
                raise TypeError(f"text Transformer blocks must be ResidualAttentionBlock, found {type(block).__name__}")
            out.append(block)
        return out


@dataclass(frozen=True)
class PrefixStates:
    """Per-layer attention keys and values of P token prefixes, right-padded to Lp (from
    :meth:`CLIPTextTransformer.encode_prefixes`).

    Attributes:
        kv: one Tensor[P, 2, heads, Lp, width / heads] per layer (index 0 = keys, 1 = values).
        lengths: LongTensor[P], the real length of each prefix (<= Lp).
    """

    kv: tuple[Tensor, ...]
    lengths: Tensor


@dataclass(frozen=True)
class PrefixedTokens:
    """A batch of B prompts given as (shared prefix, own tail), for :meth:`CLIPTextTransformer.encode_text`.

    Prompt b = the first ``prefix_lengths[b]`` tokens of prefix ``prefix_index[b]`` of ``prefix``, followed by
    ``tokens[b]`` (right-padded with anything smaller than the pooled id). The pooled position (the largest
    token id of the whole prompt) must lie in the tail: callers cut the shared part before it.

    Attributes:
        tokens: LongTensor[B, S], the tails.
        prefix: the prefixes' per-layer keys/values.
        prefix_index: LongTensor[B], which prefix each prompt continues.
        prefix_lengths: LongTensor[B], how many of that prefix's tokens the prompt shares (0 = none).
    """

    tokens: Tensor
    prefix: PrefixStates
    prefix_index: Tensor
    prefix_lengths: Tensor

    @property
    def shape(self) -> torch.Size:
        """``tokens.shape``: [B, S] (so code that counts prompts by ``tokens.shape[0]`` works unchanged)."""
        return self.tokens.shape


def _attend(block: "ResidualAttentionBlock", x: Tensor, lay: "_PackedLayout", past: Optional[Tensor],
            last_only: bool) -> tuple[Tensor, Tensor]:
    """One block's attention on packed tails.

    Args:
        x: Tensor[N, W], the N packed tail tokens (rows one after another, no padding).
        past: the prefix keys/values of each row, [B, 2, H, Lp, hd] (or None).
        last_only: compute the attention output only at each row's last token (enough for the final layer).

    Returns:
        (attention output [N, W], or [B, W] with ``last_only``; the rows' own keys/values [B, 2, H, S, hd]).
    """
    attn = block.attn
    heads, width = attn.heads, x.shape[-1]
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [N, 3W]
    if not lay.uniform:  # scatter into the padded [B, S] layout for attention only (all other ops stay packed)
        qkv = qkv.new_zeros(lay.rows * lay.span, 3 * width).index_copy_(0, lay.flat, qkv)
    qkv = qkv.view(lay.rows, lay.span, 3, heads, width // heads).permute(0, 2, 3, 1, 4)  # [B, 3, H, S, hd]
    q, own = qkv[:, 0], qkv[:, 1:]
    kv = own if past is None else torch.cat([past, own], 3)  # [B, 2, H, Lp + S, hd], one copy for both
    mask = lay.mask
    if last_only:
        rows = torch.arange(lay.rows, device=x.device)
        q = q[rows, :, lay.lengths - 1].unsqueeze(2)  # [B, H, 1, hd]
        mask = mask[rows, :, lay.lengths - 1].unsqueeze(2)  # [B, 1, 1, Lp + S]
    out = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=mask)  # [B, H, S or 1, hd]
    out = out.transpose(1, 2).reshape(-1, width)
    if not last_only and not lay.uniform:
        out = out.index_select(0, lay.flat)
    return attn.out_proj(out), own


@dataclass(frozen=True)
class _PackedLayout:
    """Index bookkeeping for B variable-length rows packed into N tokens (row-major)."""

    rows: int
    span: int  # S, the longest row
    lengths: Tensor  # [B]
    flat: Tensor  # [N] position of each packed token in the padded [B * S] layout
    last: Tensor  # [B] packed index of each row's last token
    positions: Tensor  # [N] absolute position (prefix length + index in the tail)
    mask: Tensor  # bool [B, 1, S, Lp + S]: True = may attend (prefix part, then causal own part)
    uniform: bool  # every row has S tokens: the packed layout is already the padded one

    @staticmethod
    def build(lengths: Tensor, prefix_lengths: Tensor, prefix_span: int) -> "_PackedLayout":
        device = lengths.device
        rows, span = lengths.numel(), int(lengths.max())
        row_of = torch.repeat_interleave(torch.arange(rows, device=device), lengths)
        ends = lengths.cumsum(0)
        within = torch.arange(row_of.numel(), device=device) - (ends - lengths)[row_of]
        own = torch.ones(span, span, dtype=torch.bool, device=device).tril()
        pre = torch.arange(prefix_span, device=device)[None] < prefix_lengths[:, None]  # [B, Lp]
        mask = torch.cat([pre[:, None, :].expand(rows, span, prefix_span), own.expand(rows, span, span)], -1)
        return _PackedLayout(rows, span, lengths, row_of * span + within, ends - 1,
                             prefix_lengths[row_of] + within, mask[:, None], bool((lengths == span).all()))


class CLIPTextTransformer(nn.Module):
    """CLIP text tower: token + positional embedding, causal transformer, ``ln_final``, EOT pooling, projection.

    Args:
        width: transformer width (512 for RN50, 640 for RN50x4).
        heads: attention heads (width / 64).
        layers: residual blocks (12).
        context_length: maximum sequence length (77).
        vocab_size: BPE vocabulary size (49408).
        embed_dim: joint embedding dimension D (1024 for RN50, 640 for RN50x4).
    """

    def __init__(self, width: int = 512, heads: int = 8, layers: int = 12, context_length: int = 77,
                 vocab_size: int = 49408, embed_dim: int = 1024) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        # OpenAI's initialisation; only matters for training from scratch, every use here loads weights.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def width(self) -> int:
        return self.transformer.width

    def encode_text(self, tokens: Union[Tensor, PrefixedTokens], normalize: bool = False) -> Tensor:
        """Text features from token ids.

        Args:
            tokens: LongTensor[B, L] as produced by :class:`regionclip.text.tokenizer.ClipTokenizer`, L <=
                context_length. L may be shorter than 77: with a causal mask, positions after the pooled one
                cannot change it, so trailing padding can be dropped (results agree to float rounding).
                Or a :class:`PrefixedTokens` batch (template prompts sharing prefixes; same result up to float
                rounding, several times less work, see the module docstring).
            normalize: L2-normalise the output. RegionCLIP's concept embeddings are *not* normalised.

        Returns:
            Tensor[B, embed_dim], the hidden state at the position of the largest token id (the EOT when it
            was not truncated away) after ``ln_final``, times ``text_projection``.
        """
        if isinstance(tokens, PrefixedTokens):
            out = self._encode_prefixed(tokens)
            return F.normalize(out, dim=-1) if normalize else out
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed the context length "
                             f"{self.context_length}; tokenize with context_length={self.context_length}")
        dtype = self.text_projection.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding[:length].to(dtype)
        x = self.ln_final(self.transformer(x))
        # argmax of the ids = the EOT (49407, the largest id); for a sequence whose EOT was cut off by the
        # 77-token truncation this picks whatever token has the largest id - the original does the same.
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        out = pooled @ self.text_projection
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, tokens: Tensor) -> Tensor:
        return self.encode_text(tokens)

    def encode_prefixes(self, tokens: Tensor, lengths: Tensor) -> PrefixStates:
        """Every layer's keys/values over P token prefixes (for :class:`PrefixedTokens`).

        Args:
            tokens: LongTensor[P, Lp], right-padded prefixes (e.g. ``[SOT] a photo of a`` per template).
            lengths: LongTensor[P], real lengths, each >= 1.
        """
        lengths = lengths.to(tokens.device)
        if tokens.dim() != 2 or lengths.shape != tokens.shape[:1] or int(lengths.min()) < 1:
            raise ValueError(f"prefixes must be [P, Lp] with P lengths >= 1, got {tuple(tokens.shape)} and "
                             f"{lengths.tolist()}")
        lay = _PackedLayout.build(lengths, torch.zeros_like(lengths), 0)
        x = self._embed(tokens.reshape(-1)[_row_major(tokens, lengths)], lay.positions)
        kv = []
        blocks = self.transformer.blocks()
        for i, block in enumerate(blocks):
            a, own = _attend(block, x, lay, None, last_only=False)
            kv.append(own.contiguous())
            if i + 1 < len(blocks):  # the last block's output is never used, only its keys/values
                x = x + a
                x = x + block.mlp(block.ln_2(x))
        return PrefixStates(tuple(kv), lengths)

    def _encode_prefixed(self, batch: PrefixedTokens) -> Tensor:
        """:meth:`encode_text` for a :class:`PrefixedTokens` batch -> Tensor[B, embed_dim]."""
        tokens = batch.tokens
        lengths = tokens.argmax(dim=-1) + 1  # the tail ends at the pooled token; later padding is irrelevant
        plen = batch.prefix_lengths.to(tokens.device)
        if int((plen + lengths).max()) > self.context_length:
            raise ValueError(f"prefix + tail exceed the context length {self.context_length}")
        span = int(plen.max())  # only as many prefix positions as this batch uses
        lay = _PackedLayout.build(lengths, plen, span)
        idx = batch.prefix_index.to(tokens.device)
        x = self._embed(tokens.reshape(-1)[_row_major(tokens, lengths)], lay.positions)
        blocks = self.transformer.blocks()
        inplace = not (torch.is_grad_enabled() and x.requires_grad)  # x is ours: update it in place when allowed
        for i, block in enumerate(blocks):
            last = i + 1 == len(blocks)  # the final block only matters at the pooled (last) token of each row
            past = batch.prefix.kv[i][:, :, :, :span].index_select(0, idx) if span else None
            a, _ = _attend(block, x, lay, past, last_only=last)
            if last:
                x = x.index_select(0, lay.last)
            x = x.add_(a) if inplace else x + a
            m = block.mlp(block.ln_2(x))
            x = x.add_(m) if inplace else x + m
        return self.ln_final(x) @ self.text_projection

    def _embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Packed token ids [N] at absolute ``positions`` [N] -> Tensor[N, W] in the model's dtype."""
        dtype = self.text_projection.dtype
        return self.token_embedding(ids).to(dtype) + self.positional_embedding[positions].to(dtype)


def _row_major(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Indices into ``tokens.reshape(-1)`` of the first ``lengths[b]`` tokens of each row b, row after row."""
    keep = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
    return keep.reshape(-1).nonzero().squeeze(1)


def build_text_encoder(cfg: ClipTextConfig) -> CLIPTextTransformer:
    """Build (randomly initialised) from a :class:`regionclip.config.ClipTextConfig`."""
    return CLIPTextTransformer(width=cfg.width, heads=cfg.heads, layers=cfg.layers,
                               context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                               embed_dim=cfg.embed_dim)


_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def text_config_from_state_dict(sd: Mapping[str, Tensor]) -> ClipTextConfig:
    """Infer the text-tower architecture from tensor shapes (keys without any ``lang_encoder.`` prefix).

    Heads = width / 64, as in every OpenAI CLIP text tower (512 -> 8 for RN50, 640 -> 10 for RN50x4).

    Raises:
        KeyError: a key needed for the inference is missing (the dict is not a CLIP text tower).
    """
    needed = ("token_embedding.weight", "positional_embedding", "text_projection")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KeyError(f"not a CLIP text-tower state dict: missing {missing} (have e.g. {sorted(sd)[:5]})")
    vocab_size, width = sd["token_embedding.weight"].shape
    layers = len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if layers == 0:
        raise KeyError("not a CLIP text-tower state dict: no transformer.resblocks.N.* keys")
    return ClipTextConfig(context_length=int(sd["positional_embedding"].shape[0]), vocab_size=int(vocab_size),
                          width=int(width), heads=int(width) // 64, layers=layers,
                          embed_dim=int(sd["text_projection"].shape[1]))

