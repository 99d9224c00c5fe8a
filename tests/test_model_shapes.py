"""Architecture facts: RN50 / RN50x4 key names and shapes, detection from shapes, attnpool, FrozenBN."""
import json

import pytest
import torch
import torch.nn.functional as F

from regionclip.checkpoint.regionclip import infer_clip_resnet_config
from regionclip.config import ClipResNetConfig
from regionclip.modeling.clip_resnet import AttentionPool2d, ModifiedResNet
from regionclip.modeling.layers import FrozenBatchNorm2d


def _official_backbone_shapes(shared_dir, variant):
    doc = json.loads((shared_dir / "parity" / f"official_{variant}_keys.json").read_text())
    return {k[len("backbone."):]: tuple(v["shape"]) for k, v in doc["regionclip_ckpt_keys"].items()
            if k.startswith("backbone.")}


@pytest.mark.parametrize("variant,cfg", [("rn50", ClipResNetConfig.rn50()), ("rn50x4", ClipResNetConfig.rn50x4())])
def test_backbone_keys_match_released_layout(shared_dir, variant, cfg):
    official = _official_backbone_shapes(shared_dir, variant)
    with torch.device("meta"):
        model = ModifiedResNet(cfg.layers, cfg.embed_dim, cfg.heads, cfg.image_resolution, cfg.width)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    # architecture inference from shapes alone (what load_detector does with a real file)
    sd = {"backbone." + k: torch.empty(s, device="meta") for k, s in official.items()}
    assert infer_clip_resnet_config(sd) == cfg


def test_rn50x4_facts():
    cfg = ClipResNetConfig.rn50x4()
    assert (cfg.pooler_resolution, cfg.embed_dim, cfg.res4_channels, cfg.res5_channels) == (18, 640, 1280, 2560)
    assert ClipResNetConfig.rn50().pooler_resolution == 14


def test_tiny_resnet_region_path_shapes():
    m = ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 8).eval()
    x = torch.randn(2, 3, 70, 90)
    res4 = m.forward_res4(x)
    assert res4.shape == (2, 128, 70 // 2 // 2 // 2 // 2, 90 // 2 // 2 // 2 // 2)  # floor divisions
    roi = torch.randn(5, 128, 4, 4)  # pooler = 2 x attnpool grid (64 // 32 = 2)
    assert m.forward_res5_pooled(roi).shape == (5, 16)
    with pytest.raises(ValueError, match="pooler resolution"):
        m.forward_res5_pooled(torch.randn(1, 128, 6, 6))


def test_attnpool_first_query_equals_full_attention():
    torch.manual_seed(0)
    pool = AttentionPool2d(3, 32, 4, 8).eval()
    x = torch.randn(2, 32, 3, 3)
    ours = pool(x)
    # reference: CLIP's original formulation, all HW+1 queries through F.multi_head_attention_forward, token 0
    t = x.flatten(2).permute(2, 0, 1)
    t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0) + pool.positional_embedding[:, None, :]
    ref, _ = F.multi_head_attention_forward(
        query=t, key=t, value=t, embed_dim_to_check=32, num_heads=4, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    torch.testing.assert_close(ours, ref[0], rtol=1e-5, atol=1e-6)


def test_frozen_bn_formula_and_grad_path():
    bn = FrozenBatchNorm2d(3)
    bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    bn.running_mean.copy_(torch.tensor([0.5, 0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    x = torch.randn(1, 3, 2, 2)
    expect = (x - bn.running_mean.view(1, 3, 1, 1)) / (bn.running_var.view(1, 3, 1, 1) + 1e-5).sqrt() \
        * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(bn(x), expect)
    xg = x.clone().requires_grad_(True)  # the affine branch used when gradients flow
    torch.testing.assert_close(bn(xg), expect)
    assert list(dict(bn.named_parameters())) == []  # nothing trainable
