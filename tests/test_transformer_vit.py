"""ViT region encoder: cross-checks against open_clip and timm on the same random weights, RoI pooling by hand,
positional-embedding interpolation. Tiny towers (width 128, 2 layers, patch 16, 64-px images)."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regionclip.checkpoint.io import load_into
from regionclip.checkpoint.zeroshot_branch import split_openai_vit_state_dict, timm_vit_to_ours
from regionclip.factory.transformer import build_vit_trunk, load_transformer_detector
from regionclip.modeling.transformer.region_head import boxes_to_rois, pool_regions
from regionclip.modeling.transformer.vit import interpolate_grid_embedding


def _open_clip_model(seed: int = 0) -> nn.Module:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32, quick_gelu=True,
                                 vision_cfg=CLIPVisionCfg(layers=2, width=128, patch_size=16, image_size=64),
                                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
    with torch.no_grad():  # open_clip zero-initialises nothing we would miss, but make LN affine non-trivial
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_vit_tower_matches_open_clip() -> None:
    ref = _open_clip_model()
    trunk_sd, extras, text_sd, ignored, unexpected = split_openai_vit_state_dict(ref.state_dict())
    assert not unexpected
    trunk = build_vit_trunk(trunk_sd, layout="openai")
    assert load_into(trunk, trunk_sd).ok
    assert (trunk.width, len(trunk.transformer.resblocks), trunk.patch_size, trunk.grid_size) == (128, 2, 16, (4, 4))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = trunk.encode_image_tokens(x) @ extras["backbone.image_projection"]
        theirs = ref.encode_image(x)
        dense = trunk.forward_dense(x)
        ref_dense = ref.visual.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert dense.shape == (2, 128, 4, 4)
    torch.testing.assert_close(dense, ref_dense, atol=1e-5, rtol=1e-4)  # region map = last block, ln_post later


def test_openai_text_tower_matches_open_clip(tmp_path) -> None:
    ref = _open_clip_model(seed=1)
    torch.save(ref.state_dict(), tmp_path / "clip_vit.pth")
    det, report = load_transformer_detector(tmp_path / "clip_vit.pth", use_rpn=False)
    assert report.ok
    assert math.isclose(det.logit_scale.item(), ref.logit_scale.item(), rel_tol=1e-6)
    from regionclip.factory import load_text_tower
    from regionclip.text.tokenizer import tokenize
    from regionclip.text.unicl_embeddings import zeroshot_class_embeddings

    text = load_text_tower(tmp_path / "clip_vit.pth")  # the factory builds the text tower of either family
    tokens = tokenize(["a photo of a cat.", "dog"])
    with torch.no_grad():
        torch.testing.assert_close(text.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=1e-4)
        emb = zeroshot_class_embeddings(text, ["cat"])
        prompts = ref.encode_text(tokenize(["cat.", "a photo of a cat."]))
    mean = F.normalize(prompts, dim=-1).mean(0)
    torch.testing.assert_close(emb[0], mean / mean.norm(), atol=1e-5, rtol=1e-4)


def test_branch_vit_matches_timm_global_pool() -> None:
    """The branch's ViT-B/16 is timm's VisionTransformer with global pooling: fc_norm on every patch token."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, qkv_bias=True, num_classes=0,
        global_pool="avg", norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        ref.fc_norm.weight.add_(0.1 * torch.randn(128))
    ours_sd, unknown = timm_vit_to_ours(ref.state_dict())
    assert not unknown
    trunk = build_vit_trunk(ours_sd, layout="branch", heads=2)
    assert load_into(trunk, ours_sd).ok
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, ref.num_prefix_tokens:]
        expected = ref.fc_norm(tokens).transpose(1, 2).reshape(2, 128, 4, 4)
        torch.testing.assert_close(trunk.forward_dense(x), expected, atol=1e-5, rtol=1e-4)
        # an input that is not a multiple of 16 is cropped bottom/right, as the branch does
        torch.testing.assert_close(trunk.forward_dense(F.pad(x, (0, 9, 0, 5))), expected, atol=1e-5, rtol=1e-4)


