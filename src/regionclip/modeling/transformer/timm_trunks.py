"""Swin / DaViT / FocalNet trunks from timm as dense region-encoder backbones (docs/DESIGN.md#zero-shot-branch).

timm is optional (extra ``[transformers]``) and imported only when a trunk is built. The zero-shot branch used
Microsoft's own Swin / DaViT / FocalNet code; timm's classes compute the same networks, and timm's
``checkpoint_filter_fn`` of each family converts Microsoft's key layout to timm's (used by
:mod:`regionclip.checkpoint.zeroshot_branch`).

What each family contributes to the region head (the branch's ``output_is_normalized`` logic):

=========  ==========================  ======  ===========================================================
family     map                         stride  norm
=========  ==========================  ======  ===========================================================
swin       ``forward_features`` (NHWC)  32      ``norm`` inside ``forward_features`` (map is normalised)
focalnet   ``forward_features`` (NCHW)  32      ``norm`` inside ``forward_features`` (map is normalised)
davit      ``forward_features`` (NCHW)  32      not normalised: ``head.norm`` is applied to pooled regions
=========  ==========================  ======  ===========================================================
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ...utils import require

FAMILIES = ("swin", "davit", "focalnet")

# The branch's configs (docs/DESIGN.md#zero-shot-branch) as timm constructor kwargs. Flags that no tensor shape reveals (FocalNet's
# post-LN / normalised modulator) are taken from here when a checkpoint is loaded.
BRANCH_CONFIGS: dict[str, dict[str, Any]] = {
    "swin": dict(patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7,
                 mlp_ratio=4.0, qkv_bias=True),
    "davit": dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32)),
    "focalnet": dict(embed_dim=128, depths=(2, 2, 18, 2), focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3),
                     use_overlap_down=True, normalize_modulator=True, use_post_norm=True, layerscale_value=1e-4),
}
_DAVIT_HEAD_DIM = 32  # every DaViT variant uses 32-d heads; qkv shapes cannot reveal the head count


def _timm_class(family: str) -> type:
    require("timm", "transformers", f"the {family} region encoder")
    if family == "swin":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer
    if family == "davit":
        from timm.models.davit import DaVit

        return DaVit
    if family == "focalnet":
        from timm.models.focalnet import FocalNet

        return FocalNet
    raise ValueError(f"unknown transformer family {family!r}; expected one of {FAMILIES}")


class TimmTrunk(nn.Module):
    """A timm Swin / DaViT / FocalNet (``model``, headless) exposing the dense-trunk interface.

    Args:
        family: ``"swin"``, ``"davit"`` or ``"focalnet"``.
        config: timm constructor kwargs (see :data:`BRANCH_CONFIGS`); ``num_classes=0`` is forced.
    """

    def __init__(self, family: str, config: Mapping[str, Any]) -> None:
        super().__init__()
        cls = _timm_class(family)
        kwargs = dict(config, num_classes=0)
        if family == "swin":
            kwargs.setdefault("strict_img_size", False)  # any multiple-of-32 input, masks built per size
        self.family = family
        self.config = dict(config)
        self.model = cls(**kwargs)

    @property
    def stride(self) -> int:
        return 32

    @property
    def num_channels(self) -> int:
        return int(self.model.num_features)

    @property
    def region_norm(self) -> Optional[nn.Module]:
        # DaViT's stage-4 output is not normalised; its LayerNorm sits in timm's head (`head.norm`)
        return self.model.head.norm if self.family == "davit" else None

    def forward_dense(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> stage-4 map [B, C, ceil(H/32), ceil(W/32)].

        The input is zero-padded bottom/right to a multiple of 32 (detectron2's ``size_divisibility``), which
        keeps RoIAlign's 1/32 box scale exact.
        """
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        out = self.model.forward_features(x)
        return out.permute(0, 3, 1, 2).contiguous() if self.family == "swin" else out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_dense(x)


