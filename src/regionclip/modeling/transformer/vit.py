"""A CLIP-style Vision Transformer that returns a dense patch-token map (docs/DESIGN.md#zero-shot-branch, ViT row).

One module covers the two ViT layouts a region encoder meets:

* **OpenAI / open_clip CLIP ViT** (ViT-B/16, ViT-L/14): no patch bias, ``ln_pre`` after the embeddings, QuickGELU
  (OpenAI weights; open_clip's non-OpenAI weights use exact GELU), LayerNorm eps 1e-5; ``ln_post`` normalises the
  class token in CLIP, so here it normalises each *pooled region* (the region vector plays the class token's role).
* **The zero-shot branch's ViT-B/16** (timm ``VisionTransformer``, ``global_pool=True``): patch bias, no ``ln_pre``,
  exact GELU, LayerNorm eps 1e-6; every patch token passes through ``fc_norm`` (our ``ln_post``) *before* pooling,
  i.e. the map is already normalised (``final_norm="map"``).

State-dict keys are OpenAI's (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
``ln_post``); :mod:`regionclip.checkpoint.zeroshot_branch` converts the timm layout to them. The image projection
(``proj`` / ``image_projection``) lives in the region encoder, not here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import SelfAttention
from ..text_encoder import QuickGELU

ACTIVATIONS = ("quick_gelu", "gelu")
FINAL_NORMS = ("region", "map")


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` (identical math in CLIP and timm's ViT)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, eps: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        activation: nn.Module = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", activation), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def interpolate_grid_embedding(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a ViT positional embedding (class token first) to another patch grid.

    Args:
        pos: [1 + gh*gw, W] embedding for ``old_grid`` = (gh, gw).
        new_grid: (h, w) patch grid of the input.

    Returns [1 + h*w, W]. Bicubic, ``align_corners=False``, no antialiasing - the zero-shot branch's
    ``interpolate_pos_embed`` (both at load time and per forward); the class-token row is kept unchanged.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:1], pos[1:]
    width = pos.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(-1, width)], dim=0)


class _BlockStack(nn.Module):
    """The ``transformer`` container of the checkpoints: only holds ``resblocks`` (keys ``transformer.resblocks.N.*``)."""

    def __init__(self, blocks: list[ResidualAttentionBlock]) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*blocks)


class VisionTransformerTrunk(nn.Module):
    """ViT image tower up to the last block, returning the patch grid as a feature map.

    Args:
        width: token width (768 for ViT-B, 1024 for ViT-L).
        layers: number of blocks (12 / 24).
        heads: attention heads (width / 64).
        patch_size: 16 or 14; also the map's stride.
        grid_size: the positional embedding's patch grid (224 / patch_size); other input sizes interpolate it.
        mlp_ratio: MLP hidden width / width (4).
        act: ``"quick_gelu"`` (OpenAI weights) or ``"gelu"`` (open_clip non-OpenAI weights, timm / the branch).
        ln_eps: LayerNorm epsilon (1e-5 CLIP, 1e-6 the branch's timm ViT).
        patch_bias: the patch-embedding conv has a bias (timm / the branch).
        ln_pre: LayerNorm after the embeddings (CLIP).
        final_norm: ``"region"`` = ``ln_post`` is applied to each pooled region vector (CLIP's class-token norm);
            ``"map"`` = to every patch token before pooling (the branch's ``fc_norm``).
    """

    def __init__(self, width: int, layers: int, heads: int, patch_size: int, grid_size: int, *,
                 mlp_ratio: float = 4.0, act: str = "quick_gelu", ln_eps: float = 1e-5, patch_bias: bool = False,
                 ln_pre: bool = True, final_norm: str = "region") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        if final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
        self.width = width
        self.patch_size = patch_size
        self.grid_size = (grid_size, grid_size)
        self.final_norm = final_norm
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid_size * grid_size + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=ln_eps) if ln_pre else None
        self.transformer = _BlockStack(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act, ln_eps) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)

    @property
    def stride(self) -> int:
        return self.patch_size

    @property
    def num_channels(self) -> int:
        return self.width

    @property
    def region_norm(self) -> Optional[nn.Module]:
        """The norm applied to pooled region vectors (None when the map is already normalised)."""
        return self.ln_post if self.final_norm == "region" else None

    def _tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> ([B, 1 + h*w, W] tokens after the last block, (h, w))."""
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if h == 0 or w == 0:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {p}x{p} patch")
        # the branch crops bottom/right to a multiple of the patch size rather than padding (docs/DESIGN.md#zero-shot-branch)
        x = self.conv1(x[:, :, : h * p, : w * p]).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = interpolate_grid_embedding(self.positional_embedding, self.grid_size, (h, w))
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return self.transformer.resblocks(x), (h, w)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Normalised image batch [B, 3, H, W] -> patch map [B, width, H // patch, W // patch] (class token
        dropped; normalised by ``ln_post`` only when ``final_norm="map"``)."""
        tokens, (h, w) = self._tokens(x)
        patches = tokens[:, 1:]
        if self.final_norm == "map":
            patches = self.ln_post(patches)
        return patches.transpose(1, 2).reshape(x.shape[0], self.width, h, w)

    def encode_image_tokens(self, x: Tensor) -> Tensor:
        """CLIP's image feature before projection: ``ln_post`` of the class token, [B, width]."""
        tokens, _ = self._tokens(x)
        return self.ln_post(tokens[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_dense(x)