def test_positional_embedding_interpolation() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1 + 4 * 4, 8)
    assert interpolate_grid_embedding(pos, (4, 4), (4, 4)) is pos
    out = interpolate_grid_embedding(pos, (4, 4), (6, 3))
    assert out.shape == (1 + 18, 8)
    torch.testing.assert_close(out[0], pos[0])  # class token untouched
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[1:], expected.permute(0, 2, 3, 1).reshape(18, 8))


def _bilinear(fm: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """detectron2/torchvision RoIAlign bilinear sample of fm [C, H, W] at (y, x) (no out-of-range cases here)."""
    h, w = fm.shape[-2:]
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(math.floor(y)), h - 1), min(int(math.floor(x)), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    if y0 == h - 1:
        y = float(y0)
    if x0 == w - 1:
        x = float(x0)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fm[:, y0, x0] + (1 - ly) * lx * fm[:, y0, x1]
            + ly * (1 - lx) * fm[:, y1, x0] + ly * lx * fm[:, y1, x1])


def test_roi_pooling_matches_hand_computation() -> None:
    """RoIAlignV2 (half-pixel shift), 14x14 bins, 2x2 samples per bin, mean over bins - computed by hand."""
    torch.manual_seed(0)
    fm = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    box = (20.0, 18.0, 90.0, 70.0)  # input pixels, stride 16
    out = pool_regions(fm, boxes_to_rois([torch.tensor([box])], fm), stride=16, output_size=14, sampling_ratio=2)
    x1, y1, x2, y2 = (v / 16 - 0.5 for v in box)
    bw, bh = (x2 - x1) / 14, (y2 - y1) / 14
    acc = torch.zeros(3, dtype=torch.float64)
    for i in range(14):
        for j in range(14):
            for si in range(2):
                for sj in range(2):
                    acc += _bilinear(fm[0], y1 + (i + (si + 0.5) / 2) * bh, x1 + (j + (sj + 0.5) / 2) * bw)
    torch.testing.assert_close(out[0], acc / (14 * 14 * 4))


def test_roi_mean_of_linear_map_is_value_at_box_centre() -> None:
    """On a linear map bilinear sampling is exact and the bins are symmetric, so the mean is the centre value."""
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    fm = (0.3 * xs - 0.7 * ys + 2.0)[None, None].double()
    boxes = torch.tensor([[16.0, 16.0, 80.0, 64.0], [24.0, 30.0, 100.0, 70.0]])
    out = pool_regions(fm, boxes_to_rois([boxes], fm), stride=16)  # adaptive sampling ratio
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 32 - 0.5, (boxes[:, 1] + boxes[:, 3]) / 32 - 0.5
    torch.testing.assert_close(out[:, 0], (0.3 * cx - 0.7 * cy + 2.0).double())


def test_open_clip_file_end_to_end_through_the_api(tmp_path) -> None:
    """An open_clip / OpenAI-layout ViT file -> RegionCLIP.from_pretrained -> names -> classify boxes on a demo image."""
    from regionclip.api import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.config import InputConfig

    torch.save(_open_clip_model(seed=2).state_dict(), tmp_path / "vit.pth")
    model = RegionCLIP.from_pretrained(tmp_path / "vit.pth")
    model.pipeline.input_cfg = InputConfig(min_size=96, max_size=160)
    model.set_vocabulary(["cat", "dog", "remote"])
    boxes = [[0, 0, 900, 700], [800, 300, 1900, 1000]]
    det = model.detect([str(demo_image_paths()[0])], [boxes], keep_probs=True)[0]
    assert det.probs.shape == (len(det.scores), 3)
    torch.testing.assert_close(det.probs.sum(1), torch.ones(len(det.probs)))
    assert model.detector.backbone.stride == 16 and model.detector.backbone.trunk.region_norm is not None
