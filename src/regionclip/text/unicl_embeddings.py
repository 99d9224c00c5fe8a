"""The zero-shot branch's class-embedding procedure and HF-style tokenization (docs/DESIGN.md#zero-shot-branch).

The text encoder module itself is :class:`regionclip.modeling.unicl_text.UniCLTextEncoder`.

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

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..modeling.text_encoder import CLIPTextTransformer
from ..modeling.unicl_text import UniCLTextEncoder
from .tokenizer import CONTEXT_LENGTH, ClipTokenizer, default_tokenizer

# The branch's get_prompt_templates() returns only the first two of the 81 templates.
ZEROSHOT_BRANCH_TEMPLATES = ("{}.", "a photo of a {}.")


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


@torch.no_grad()
def branch_class_embeddings(names: Sequence[str], encode: Callable[[list[str]], Tensor], *,
                            templates: Sequence[str] = ZEROSHOT_BRANCH_TEMPLATES) -> Tensor:
    """Class embeddings as the branch computes them before evaluation (docs/DESIGN.md#zero-shot-branch).

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


@torch.no_grad()
def zeroshot_class_embeddings(text_encoder: Optional[nn.Module], names: Sequence[str], *,
                              device: Optional[torch.device] = None,
                              templates: Sequence[str] = ZEROSHOT_BRANCH_TEMPLATES) -> Tensor:
    """[K, D] class embeddings with a transformer checkpoint's own text tower, the branch's way: each name in
    every template, prompt embeddings L2-normalised, averaged, re-normalised.

    Args:
        text_encoder: a :class:`UniCLTextEncoder` (branch checkpoints) or a CLIP text transformer (OpenAI /
            open_clip ViT files); None when the file carried no text tower.
    Raises:
        ValueError: no text encoder (give a concept-embedding file instead).
    """
    if text_encoder is None:
        raise ValueError("this checkpoint has no text encoder, so class names cannot be embedded: pass "
                         "precomputed class embeddings (--concept-emb file.pth, [K, D] rows) instead")
    enc = text_encoder
    dev = device if device is not None else next(enc.parameters()).device

    def encode(prompts: list[str]) -> Tensor:
        if isinstance(enc, UniCLTextEncoder):
            ids, mask = tokenize_like_hf(prompts)
            return enc.encode_text(ids.to(dev), mask.to(dev))
        assert isinstance(enc, CLIPTextTransformer)
        return enc.encode_text(default_tokenizer()(prompts, enc.context_length).to(dev), normalize=True)

    return branch_class_embeddings(list(names), encode, templates=templates).to(dev)
