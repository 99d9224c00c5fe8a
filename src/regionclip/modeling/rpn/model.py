"""``OfflineRPN``: the localization branch (detectron2 R50-FPN / R50-FPN-LSJ / R50-C4 RPN, or the FPN RPN on a CLIP
ResNet trunk of ``rpn_lvis_1203_clipbackbone``). docs/DESIGN.md#offline-rpn.

``state_dict()`` keys equal those of a detectron2 RPN checkpoint (``backbone.*``, ``proposal_generator.*``),
except ``num_batches_tracked`` of SyncBN checkpoints, which is dropped on load (see ``FrozenBatchNorm2d``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from regionclip.config import RPNConfig
from regionclip.structures import Proposals

from ..layers import fold_frozen_bn
from .clip_trunk import ClipResNetTrunk
from .fpn import FPN
from .resnet import Conv2dNorm, FrozenBatchNorm2d, ResNet
from .rpn_head import RPN

__all__ = ["OfflineRPN", "build_offline_rpn", "C4Backbone"]


class C4Backbone(ResNet):
    """R50-C4 trunk (stem + res2..res4); ``forward`` returns ``{"res4": [N, 1024, H/16, W/16]}`` (and res2/3).

    res5 belonged to the C4 detector's RoI head and is not part of the RPN.
    """

    size_divisibility: int = 0


def _padded_size(h: int, w: int, div: int) -> Tuple[int, int]:
    if div > 1:
        return (h + div - 1) // div * div, (w + div - 1) // div * div
    return h, w


class OfflineRPN(nn.Module):
    """Frozen detectron2 RPN producing class-agnostic proposals in resized-image coordinates.

    Args:
        cfg: architecture, preprocessing and test-time selection settings (see :class:`RPNConfig`).

    Submodules: ``backbone`` (FPN with ``bottom_up`` ResNet, or the C4 ResNet) and ``proposal_generator``
    (:class:`RPN` with ``rpn_head``). No training behaviour: parameters have ``requires_grad=False``,
    ``train()`` keeps eval mode, and ``forward`` runs without gradients and with the test-time top-k settings,
    as the original runs its offline RPN.
    """

    # non-persistent buffers registered in __init__, declared for typing ([3, 1, 1] each)
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, cfg: RPNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fused = False  # True in an inference copy (fused_for_inference)
        if cfg.input_format not in ("BGR", "RGB"):
            raise ValueError(f"input_format must be 'BGR' or 'RGB', got {cfg.input_format!r}")
        if cfg.trunk not in ("resnet", "clip"):
            raise ValueError(f"RPN trunk must be 'resnet' or 'clip', got {cfg.trunk!r}")
        if cfg.trunk == "clip" and (cfg.arch != "fpn" or cfg.lsj):
            raise ValueError("the CLIP ResNet trunk only exists under a plain FPN RPN (arch 'fpn', lsj False)")
        # The original divides by 255 first when the offline config's mean sums to < 3 (CLIP statistics on 0..1
        # values, RGB only: rpn_lvis_1203_clipbackbone), else normalizes 0..255 values (spec 2.1 / 2.2).
        self.div_pixel = sum(cfg.pixel_mean) < 3.0
        if self.div_pixel and cfg.input_format != "RGB":
            raise ValueError("pixel_mean on 0..1 values (sum < 3) needs input_format 'RGB', as in the original")
        if cfg.arch == "fpn":
            if len(cfg.resnet_layers) != 4:
                raise ValueError("FPN RPN needs four ResNet stages (res2..res5)")
            bottom_up: Union[ResNet, ClipResNetTrunk]
            if cfg.trunk == "clip":
                bottom_up = ClipResNetTrunk(cfg.resnet_layers, cfg.stem_out_channels)
            else:
                bottom_up = ResNet(cfg.resnet_layers, cfg.stem_out_channels, cfg.width_per_group,
                                   cfg.res2_out_channels)
            self.backbone: nn.Module = FPN(bottom_up, cfg.fpn_out_channels, norm=cfg.lsj)
            in_features = list(self.backbone.out_features)  # p2..p6
            strides = [self.backbone.strides[f] for f in in_features]
            in_channels = cfg.fpn_out_channels
            if len(cfg.anchor_sizes) != len(in_features):
                raise ValueError(f"FPN RPN needs one anchor size per level ({len(in_features)}), "
                                 f"got {cfg.anchor_sizes}")
            sizes: List[Tuple[float, ...]] = [(s,) for s in cfg.anchor_sizes]
        elif cfg.arch == "c4":
            if cfg.lsj:
                raise ValueError("the LSJ variant only exists for the FPN RPN")
            self.backbone = C4Backbone(tuple(cfg.resnet_layers[:3]), cfg.stem_out_channels,
                                       cfg.width_per_group, cfg.res2_out_channels)
            in_features, strides = ["res4"], [self.backbone.strides["res4"]]
            in_channels = self.backbone.out_channels["res4"]
            sizes = [tuple(cfg.anchor_sizes)]  # all sizes at the single level -> 15 anchors per location
        else:
            raise ValueError(f"unknown RPN arch {cfg.arch!r} (expected 'fpn' or 'c4')")
        self.proposal_generator = RPN(
            in_features, strides, in_channels, sizes, cfg.aspect_ratios, cfg.anchor_offset,
            num_convs=2 if cfg.lsj else 1, nms_thresh=cfg.nms_thresh, pre_nms_topk=cfg.pre_nms_topk,
            post_nms_topk=cfg.post_nms_topk, min_size=cfg.min_size)
        self.size_divisibility = int(cfg.size_divisibility)
        # Non-persistent: detectron2 checkpoints never carry pixel statistics for the offline branch.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        # Frozen like the original's offline modules: no parameter trains, and the module stays in eval mode
        # even when a parent detector is put in training mode (see `train`).
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "OfflineRPN":
        """Always eval: the original forces its offline RPN into eval mode on every forward (docs/DESIGN.md#offline-rpn)."""
        return super().train(False)

    def preprocess(self, images: Sequence[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """RGB 0..255 images -> normalized, zero-padded batch (the original's ``offline_preprocess_image``).

        Args:
            images: [3, Hi, Wi] RGB, 0..255 (uint8 or float).

        Returns:
            ([N, 3, Hp, Wp] float32 with Hp, Wp the max size rounded up to ``size_divisibility``,
            the unpadded (Hi, Wi) per image).
        """
        device = self.pixel_mean.device
        normed = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected a [3, H, W] image, got shape {tuple(img.shape)}")
            x = img.to(device=device, dtype=torch.float32)
            if self.cfg.input_format == "BGR":
                x = x[[2, 1, 0]]
            if self.div_pixel:
                x = x / 255.0  # the same ops as the original ((x / 255 - mean) / std), not a folded 255 * std
            # Normalize before padding: padding is 0 in the *normalized* space, as in detectron2's ImageList.
            normed.append((x - self.pixel_mean) / self.pixel_std)
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in normed]
        hp, wp = _padded_size(max(s[0] for s in sizes), max(s[1] for s in sizes), self.size_divisibility)
        batch = normed[0].new_zeros((len(normed), 3, hp, wp))
        for x, pad in zip(normed, batch):
            pad[:, : x.shape[-2], : x.shape[-1]].copy_(x)
        return batch, sizes

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor], batch_padding: bool = False) -> List[Proposals]:
        """Proposals for each image.

        Images with the same padded size are run as one batch; each image is therefore padded exactly as if
        it were alone (the original evaluates with one image per batch), so results do not depend on which
        other images share the call.

        Args:
            images: list of [3, H, W] RGB 0..255 resized images (the recognition branch's frame).
            batch_padding: run all images as one batch padded to the largest (rounded up to
                ``size_divisibility``), as the original's training step does (its ImageList pads the whole
                batch): a smaller image's proposals near its right/bottom edge then depend on its batch-mates.

        Returns:
            per image :class:`Proposals`: ``boxes`` [R, 4] float32 XYXY resized-image pixels, clipped to
            (H, W); ``objectness_logits`` [R] raw logits (no sigmoid), descending; R <= ``post_nms_topk``.
        """
        if len(images) == 0:
            return []
        groups: Dict[Tuple[int, int], List[int]] = {}
        if batch_padding:
            groups[(0, 0)] = list(range(len(images)))
        else:
            for i, img in enumerate(images):
                groups.setdefault(_padded_size(int(img.shape[-2]), int(img.shape[-1]), self.size_divisibility),
                                  []).append(i)
        out: List[Proposals] = [None] * len(images)  # type: ignore[list-item]
        for idx in groups.values():
            batch, sizes = self.preprocess([images[i] for i in idx])
            features = self.backbone(batch)
            for i, (boxes, logits) in zip(idx, self.proposal_generator(features, sizes)):
                out[i] = Proposals(boxes=boxes.float(), objectness_logits=logits)
        return out

    @torch.no_grad()
    def _fold_for_inference(self, *, channels_last: bool) -> "OfflineRPN":
        """The rewrite of :func:`regionclip.modeling.fusion.fused_for_inference`, in place on ``self`` (call it only
        on a copy nothing else holds; that function does): every frozen BatchNorm of the backbone folded into the
        conv before it and (``channels_last``) the conv weights stored NHWC. The same rewrite as the CLIP trunk's:
        exact in real arithmetic, float32 rounding differs by ~1e-6 relative, so only proposals whose logits tie
        within that can swap order (docs/DESIGN.md#numerics). The RPN head (no BN) is unchanged; the state-dict keys
        change (``*.norm.*`` disappear)."""
        for trunk in self.backbone.modules():
            if isinstance(trunk, ClipResNetTrunk):  # the recognition trunk's own rewrite (no attention pool)
                trunk._fold_for_inference(channels_last=channels_last, fold_attnpool_kv=False)
        for conv in self.backbone.modules():
            if isinstance(conv, Conv2dNorm) and isinstance(conv.norm, FrozenBatchNorm2d):
                folded = fold_frozen_bn(conv, conv.norm)
                conv.weight = nn.Parameter(folded.weight.detach(), requires_grad=False)
                conv.bias = nn.Parameter(folded.bias.detach(), requires_grad=False) if folded.bias is not None \
                    else None
                conv.norm = None
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.fused = True
        return self

    def padded_size(self, h: int, w: int) -> Tuple[int, int]:
        """Size (Hp, Wp) the backbone sees for an (h, w) image."""
        return _padded_size(h, w, self.size_divisibility)


def build_offline_rpn(cfg: RPNConfig) -> OfflineRPN:
    """Build an (uninitialised) :class:`OfflineRPN`; load weights with ``load_state_dict(strict=True)``."""
    return OfflineRPN(cfg)
