"""CLIP ModifiedResNet as the bottom-up trunk of an FPN RPN (``rpn_lvis_1203_clipbackbone``). docs/DESIGN.md#offline-rpn.

The original builds it with ``build_clip_resnet_fpn_backbone``: the CLIP ResNet (3-conv stem with an average pool,
anti-aliased stage strides) with FrozenBN, returning layer1..layer4 as res2..res5 (strides 4, 8, 16, 32) and
without the attention pool (its RPN config has no CLIP RoI head, so the trunk never creates one). The blocks are
the recognition branch's own :class:`~regionclip.modeling.clip_resnet.ModifiedResNet` modules, so the parameter
names are those of the released file below ``backbone.bottom_up.`` (``conv1.weight``, ``bn1.running_var``,
``layer3.0.downsample.0.weight``, ...).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from torch import Tensor, nn

from ..clip_resnet import ModifiedResNet

__all__ = ["ClipResNetTrunk"]


class ClipResNetTrunk(ModifiedResNet):
    """FPN bottom-up CLIP ResNet: ``forward`` returns ``{"res2": [N, 4w, H/4, W/4], ..., "res5": [N, 32w, H/32, W/32]}``.

    Args:
        layers: blocks per stage (3, 4, 6, 3 for RN50).
        width: stem width (64 for RN50); stage outputs are 4, 8, 16, 32 times it.

    Inputs must have H, W multiples of 32 (the FPN pads to that): the stem and every strided stage halve with an
    average pool, which would floor odd sizes and break the FPN's top-down x2 upsampling.
    Only the trunk: the whole-image CLIP methods of the parent (``encode_image``, ``forward_res5_pooled``) need the
    attention pool and are not available here; the BN folding and channels-last rewrite
    (``_fold_for_inference``) is the parent's.
    """

    def __init__(self, layers: Sequence[int], width: int = 64) -> None:
        # output_dim / heads / input_resolution only size the attention pool, removed right away
        super().__init__(tuple(layers), output_dim=width * 32, heads=max(1, width // 2), input_resolution=32,
                         width=width)
        # No attention pool: the RPN checkpoint has none (strict loading would report its keys missing). A
        # parameter-free placeholder rather than `del`, so the parent's _fold_for_inference runs unchanged.
        self.attnpool = nn.Identity()  # type: ignore[assignment]
        self.stage_names: List[str] = ["res2", "res3", "res4", "res5"]
        self.out_channels: Dict[str, int] = {f"res{i + 2}": width * 4 * 2 ** i for i in range(4)}
        self.strides: Dict[str, int] = {f"res{i + 2}": 4 * 2 ** i for i in range(4)}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:  # type: ignore[override]
        """x: [N, 3, H, W] CLIP-normalized, H and W multiples of 32 -> dict of the four stage outputs."""
        x = self.stem(x.to(self.conv1.weight.dtype))
        outputs: Dict[str, Tensor] = {}
        for name, layer in zip(self.stage_names, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            outputs[name] = x
        return outputs

    def encode_image(self, x: Tensor) -> Tensor:
        """Not available: the trunk has no attention pool."""
        raise RuntimeError("ClipResNetTrunk is an RPN trunk without an attention pool: it has no image embedding")
