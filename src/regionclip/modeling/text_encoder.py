"""CLIP text transformer (RegionCLIP's ``lang_encoder``), spec §1.5.

State-dict keys equal the released checkpoints' ``lang_encoder.*`` keys without the prefix, which are also
OpenAI CLIP's top-level text keys: ``token_embedding.weight``, ``positional_embedding``,
``transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.*, ln_1.*, mlp.c_fc.*,
mlp.c_proj.*, ln_2.*}``, ``ln_final.*``, ``text_projection``.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regionclip.checkpoint.io import load_into
from regionclip.config import ClipTextConfig

from .layers import SelfAttention


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (CLIP does this so fp16 text towers stay stable)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation the OpenAI weights were trained with (not ``nn.GELU``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


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

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Text features from token ids.

        Args:
            tokens: LongTensor[B, L] as produced by :class:`regionclip.text.tokenizer.ClipTokenizer`, L <=
                context_length. L may be shorter than 77: with a causal mask, positions after the pooled one
                cannot change it, so trailing padding can be dropped (results agree to float rounding).
            normalize: L2-normalise the output. RegionCLIP's concept embeddings are *not* normalised.

        Returns:
            Tensor[B, embed_dim], the hidden state at the position of the largest token id (the EOT when it
            was not truncated away) after ``ln_final``, times ``text_projection``.
        """
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


def build_text_encoder_from_state_dict(sd: Mapping[str, Tensor], *, strict: bool = True,
                                       source: str = "") -> CLIPTextTransformer:
    """Build a :class:`CLIPTextTransformer` whose widths match ``sd`` and load it (float32, eval mode).

    Args:
        sd: text-tower state dict with keys as in this module's docstring (strip ``lang_encoder.`` first).
        strict: raise :class:`regionclip.checkpoint.io.CheckpointError` on any missing/unexpected/mismatched key.
        source: name of the file, for error messages.
    """
    model = build_text_encoder(text_config_from_state_dict(sd))
    load_into(model, {k: v.float() for k, v in sd.items()}, strict=strict, source=source)
    return model.eval()
