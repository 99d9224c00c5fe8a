"""The zero-shot branch's UniCL-style text encoder (docs/DESIGN.md#zero-shot-branch).

Module layout (our keys = the branch's ``roi_heads.box_predictor.lang_encoder.*`` minus that prefix):
``lang_encoder.{token_embedding.weight, positional_embedding, resblocks.N.{attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj.*, ln_1.*, mlp.c_fc.*, mlp.c_proj.*, ln_2.*}, ln_final.*}``, ``lang_proj`` [W, D]. ``logit_scale``
belongs to the region classifier (the detector), not here. Tokenization and the class-embedding procedure are in
:mod:`regionclip.text.unicl_embeddings`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text_encoder import QuickGELU

TF_LAYERNORM_EPS = 1e-12  # UniCL's "TF-style" LayerNorm: epsilon inside the square root = nn.LayerNorm's formula
CONTEXT_LENGTH = 77


class _Block(nn.Module):
    """UniCL ``ResidualAttentionBlock``: pre-LN (eps 1e-12), ``nn.MultiheadAttention`` layout, QuickGELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=TF_LAYERNORM_EPS)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width, eps=TF_LAYERNORM_EPS)

    def forward(self, x: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """x: [B, L, W]; mask: bool [B, L], True = attend (padding masked as keys); causal: lower-triangular."""
        b, n, w = x.shape
        y = self.ln_1(x)
        q, k, v = F.linear(y, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        if causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keep = mask[:, None, None, :] if mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.attn.out_proj(out.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln_2(x))


class _LangTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context_length: int, vocab_size: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.resblocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width, eps=TF_LAYERNORM_EPS)


class UniCLTextEncoder(nn.Module):
    """The branch's text tower: transformer, ``ln_final``, EOT pooling, ``lang_proj``, L2 normalisation.

    Args:
        width: 512. layers: 12. heads: 8. embed_dim: ``lang_proj`` output, 512.
        autoregressive: ``MODEL.TEXT.AUTOGRESSIVE`` - causal mask (True, the default and the Swin configs) or
            bidirectional attention with a key-padding mask (False, the ViT / DaViT / FocalNet configs).
    """

    def __init__(self, width: int = 512, layers: int = 12, heads: int = 8, embed_dim: int = 512, *,
                 context_length: int = CONTEXT_LENGTH, vocab_size: int = 49408, autoregressive: bool = True) -> None:
        super().__init__()
        self.autoregressive = autoregressive
        self.context_length = context_length
        self.lang_encoder = _LangTransformer(width, layers, heads, context_length, vocab_size)
        self.lang_proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    @property
    def embed_dim(self) -> int:
        return int(self.lang_proj.shape[1])

    def encode_text(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """[B, L] ids (+ [B, L] 0/1 mask) -> [B, D] embeddings divided by (norm + 1e-7), pooled at argmax(ids).

        The positional embedding is added for all L = 77 positions as the branch does (it pads to 77).
        """
        enc = self.lang_encoder
        if input_ids.shape[1] != enc.positional_embedding.shape[0]:
            raise ValueError(f"UniCL text encoder needs sequences padded to {enc.positional_embedding.shape[0]} "
                             f"tokens, got {input_ids.shape[1]}")
        x = enc.token_embedding(input_ids) + enc.positional_embedding
        mask = attention_mask.bool() if attention_mask is not None else None
        for block in enc.resblocks:
            x = block(x, mask, self.autoregressive)
        x = enc.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)] @ self.lang_proj
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7)
