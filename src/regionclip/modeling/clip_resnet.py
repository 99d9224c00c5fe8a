"""CLIP ModifiedResNet (RN50 / RN50x4) with frozen BatchNorm, split C4-style for region encoding.

State-dict keys equal the released RegionCLIP ``backbone.*`` keys without the prefix (which are also OpenAI
CLIP's ``visual.*`` keys without ``visual.``). Spec §1.1-1.3.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FrozenBatchNorm2d, fold_frozen_bn


class Bottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: every conv has stride 1; striding is an AvgPool after conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # named "-1", "0", "1" exactly as OpenAI's OrderedDict so keys are downsample.0.* / downsample.1.*
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("1", FrozenBatchNorm2d(planes * self.expansion))

        self.fused = False  # True in an inference copy (fused_for_inference): BNs folded into the convs

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            # BN already folded into the conv biases; the in-place ReLUs / add reuse the conv outputs'
            # memory (no autograd on this path: the fused model refuses train mode)
            out = F.relu_(self.conv1(x))
            out = F.relu_(self.conv2(out))
            out = self.conv3(self.avgpool(out))
            identity = x if self.downsample is None else self.downsample(x)
            return F.relu_(out.add_(identity))
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP attention pooling: mean token + learned positional embedding, one MHA query at the mean token.

    There is no positional-embedding interpolation: the input grid must be ``spacial_dim x spacial_dim``
    (7 for RN50, 9 for RN50x4), which is why RegionCLIP pools RoIs to 14 / 18 (res5 halves them).
    Only the first token's output is ever used, so only its query is computed (identical result, ~50x less
    attention work than running all HW+1 queries).
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads
        self.spacial_dim = spacial_dim
        self.fold_kv = False  # True in an inference copy (fused_for_inference): see _forward_folded

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] with H = W = spacial_dim -> [N, output_dim] (not normalized)."""
        n, c, h, w = x.shape
        if h * w + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"attention pool expects a {self.spacial_dim}x{self.spacial_dim} map, got {h}x{w}; "
                             "the RoI pooler resolution must be 2x the attnpool grid (14 for RN50, 18 for RN50x4)")
        tokens = x.flatten(2).permute(0, 2, 1)  # [N, HW, C] (a free view when x is channels_last)
        if self.fold_kv:
            # the mean over the map's own spatial axes, not over the token view: OpenVINO 2026.4's CPU plugin
            # computes a ReduceMean over the transposed token axis feeding a linear layer wrongly (errors of
            # order 1 in the exported graph, found by tests/test_export.py); both are the same mean in torch
            return self._forward_folded(tokens, x.mean(dim=(2, 3)))
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [N, HW+1, C]
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        head_dim = c // self.num_heads
        q = self.q_proj(tokens[:, :1]).view(n, 1, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(tokens).view(n, -1, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(tokens).view(n, -1, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, head_dim]
        return self.c_proj(out.transpose(1, 2).reshape(n, c))

    def _forward_folded(self, pixels: Tensor, pixel_mean: Tensor) -> Tensor:
        """The same first-query attention with the K and V projections folded into the query side.

        With one query per head, ``score_j = q_h . (Wk_h t_j + bk_h) = (Wk_h^T q_h) . t_j + q_h . bk_h``; the last
        term is the same for every token j and cancels in the softmax. Since the weights sum to 1,
        ``sum_j a_j (Wv_h t_j + bv_h) = Wv_h (sum_j a_j t_j) + bv_h``. So instead of projecting all HW+1 tokens
        (2 (HW+1) C^2 multiply-adds per region: ~0.84 GFLOP for RN50, ~2.1 for RN50x4) we project one query
        and one mixed token per head (2 C^2) plus two [heads x (HW+1) x C] products.

        The tokens ``t_0 = mean_j x_j + pe_0``, ``t_j = x_j + pe_j`` are never materialised (a concatenation and
        an add over [N, HW+1, C]: memory-bound passes that cost ~3 % of the region head): with ``u = Wk_h^T q_h``,
        ``u . t_j = u . x_j + u . pe_j`` and ``u . t_0 = mean_j (u . x_j) + u . pe_0``; and the mixed token is
        ``sum_j a_j t_j = sum_{j>=1} (a_j + a_0 / HW) x_j + sum_j a_j pe_j``.
        Exact in real arithmetic; in floating point only the summation order differs.

        pixels: [N, HW, C] (the map's pixels, no mean token, no positional embedding), pixel_mean: [N, C] their
        mean -> [N, output_dim].
        """
        n, hw, c = pixels.shape
        heads = self.num_heads
        d = c // heads
        pe = self.positional_embedding.to(pixels.dtype)  # [HW+1, C]
        q = self.q_proj(pixel_mean + pe[0]) * d ** -0.5  # [N, C], SDPA's default scale
        wk = self.k_proj.weight.view(heads, d, c)  # rows of head h: its d output features
        qk = torch.bmm(q.view(n, heads, d).transpose(0, 1), wk.to(q.dtype)).transpose(0, 1)  # [N, H, C]: u per head
        px_scores = torch.bmm(qk, pixels.transpose(1, 2))  # [N, H, HW]
        # [N, H, HW+1] (small): pixel part (the mean token's is the mean) + positional part of every token's score
        scores = torch.cat([px_scores.mean(dim=-1, keepdim=True), px_scores], dim=-1) + torch.matmul(qk, pe.t())
        # softmax in float32 also under bf16 autocast (N*H*L values: negligible cost)
        attn = torch.softmax(scores, dim=-1, dtype=torch.float32).to(pixels.dtype)
        px_weights = attn[:, :, 1:] + attn[:, :, :1] / hw  # [N, H, HW]
        mixed = torch.baddbmm(torch.matmul(attn, pe), px_weights, pixels)  # [N, H, C]: per-head mixed token
        wv_t = self.v_proj.weight.view(heads, d, c).transpose(1, 2)  # [H, C, d]
        out = torch.bmm(mixed.transpose(0, 1), wv_t.to(mixed.dtype))  # [H, N, d]
        out = out.transpose(0, 1).reshape(n, c) + self.v_proj.bias.to(out.dtype)
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """CLIP ResNet. ``forward_res4`` runs stem..layer3 (the shared per-image map, stride 16);
    ``layer4`` + ``attnpool`` are applied per region by :class:`regionclip.modeling.detector.RegionCLIPDetector`.
    """

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = FrozenBatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)
        self.fused = False
        self.channels_last = False  # set in an inference copy (fused_for_inference)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    @property
    def res4_channels(self) -> int:
        """Channels of the layer3 (res4) map, e.g. 1024 for RN50: what the region head pools."""
        return self._bottlenecks_of(self.layer3)[-1].conv3.out_channels

    @property
    def res5_channels(self) -> int:
        """Channels of the layer4 (res5) map, e.g. 2048 for RN50: the mask head's input."""
        return self._bottlenecks_of(self.layer4)[-1].conv3.out_channels

    def _bottlenecks(self) -> list[Bottleneck]:
        """The blocks of layer1..layer4 in order."""
        return [blk for layer in (self.layer1, self.layer2, self.layer3, self.layer4)
                for blk in self._bottlenecks_of(layer)]

    @staticmethod
    def _bottlenecks_of(layer: nn.Sequential) -> list[Bottleneck]:
        """The blocks of one stage (``nn.Sequential`` iterates as plain ``nn.Module``, hence the check)."""
        blocks: list[Bottleneck] = []
        for blk in layer:
            if not isinstance(blk, Bottleneck):
                raise TypeError(f"ModifiedResNet stages must hold Bottleneck blocks, found {type(blk).__name__}")
            blocks.append(blk)
        return blocks

    def stem(self, x: Tensor) -> Tensor:
        if self.fused:
            x = F.relu_(self.conv1(x))  # BNs folded into conv1..3 (fused_for_inference)
            x = F.relu_(self.conv2(x))
            return self.avgpool(F.relu_(self.conv3(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_res4(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] CLIP-normalized -> res4 [B, 16*width, floor-divided H/16, W/16]."""
        x = x.to(self.conv1.weight.dtype)
        res4 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        # a channels_last (fused) trunk returns NHWC; torchvision's CPU roi_align makes its input contiguous on
        # every call, so convert once per image here rather than once per region chunk (no-op when NCHW)
        return res4.contiguous()

    def forward_res5(self, x: Tensor) -> Tensor:
        """RoI features [N, 16*width, P, P] -> res5 maps [N, 32*width, P/2, P/2] (layer4).

        A channels_last (fused) model converts its input once here: RoIAlign returns NCHW, and left as is, the first
        block's downsample branch would average-pool the NCHW map and convert the pooled map again (~2 % of the
        region head, measured)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layer4(x)

    def forward_res5_pooled(self, x: Tensor) -> Tensor:
        """RoI features [N, 16*width, P, P] -> region embeddings [N, output_dim] (layer4 + attnpool)."""
        return self.attnpool(self.forward_res5(x))

    def encode_image(self, x: Tensor) -> Tensor:
        """Whole-image CLIP embedding (the OpenAI ``encode_image`` of the visual tower), for cross-checks."""
        return self.forward_res5_pooled(self.forward_res4(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.encode_image(x)

    def train(self, mode: bool = True) -> "ModifiedResNet":
        if mode and self.fused:
            raise RuntimeError("this ModifiedResNet was fused for inference (an inference copy made by "
                               "fused_for_inference): its BatchNorms are folded into the convs, so it cannot be "
                               "trained; train the model it was copied from")
        return super().train(mode)

    @torch.no_grad()
    def _fold_for_inference(self, *, channels_last: bool, fold_attnpool_kv: bool) -> "ModifiedResNet":
        """The rewrites of :func:`regionclip.modeling.fusion.fused_for_inference`, in place on ``self``: call it only
        on a copy that nothing else holds (that function does). Idempotent: folding a folded model only changes
        the layout / attention-pool options."""
        self.eval()
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        owners: list[nn.Module] = [self, *self._bottlenecks()]
        for owner, conv_name, bn_name in [(o, c, b) for o in owners for c, b in pairs]:
            bn = getattr(owner, bn_name)
            if isinstance(bn, FrozenBatchNorm2d):
                setattr(owner, conv_name, fold_frozen_bn(getattr(owner, conv_name), bn))
                setattr(owner, bn_name, nn.Identity())
        for blk in self._bottlenecks():
            ds = blk.downsample  # children named "-1" (pool), "0" (conv), "1" (BN) as in OpenAI's checkpoint
            if ds is not None and isinstance(getattr(ds, "1"), FrozenBatchNorm2d):
                setattr(ds, "0", fold_frozen_bn(getattr(ds, "0"), getattr(ds, "1")))
                setattr(ds, "1", nn.Identity())
            blk.fused = True
        self.fused = True
        if isinstance(self.attnpool, AttentionPool2d):  # the RPN's CLIP trunk has none
            self.attnpool.fold_kv = fold_attnpool_kv
        self.use_channels_last(channels_last)
        self.requires_grad_(False)
        return self

    def use_channels_last(self, enabled: bool) -> "ModifiedResNet":
        """Switch a fused model between NHWC (conv weights channels_last, region inputs converted once: what CPU
        oneDNN runs fastest) and plain NCHW (what graph export wants: the runtimes choose their own layouts).
        Layout only: results differ by rounding at most."""
        if not self.fused:
            raise RuntimeError("use_channels_last applies to a fused model (fused_for_inference)")
        self.channels_last = enabled
        # 4-D conv weights only; the attnpool's are 1-D/2-D
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def freeze(self, freeze_at: int = 2) -> None:
        """detectron2 FREEZE_AT semantics: 1 = stem, 2 = stem + res2 (layer1), ..."""
        stages: list[list[nn.Module]] = [[self.conv1, self.conv2, self.conv3], [self.layer1], [self.layer2],
                                         [self.layer3]]
        for group in stages[:freeze_at]:
            for m in group:
                for p in m.parameters():
                    p.requires_grad_(False)

