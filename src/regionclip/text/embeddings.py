"""Concept / class embeddings exactly as RegionCLIP's ``tools/extract_concept_features.py`` (spec §5, §3.7).

For each concept: fill it into every template (commas removed, ``+`` -> space), tokenize (77, EOT may be cut),
encode with the text tower (EOT pooling + projection, no normalisation) and take the plain mean over the
templates. The result is **not** normalised; classifiers normalise rows at use time.

File format (``save_concept_embeddings``): ``.pth`` = a bare float32 tensor [N, D] (what the original's
``TEXT_EMB_PATH`` loads); ``.safetensors`` = ``{"embeddings": [N, D]}``. Difference from the original: it
squeezed [N, 1, D] and so wrote a [D] tensor when N = 1; we always write [N, D]. :func:`load_concept_embeddings`
accepts [D] (-> [1, D]) and the zero-shot branch's [N, 1, D] as well.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from regionclip.checkpoint.io import CheckpointError, PathLike, read_weight_file, save_file_atomic
from regionclip.modeling.text_encoder import CLIPTextTransformer, build_text_encoder_from_state_dict
from regionclip.text.prompts import build_prompts, resolve_templates, validate_names
from regionclip.text.tokenizer import ClipTokenizer, default_tokenizer

AVERAGE_MODES = ("mean", "normalized")
SAFETENSORS_KEY = "embeddings"


def load_text_encoder(weights: PathLike, *, allow_jit: bool = False,
                      device: Optional[Union[str, torch.device]] = None) -> CLIPTextTransformer:
    """The text tower of a RegionCLIP checkpoint (``lang_encoder.*``) or an OpenAI CLIP file, in eval mode.

    Widths (RN50: 512/1024, RN50x4: 640/640) are inferred from tensor shapes.

    Raises:
        CheckpointError: unreadable file, no text weights, or shapes that do not form a CLIP text tower.
    """
    from regionclip.checkpoint.openai_clip import read_clip_checkpoint, text_state_dict

    sd = text_state_dict(read_clip_checkpoint(weights, allow_jit=allow_jit), source=str(weights))
    try:
        encoder = build_text_encoder_from_state_dict(sd, source=str(weights))
    except KeyError as e:
        raise CheckpointError(f"{weights}: text-encoder weights are incomplete ({e})") from e
    return encoder.to(device) if device is not None else encoder


@torch.no_grad()
def encode_tokens(encoder: CLIPTextTransformer, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """Encode LongTensor[P, 77] in batches -> Tensor[P, D] (unnormalised), on the encoder's device.

    Each batch is cut after its last pooled position (the largest EOT index): under the causal mask later
    positions cannot influence the pooled one, so this is exact up to float rounding and 3-6x faster for the
    short prompts of class names.
    """
    device = encoder.text_projection.device
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size].to(device)
        length = int(chunk.argmax(dim=-1).max()) + 1
        out.append(encoder.encode_text(chunk[:, :length]))
    return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim, device=device)


def _reduce(features: Tensor, average: str) -> Tensor:
    """features: [C, T, D] per-template features -> [C, D]."""
    if average == "mean":  # the original: plain mean of unnormalised features
        return features.mean(dim=1)
    # zero-shot-branch style: normalise each template's feature, average, renormalise
    return F.normalize(F.normalize(features, dim=-1).mean(dim=1), dim=-1)


def concept_embeddings(names: Sequence[str], encoder: CLIPTextTransformer, *,
                       templates: Optional[Union[str, Sequence[str], Path]] = None, average: str = "mean",
                       batch_size: int = 256, show_progress: bool = False,
                       tokenizer: Optional[ClipTokenizer] = None) -> Tensor:
    """Template-averaged text embeddings of ``names``.

    Args:
        names: N concept / class names (row i of the result = names[i]). Empty names raise, duplicates warn.
        encoder: a loaded :class:`CLIPTextTransformer` (its device is used).
        templates: see :func:`regionclip.text.prompts.resolve_templates`; default the 81 RegionCLIP templates.
        average: ``"mean"`` (original: mean of unnormalised features, result unnormalised) or
            ``"normalized"`` (normalise each, average, renormalise; result has unit rows).
        batch_size: prompts per forward pass.
        show_progress: show a tqdm bar (one tick per concept).

    Returns:
        float32 Tensor[N, D] on the encoder's device.

    Warns:
        UserWarning: a prompt longer than the context length; it is truncated exactly as the original does
            (the EOT is cut off and pooling takes the largest remaining token id).
    """
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}, got {average!r}")
    names = validate_names(names, source="concept list")
    templates = resolve_templates(templates)
    tok = tokenizer or default_tokenizer()
    ctx = encoder.context_length
    per_chunk = max(1, batch_size // len(templates))  # concepts per step; a step may span several batches
    too_long: list[str] = []
    rows: list[Tensor] = []
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), unit="concept", desc="text embeddings")
    try:
        for start in range(0, len(names), per_chunk):
            chunk = names[start:start + per_chunk]
            prompts = [p for n in chunk for p in build_prompts(n, templates)]
            tokens, lengths = tok.tokenize_with_lengths(prompts, context_length=ctx)
            too_long += [n for j, n in enumerate(chunk)
                         if max(lengths[j * len(templates):(j + 1) * len(templates)]) > ctx]
            feats = encode_tokens(encoder, tokens, batch_size)
            rows.append(_reduce(feats.view(len(chunk), len(templates), -1).float(), average))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if too_long:
        shown = [n if len(n) <= 60 else n[:57] + "..." for n in too_long[:3]]
        warnings.warn(f"{len(too_long)} name(s) give prompts longer than {ctx} tokens and were truncated like "
                      f"the original (EOT cut off): {shown}{' ...' if len(too_long) > 3 else ''}",
                      UserWarning, stacklevel=2)
    return torch.cat(rows)


def save_concept_embeddings(embeddings: Tensor, path: PathLike) -> Path:
    """Write [N, D] atomically: ``.pth`` as a bare tensor, ``.safetensors`` as ``{"embeddings": ...}``.

    Unlike the original, N = 1 is written as [1, D], not [D].
    """
    if embeddings.dim() != 2:
        raise ValueError(f"concept embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    emb = embeddings.detach().to("cpu", torch.float32).contiguous()
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_file_atomic({SAFETENSORS_KEY: emb}, path)
    return save_file_atomic(emb, path)


def load_concept_embeddings(path: PathLike, expected_dim: Optional[int] = None) -> Tensor:
    """Read a concept-embedding file (ours or the original's) -> float32 Tensor[N, D] on the CPU.

    Accepts a bare tensor [N, D], [D] (the original's single-concept file), [N, 1, D] (zero-shot branch), or a
    dict / safetensors file holding exactly one tensor (or an ``"embeddings"`` entry).

    Raises:
        CheckpointError: anything else, or D != ``expected_dim`` when given.
    """
    obj = read_weight_file(path)
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if SAFETENSORS_KEY in tensors:
            obj = tensors[SAFETENSORS_KEY]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise CheckpointError(f"{path}: expected one embedding tensor, found keys {sorted(tensors)[:8]}")
    if not isinstance(obj, Tensor):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not an embedding tensor")
    emb = obj.float()
    if emb.dim() == 1:
        emb = emb[None]  # the original's extraction squeezed a single concept to [D]
    elif emb.dim() == 3 and emb.shape[1] == 1:
        emb = emb[:, 0]
    if emb.dim() != 2:
        raise CheckpointError(f"{path}: concept embeddings must be [N, D] (or [D], [N, 1, D]); got "
                              f"{tuple(obj.shape)}")
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise CheckpointError(f"{path}: embeddings have dimension {emb.shape[1]} but the model expects "
                              f"{expected_dim} (RN50 = 1024, RN50x4 = 640); regenerate them with the matching "
                              "checkpoint (regionclip embed-concepts --weights ...)")
    return emb


__all__ = ["AVERAGE_MODES", "concept_embeddings", "encode_tokens", "load_concept_embeddings",
           "load_text_encoder", "save_concept_embeddings"]
