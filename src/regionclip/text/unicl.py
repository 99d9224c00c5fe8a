"""The zero-shot branch's UniCL-style text encoder and its class-embedding procedure (spec §11.3).

Module layout (our keys = the branch's ``roi_heads.box_predictor.lang_encoder.*`` minus that prefix):
``lang_encoder.{token_embedding.weight, positional_embedding, resblocks.N.{attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj.*, ln_1.*, mlp.c_fc.*, mlp.c_proj.*, ln_2.*}, ln_final.*}``, ``lang_proj`` [W, D]. ``logit_scale``
belongs to the region classifier (the detector), not here.

Tokenizer: the branch used HuggingFace ``CLIPTokenizer`` (``openai/clip-vit-base-patch32``), which cannot be
downloaded here. Our CLIP BPE tokenizer gives the same ids for plain text (same BPE merges, lower-casing,
whitespace cleaning); :func:`tokenize_like_hf` reproduces HF's framing: ``[SOT] ids [EOT]`` with truncation that
keeps the EOT (HF truncates the text to 75 tokens before adding the specials - unlike the original CLIP tokenizer,
which cuts the EOT off). HF pads with the EOT id and we pad with 0; the padding id never matters, because padded
positions are masked as keys (bidirectional mode) or lie after the pooled EOT (causal mode).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.text_encoder import QuickGELU
from .tokenizer import CONTEXT_LENGTH, ClipTokenizer, default_tokenizer

# The branch's get_prompt_templates() returns only the first two of the 81 templates.
ZEROSHOT_BRANCH_TEMPLATES = ("{}.", "a photo of a {}.")
TF_LAYERNORM_EPS = 1e-12  # UniCL's "TF-style" LayerNorm: epsilon inside the square root = nn.LayerNorm's formula


def branch_class_name(name: str) -> str:
    """The branch's cleaning: COCO-panoptic ``-other`` / ``-merged`` suffixes removed (nothing else)."""
    return name.replace("-other", "").replace("-merged", "")


def tokenize_like_hf(texts: Sequence[str], tokenizer: Optional[ClipTokenizer] = None,
                     context_length: int = CONTEXT_LENGTH) -> tuple[Tensor, Tensor]:
    """``CLIPTokenizer(texts, padding='max_length', truncation=True, max_length=77)`` with our BPE.

    Returns:
        (input_ids LongTensor[N, L], attention_mask LongTensor[N, L]) - mask 1 on SOT, text and EOT, 0 on padding.
    """
    tok = tokenizer or default_tokenizer()
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    mask = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        seq = [tok.sot_id] + tok.encode(text)[: context_length - 2] + [tok.eot_id]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


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


@torch.no_grad()
def branch_class_embeddings(names: Sequence[str], encode: Callable[[list[str]], Tensor], *,
                            templates: Sequence[str] = ZEROSHOT_BRANCH_TEMPLATES) -> Tensor:
    """Class embeddings as the branch computes them before evaluation (spec §11.3).

    Args:
        names: K class names (cleaned with :func:`branch_class_name`).
        encode: ``list[str] -> [P, D]`` unit-norm prompt embeddings.
        templates: ``"{}"`` templates; default the branch's two.

    Returns [K, D]: per class, the mean of its (normalised) prompt embeddings, re-normalised.
    """
    rows = []
    for name in names:
        emb = encode([t.format(branch_class_name(name)) for t in templates]).float().mean(dim=0)
        rows.append(emb / emb.norm())
    return torch.stack(rows) if rows else torch.zeros(0, 0)