def _count(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    """For ``pattern`` with two groups (stage, index): number of indices per stage, stages in order."""
    found: dict[int, set[int]] = {}
    rx = re.compile(pattern)
    for k in sd:
        m = rx.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return [max(found[s]) + 1 for s in sorted(found)]


def infer_timm_config(family: str, sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor kwargs for a trunk whose timm-layout weights are ``sd`` (keys without any prefix).

    Sizes (widths, depths, heads, window, focal levels) come from tensor shapes; flags no shape shows fall back to
    :data:`BRANCH_CONFIGS`.

    Raises:
        KeyError: a key the inference needs is missing (``sd`` is not that family in timm's layout).
    """
    cfg = dict(BRANCH_CONFIGS[family])
    if family == "swin":
        proj = sd["patch_embed.proj.weight"]
        depths = _count(sd, r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table")
        tables = [sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(len(depths))]
        window = int(round(tables[0].shape[0] ** 0.5) + 1) // 2
        fc1 = sd["layers.0.blocks.0.mlp.fc1.weight"]
        cfg.update(patch_size=int(proj.shape[-1]), embed_dim=int(proj.shape[0]), depths=tuple(depths),
                   num_heads=tuple(int(t.shape[1]) for t in tables), window_size=window,
                   mlp_ratio=fc1.shape[0] / fc1.shape[1], qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd)
    elif family == "davit":
        depths = _count(sd, r"stages\.(\d+)\.blocks\.(\d+)\.0\.")
        dims = [int(sd[f"stages.{i}.blocks.0.0.attn.qkv.weight"].shape[1]) for i in range(len(depths))]
        cfg.update(depths=tuple(depths), embed_dims=tuple(dims), num_heads=tuple(d // _DAVIT_HEAD_DIM for d in dims))
    elif family == "focalnet":
        depths = _count(sd, r"layers\.(\d+)\.blocks\.(\d+)\.modulation\.f\.weight")
        levels = [len({k.split(".")[6] for k in sd
                       if k.startswith(f"layers.{i}.blocks.0.modulation.focal_layers.")}) for i in range(len(depths))]
        windows = [int(sd[f"layers.{i}.blocks.0.modulation.focal_layers.0.0.weight"].shape[-1])
                   for i in range(len(depths))]
        cfg.update(embed_dim=int(sd["stem.proj.weight"].shape[0]), depths=tuple(depths), focal_levels=tuple(levels),
                   focal_windows=tuple(windows), use_overlap_down=int(sd["stem.proj.weight"].shape[-1]) == 7,
                   use_post_norm="layers.0.blocks.0.norm1_post.weight" in sd,
                   layerscale_value=1e-4 if "layers.0.blocks.0.ls1.gamma" in sd else None)
    else:
        raise ValueError(f"unknown transformer family {family!r}; expected one of {FAMILIES}")
    return cfg


def convert_microsoft_layout(family: str, sd: Mapping[str, Tensor], trunk: Optional[TimmTrunk]) -> dict[str, Tensor]:
    """Microsoft's Swin / DaViT / FocalNet keys (the branch's ``backbone.*`` minus the prefix) -> timm's, via timm's
    own ``checkpoint_filter_fn`` (downsample moved to the next stage, ``gamma_N`` -> ``lsN.gamma``, ...).
    Non-persistent buffers (``relative_position_index``, ``attn_mask``) are dropped by it. ``trunk`` (the target
    model, whose key names and shapes Swin's and FocalNet's filters read) may be None for DaViT only."""
    require("timm", "transformers", f"converting {family} weights")
    if family == "davit":
        from timm.models.davit import checkpoint_filter_fn as davit_filter

        # Microsoft -> timm renaming reads no model (only timm's Florence-2 conversion would)
        return dict(davit_filter(dict(sd), trunk.model if trunk is not None else None))
    if trunk is None:
        raise ValueError(f"converting {family} weights needs the target trunk: timm's {family} filter reads its "
                         "key names and shapes")
    if family == "swin":
        from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

        return dict(swin_filter(dict(sd), trunk.model))
    from timm.models.focalnet import checkpoint_filter_fn as focalnet_filter

    return dict(focalnet_filter(dict(sd), trunk.model))
