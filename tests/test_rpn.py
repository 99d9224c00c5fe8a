"""Offline detectron2 RPN: anchors, proposal selection, variants (FPN / LSJ / C4), keys, config inference.

Tiny widths and images only (the CI machine has 2 cores); full-size parity is in tests/parity/.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import Tensor

from regionclip.config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, RPNConfig
from regionclip.modeling.fusion import fused_for_inference
from regionclip.checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from regionclip.modeling.rpn import (
    FrozenBatchNorm2d, OfflineRPN, build_offline_rpn, find_top_rpn_proposals, generate_cell_anchors,
    grid_anchors,
)
from regionclip.ops.box_coder import decode_boxes

TINY = dict(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
            fpn_out_channels=8)


def _randomize(model: torch.nn.Module, seed: int = 0) -> Dict[str, Tensor]:
    """Random weights with sane activation scales (like shared/parity/make_random_ckpt.py)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k, v in sd.items():
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith(".weight") and v.dim() == 4:
            # stem sees 0..255 pixels (std 1), so scale it down; the RPN head uses detectron2's N(0, 0.01)
            std = 0.01 if "rpn_head" in k else 1 / math.sqrt(v[0].numel()) / (57.4 if "stem" in k else 1.0)
            v.copy_(torch.randn(v.shape, generator=g) * std)
        else:
            is_bn_weight = k.endswith(("norm.weight", "downsample.1.weight")) or re.search(r"\.bn\d\.weight$", k)
            v.copy_(torch.randn(v.shape, generator=g) * 0.1 + (1.0 if is_bn_weight else 0.0))
    return {k: v.clone() for k, v in sd.items()}


def _tiny(cfg: RPNConfig, seed: int = 0) -> OfflineRPN:
    model = build_offline_rpn(cfg)
    _randomize(model, seed)
    return model


def _images(seed: int, *sizes: tuple) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in sizes]


# ----------------------------------------------------------------------------------------------- anchors

def test_cell_anchors_by_hand() -> None:
    cells = generate_cell_anchors((8, 16), (0.5, 1.0, 2.0))
    r = math.sqrt(2.0)
    # size-major, ratio-minor; w = sqrt(s^2 / r), h = r * w
    expected = []
    for s in (8, 16):
        for w, h in ((s * r, s / r), (s, s), (s / r, s * r)):
            expected.append([-w / 2, -h / 2, w / 2, h / 2])
    assert cells.dtype == torch.float32
    torch.testing.assert_close(cells, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)


def test_grid_anchors_2x2_order_and_offset() -> None:
    cells = generate_cell_anchors((8,), (0.5, 1.0, 2.0))
    anchors = grid_anchors(cells, (2, 2), stride=4, offset=0.0)
    assert anchors.shape == (2 * 2 * 3, 4)
    # location-major in row-major order (y then x), anchor-minor; offset 0 -> centres on cell corners
    centres = [(0, 0), (4, 0), (0, 4), (4, 4)]  # (x, y)
    for loc, (cx, cy) in enumerate(centres):
        for a in range(3):
            torch.testing.assert_close(anchors[loc * 3 + a], cells[a] + torch.tensor([cx, cy, cx, cy], dtype=torch.float32))
    half = grid_anchors(cells, (2, 2), stride=4, offset=0.5)
    torch.testing.assert_close(half - anchors, torch.full_like(anchors, 2.0))


# ----------------------------------------------------------------------------------- proposal selection

def test_find_top_rpn_proposals_per_level_topk_nms_clip() -> None:
    inf = float("inf")
    # level 0: A and B overlap (IoU > 0.5), C is isolated but ranked 3rd -> removed by pre-NMS top-2;
    # D lies outside the image (empty after clipping), E is non-finite.
    lvl0 = torch.tensor([[[0.0, 0.0, 10.0, 10.0],  # A logit 5
                          [0.0, 0.0, 10.0, 11.0],  # B logit 4 (suppressed by A)
                          [50.0, 50.0, 60.0, 60.0],  # C logit -1 (beyond top-2)
                          [200.0, 0.0, 210.0, 10.0],  # D logit -2
                          ]])
    logits0 = torch.tensor([[5.0, 4.0, -1.0, -2.0]])
    # level 1: F equals A but sits on another level -> survives (NMS is per level); G crosses the border.
    lvl1 = torch.tensor([[[0.0, 0.0, 10.0, 10.0],  # F logit 3
                          [90.0, -5.0, 130.0, 20.0],  # G logit 4.5 -> clipped to (90, 0, 100, 20)
                          [inf, 0.0, 1.0, 1.0],  # E logit 9 (non-finite box: dropped)
                          ]])
    logits1 = torch.tensor([[3.0, 4.5, 9.0]])
    (boxes, scores), = find_top_rpn_proposals([lvl0, lvl1], [logits0, logits1], [(50, 100)], nms_thresh=0.5,
                                              pre_nms_topk=3, post_nms_topk=10)
    torch.testing.assert_close(scores, torch.tensor([5.0, 4.5, 3.0]))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 10.0], [90.0, 0.0, 100.0, 20.0],
                                                    [0.0, 0.0, 10.0, 10.0]]))
    # pre-NMS top-k is per level: with top-2, level 0 keeps A, B; B is suppressed; C never enters.
    (boxes2, scores2), = find_top_rpn_proposals([lvl0, lvl1], [logits0, logits1], [(50, 100)], 0.5, 2, 10)
    torch.testing.assert_close(scores2, torch.tensor([5.0, 4.5]))  # level 1 top-2 = E (dropped), G
    # with top-3, C (inside the image, no overlap) enters level 0; D is empty after clipping, dropped.
    (_, scores3), = find_top_rpn_proposals([lvl0, lvl1], [logits0, logits1], [(100, 100)], 0.5, 3, 10)
    torch.testing.assert_close(scores3, torch.tensor([5.0, 4.5, 3.0, -1.0]))
    # post-NMS top-k keeps the best overall
    (_, scores4), = find_top_rpn_proposals([lvl0, lvl1], [logits0, logits1], [(50, 100)], 0.5, 3, 2)
    torch.testing.assert_close(scores4, torch.tensor([5.0, 4.5]))


def test_find_top_rpn_proposals_min_size() -> None:
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 2.0], [20.0, 20.0, 30.0, 30.0]]])
    logits = torch.tensor([[2.0, 1.0]])
    (_, s0), = find_top_rpn_proposals([boxes], [logits], [(64, 64)], 0.7, 10, 10, min_size=0.0)
    (_, s2), = find_top_rpn_proposals([boxes], [logits], [(64, 64)], 0.7, 10, 10, min_size=2.0)
    torch.testing.assert_close(s0, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(s2, torch.tensor([1.0]))  # height 2 is not > 2


# ------------------------------------------------------------------------------------- tiny end-to-end

def test_head_channel_to_anchor_alignment() -> None:
    """Objectness channel a and delta channels [4a, 4a+4) must belong to cell anchor a (spec §3.6)."""
    cfg = RPNConfig.fpn(**TINY, nms_thresh=1.0, pre_nms_topk=10_000, post_nms_topk=10_000)
    model = _tiny(cfg)
    head = model.proposal_generator.rpn_head
    with torch.no_grad():
        head.objectness_logits.weight.zero_()
        head.objectness_logits.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))  # logit = anchor index
        head.anchor_deltas.weight.zero_()
        # anchor a: dx = 0.1 a, dw = 0.2 a
        head.anchor_deltas.bias.copy_(torch.tensor([0.1 * a if c == 0 else (0.2 * a if c == 2 else 0.0)
                                                    for a in range(3) for c in range(4)]))
    h, w = 64, 96
    props = model(_images(0, (h, w)))[0]
    expected = []
    for lvl, feat_stride in enumerate(model.proposal_generator.strides):
        gh, gw = math.ceil(h / feat_stride), math.ceil(w / feat_stride)
        cells = model.proposal_generator.cell_anchors[lvl]
        anchors = grid_anchors(cells, (gh, gw), feat_stride).view(-1, 3, 4)
        for a in range(3):
            d = torch.tensor([[0.1 * a, 0.0, 0.2 * a, 0.0]]).expand(anchors.shape[0], 4)
            b = decode_boxes(d, anchors[:, a])
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
            keep = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
            expected.append((a, b[keep]))
    for a, boxes_a in expected:
        ours = props.boxes[props.objectness_logits == a]
        got = {tuple(r) for r in ours.tolist()}
        assert {tuple(r) for r in boxes_a.tolist()} <= got
    assert len(props.boxes) == sum(len(b) for _, b in expected)  # nothing else; IoU>1 never suppresses
    assert set(props.objectness_logits.unique().tolist()) == {0.0, 1.0, 2.0}  # raw logits, no sigmoid


def test_fpn_forward_batched_equals_single_and_outputs_valid() -> None:
    cfg = RPNConfig.fpn(**TINY, nms_thresh=0.7, pre_nms_topk=50, post_nms_topk=30)
    model = _tiny(cfg)
    # 60x64 and 64x50 both pad to 64x64 (one batch); 40x90 pads to 64x96 (its own batch)
    imgs = _images(1, (60, 64), (40, 90), (64, 50))
    batched = model(imgs)
    assert len(batched) == 3
    for img, p in zip(imgs, batched):
        single = model([img])[0]
        # Same padding as alone -> same result; only float rounding of a batched vs single conv may differ
        # (bit-equal at full size, see tests/parity/test_rpn_parity.py).
        torch.testing.assert_close(single.boxes, p.boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(single.objectness_logits, p.objectness_logits, rtol=1e-5, atol=1e-5)
        h, w = img.shape[-2:]
        assert p.boxes.dtype == torch.float32 and p.boxes.shape[1] == 4
        assert 0 < len(p.boxes) <= 30
        assert (p.boxes[:, 0] >= 0).all() and (p.boxes[:, 2] <= w).all() and (p.boxes[:, 3] <= h).all()
        assert ((p.boxes[:, 2] > p.boxes[:, 0]) & (p.boxes[:, 3] > p.boxes[:, 1])).all()
        assert (p.objectness_logits[:-1] >= p.objectness_logits[1:]).all()


def test_preprocess_bgr_mean_and_zero_padding() -> None:
    model = _tiny(RPNConfig.fpn(**TINY))
    img = torch.zeros(3, 5, 7)
    img[0], img[1], img[2] = 10.0, 20.0, 30.0  # R, G, B
    batch, sizes = model.preprocess([img])
    assert batch.shape == (1, 3, 32, 32) and sizes == [(5, 7)]
    mean = RPNConfig().pixel_mean  # BGR
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([30 - mean[0], 20 - mean[1], 10 - mean[2]]))
    assert batch[0, :, 5:].abs().sum() == 0 and batch[0, :, :, 7:].abs().sum() == 0
    rgb = _tiny(RPNConfig.fpn(**TINY, input_format="RGB", size_divisibility=0))
    batch, _ = rgb.preprocess([img])
    assert batch.shape == (1, 3, 5, 7)
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([10 - mean[0], 20 - mean[1], 30 - mean[2]]))


def test_frozen_bn_formula_and_num_batches_tracked() -> None:
    bn = FrozenBatchNorm2d(3)
    sd = {"weight": torch.tensor([1.0, 2.0, 0.5]), "bias": torch.tensor([0.0, 1.0, -1.0]),
          "running_mean": torch.tensor([0.5, -1.0, 2.0]), "running_var": torch.tensor([1.0, 4.0, 0.25]),
          "num_batches_tracked": torch.tensor(7)}
    bn.load_state_dict(sd, strict=True)  # SyncBN checkpoints carry num_batches_tracked: accepted, dropped
    assert "num_batches_tracked" not in bn.state_dict()
    x = torch.randn(2, 3, 4, 4)
    expected = ((x - sd["running_mean"].view(1, 3, 1, 1)) / torch.sqrt(sd["running_var"].view(1, 3, 1, 1) + 1e-5)
                * sd["weight"].view(1, 3, 1, 1) + sd["bias"].view(1, 3, 1, 1))
    torch.testing.assert_close(bn(x), expected)


# ------------------------------------------------------------------------------------ keys and variants

def test_fpn_r50_keys_match_official_rpn_checkpoint(shared_dir: Path) -> None:
    spec = json.loads((shared_dir / "parity" / "official_rn50_keys.json").read_text())
    official = {k: tuple(v["shape"]) for k, v in spec["rpn_ckpt_keys_used"].items()}
    in_model = {v["ckpt_key"]: tuple(v["shape"]) for v in spec["model_state_dict"].values()
                if v.get("source") == "rpn_ckpt"}
    assert official == in_model
    ours = {k: tuple(v.shape) for k, v in build_offline_rpn(RPNConfig.fpn()).state_dict().items()}
    assert ours == official


def test_fpn_state_dict_round_trip_and_infer() -> None:
    model = _tiny(RPNConfig.fpn(**TINY))
    model.train()  # frozen: stays in eval mode, nothing trainable
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    sd = model.state_dict()
    assert "backbone.bottom_up.stem.conv1.norm.running_var" in sd
    assert "backbone.fpn_lateral2.bias" in sd and "proposal_generator.rpn_head.conv.bias" in sd
    assert not any("cell_anchors" in k or "pixel_mean" in k for k in sd)
    cfg = infer_rpn_config(sd, nms_thresh=0.9, post_nms_topk=123)
    assert cfg == RPNConfig.fpn(**TINY, nms_thresh=0.9, post_nms_topk=123)
    build_offline_rpn(cfg).load_state_dict(sd, strict=True)


def test_lsj_variant_keys_forward_and_infer() -> None:
    cfg = RPNConfig.fpn(**TINY, lsj=True, post_nms_topk=20)
    model = _tiny(cfg)
    sd = model.state_dict()
    head = "proposal_generator.rpn_head."
    assert head + "conv.conv0.weight" in sd and head + "conv.conv1.bias" in sd and head + "conv.weight" not in sd
    assert "backbone.fpn_lateral3.norm.running_mean" in sd and "backbone.fpn_output5.norm.weight" in sd
    assert "backbone.fpn_lateral2.bias" not in sd and "backbone.fpn_output2.bias" not in sd
    # a SyncBN checkpoint: every norm carries num_batches_tracked, plus roi_heads.* to be dropped
    ckpt = dict(sd)
    for k in [k for k in sd if k.endswith("running_mean")]:
        ckpt[k.replace("running_mean", "num_batches_tracked")] = torch.tensor(90000)
    ckpt["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(2, 2)
    filtered, ignored = rpn_state_dict_from_checkpoint({"model": ckpt})
    assert set(filtered) == set(sd)
    assert "roi_heads.box_predictor.cls_score.weight" in ignored
    assert sum(k.endswith("num_batches_tracked") for k in ignored) == sum(k.endswith("running_mean") for k in sd)
    inferred = infer_rpn_config(ckpt, post_nms_topk=20)
    assert inferred == cfg
    fresh = build_offline_rpn(inferred)
    fresh.load_state_dict(ckpt_without_roi(ckpt), strict=True)  # num_batches_tracked tolerated as well
    props = fresh(_images(2, (64, 64)))
    ref = model(_images(2, (64, 64)))
    assert torch.equal(props[0].boxes, ref[0].boxes) and 0 < len(props[0].boxes) <= 20


def ckpt_without_roi(ckpt: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v for k, v in ckpt.items() if not k.startswith("roi_heads.")}


def test_c4_variant_keys_forward_and_infer() -> None:
    cfg = RPNConfig.c4(**{**{k: v for k, v in TINY.items() if k != "fpn_out_channels"},
                          "resnet_layers": (1, 2, 1)}, pre_nms_topk=100, post_nms_topk=25)
    model = _tiny(cfg)
    sd = model.state_dict()
    assert "backbone.stem.conv1.weight" in sd and "backbone.res4.0.shortcut.norm.bias" in sd
    assert "backbone.res3.1.conv3.weight" in sd
    assert not any(k.startswith(("backbone.res5", "backbone.bottom_up", "backbone.fpn")) for k in sd)
    res4_ch = 16 * 4
    assert sd["proposal_generator.rpn_head.conv.weight"].shape == (res4_ch, res4_ch, 3, 3)
    assert sd["proposal_generator.rpn_head.objectness_logits.weight"].shape[0] == 15
    assert sd["proposal_generator.rpn_head.anchor_deltas.weight"].shape[0] == 60
    inferred = infer_rpn_config(sd, pre_nms_topk=100, post_nms_topk=25)
    assert inferred == cfg and inferred.size_divisibility == 0 and inferred.arch == "c4"
    assert RPNConfig.c4().pre_nms_topk == 6000
    imgs = _images(3, (48, 80), (45, 70))
    out = model(imgs)
    for img, p in zip(imgs, out):
        assert 0 < len(p.boxes) <= 25
        assert (p.boxes[:, 2] <= img.shape[-1]).all() and (p.boxes[:, 3] <= img.shape[-2]).all()
    # no size divisibility: each image is its own batch, so batching cannot change results
    assert torch.equal(model([imgs[1]])[0].boxes, out[1].boxes)


def test_state_dict_from_regionclip_checkpoint() -> None:
    rpn_sd = _tiny(RPNConfig.fpn(**TINY)).state_dict()
    ckpt = {"backbone.layer1.0.conv1.weight": torch.zeros(1),  # the CLIP backbone: not the RPN
            "lang_encoder.positional_embedding": torch.zeros(1)}
    ckpt.update({"offline_" + k: v for k, v in rpn_sd.items()})
    ckpt.update({"module.roi_heads.x": torch.zeros(1)})
    filtered, ignored = rpn_state_dict_from_checkpoint(ckpt)
    assert set(filtered) == set(rpn_sd)
    assert ignored == sorted(["backbone.layer1.0.conv1.weight", "lang_encoder.positional_embedding",
                              "module.roi_heads.x"])
    assert infer_rpn_config(ckpt) == RPNConfig.fpn(**TINY)


def test_infer_rpn_config_errors() -> None:
    sd = _tiny(RPNConfig.fpn(**TINY)).state_dict()
    with pytest.raises(ValueError, match="unknown RPNConfig"):
        infer_rpn_config(sd, nms_threshold=0.5)
    with pytest.raises(ValueError, match="no detectron2 RPN backbone"):
        infer_rpn_config({"roi_heads.a": torch.zeros(1)})
    with pytest.raises(ValueError, match="anchors per location"):
        infer_rpn_config(sd, aspect_ratios=(1.0,))


# ------------------------------------------------------------- CLIP ResNet trunk (rpn_lvis_1203_clipbackbone)

TINY_CLIP = dict(trunk="clip", resnet_layers=(1, 2, 1, 1), stem_out_channels=8, width_per_group=8,
                 res2_out_channels=32, fpn_out_channels=8, input_format="RGB", pixel_mean=CLIP_PIXEL_MEAN,
                 pixel_std=CLIP_PIXEL_STD)


def test_clip_trunk_key_layout_is_recognised_and_runs() -> None:
    """The released layout (CLIP ResNet names under backbone.bottom_up., no attnpool, Mask R-CNN heads beside it)
    selects the CLIP trunk and its input by keys alone; strict load; proposals valid and batch-independent.
    Full-size parity with the original: tests/parity/test_clip_rpn.py."""
    cfg = RPNConfig.fpn(**TINY_CLIP, post_nms_topk=40)
    model = _tiny(cfg)
    sd = model.state_dict()
    trunk = "backbone.bottom_up."
    for k in ("conv1.weight", "bn1.running_var", "conv3.weight", "bn3.bias", "layer1.0.downsample.0.weight",
              "layer2.1.conv2.weight", "layer4.0.downsample.1.running_mean"):
        assert trunk + k in sd, k
    assert not any(".attnpool." in k or ".stem." in k or ".res2." in k for k in sd)
    assert "backbone.fpn_lateral5.weight" in sd and sd["backbone.fpn_lateral5.weight"].shape[1] == 8 * 32
    released = {**sd, "roi_heads.box_head.fc1.weight": torch.zeros(4, 4), "roi_heads.mask_head.predictor.bias":
                torch.zeros(3)}
    kept, ignored = rpn_state_dict_from_checkpoint({"model": released})
    assert set(kept) == set(sd) and ignored == ["roi_heads.box_head.fc1.weight", "roi_heads.mask_head.predictor.bias"]
    inferred = infer_rpn_config(released, post_nms_topk=40)
    assert inferred == cfg  # trunk "clip", RGB, CLIP mean/std (0..1 values): read off the keys, no flags
    # the same layout inside a RegionCLIP checkpoint (offline_* keys) is recognised too
    assert infer_rpn_config({"offline_" + k: v for k, v in sd.items()}, post_nms_topk=40) == cfg
    fresh = build_offline_rpn(inferred)
    fresh.load_state_dict(kept, strict=True)
    imgs = _images(4, (60, 64), (64, 50), (40, 90))
    out = fresh(imgs)
    for img, p in zip(imgs, out):
        h, w = img.shape[-2:]
        assert 0 < len(p.boxes) <= 40 and p.boxes.dtype == torch.float32
        assert (p.boxes[:, 0] >= 0).all() and (p.boxes[:, 2] <= w).all() and (p.boxes[:, 3] <= h).all()
        assert (p.objectness_logits[:-1] >= p.objectness_logits[1:]).all()
        single = fresh([img])[0]
        torch.testing.assert_close(single.boxes, p.boxes, rtol=1e-5, atol=1e-4)
    ref = model(imgs)
    assert all(torch.equal(a.boxes, b.boxes) for a, b in zip(out, ref))


def test_clip_trunk_preprocess_divides_by_255_in_rgb() -> None:
    model = _tiny(RPNConfig.fpn(**TINY_CLIP))
    assert model.div_pixel
    img = torch.zeros(3, 5, 7)
    img[0], img[1], img[2] = 10.0, 20.0, 30.0  # R, G, B
    batch, sizes = model.preprocess([img])
    assert batch.shape == (1, 3, 32, 32) and sizes == [(5, 7)]
    expected = [(v / 255.0 - m) / s for v, m, s in zip((10.0, 20.0, 30.0), CLIP_PIXEL_MEAN, CLIP_PIXEL_STD)]
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor(expected), rtol=0, atol=1e-6)
    assert batch[0, :, 5:].abs().sum() == 0 and batch[0, :, :, 7:].abs().sum() == 0
    assert not _tiny(RPNConfig.fpn(**TINY)).div_pixel  # detectron2 R50 RPNs: Caffe mean on 0..255 values
    with pytest.raises(ValueError, match="needs input_format 'RGB'"):
        build_offline_rpn(RPNConfig.fpn(**{**TINY_CLIP, "input_format": "BGR"}))


def test_clip_trunk_fused_equals_plain() -> None:
    model = _tiny(RPNConfig.fpn(**TINY_CLIP, post_nms_topk=30), seed=5)
    imgs = _images(6, (64, 96))
    plain = model(imgs)[0]
    fused = fused_for_inference(model)
    assert fused.backbone.bottom_up.fused and not any(".bn1." in k for k in fused.state_dict())
    out = fused(imgs)[0]
    torch.testing.assert_close(out.objectness_logits, plain.objectness_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.boxes, plain.boxes, rtol=1e-5, atol=1e-3)


def test_clip_trunk_bad_checkpoints_are_named() -> None:
    sd = _tiny(RPNConfig.fpn(**TINY_CLIP)).state_dict()
    no_layer3 = {k: v for k, v in sd.items() if not k.startswith("backbone.bottom_up.layer3.")}
    with pytest.raises(ValueError, match="missing CLIP ResNet stage.*blocks per stage \\(1, 2, 0, 1\\)"):
        infer_rpn_config(no_layer3)
    bad_stem = {**sd, "backbone.bottom_up.conv1.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(ValueError, match="conv1.weight has 8 channels; a CLIP ResNet stem of width 8 has 4"):
        infer_rpn_config(bad_stem)
    no_fpn = {k: v for k, v in sd.items() if not k.startswith("backbone.fpn_")}
    with pytest.raises(ValueError, match="no FPN"):
        infer_rpn_config(no_fpn)
    with pytest.raises(ValueError, match="CLIP ResNet trunk only exists under a plain FPN"):
        build_offline_rpn(RPNConfig.fpn(**TINY_CLIP, lsj=True))


def test_clip_trunk_rpn_file_loads_as_rpn_weights_and_converts(tmp_path: Path) -> None:
    """A released-layout CLIP-trunk RPN file works where any RPN file does: `--rpn-weights` of load_detector
    (strict, with a load report naming the dropped heads) and `regionclip convert`."""
    from _region_helpers import write_tiny_checkpoint

    from regionclip.factory import load_detector
    from regionclip.weights.hub import convert_file

    cfg = RPNConfig.fpn(**TINY_CLIP, nms_thresh=0.9, post_nms_topk=25)
    sd = _tiny(cfg).state_dict()
    rpn_file = tmp_path / "rpn_clip.pth"
    torch.save({"model": {**sd, "roi_heads.box_predictor.cls_score.weight": torch.zeros(1204, 8)}}, rpn_file)
    det, info = load_detector(write_tiny_checkpoint(tmp_path / "rc.pth"), rpn_file,
                              rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 25})
    assert info.rpn_config == cfg and det.rpn is not None and det.rpn.cfg.trunk == "clip"
    assert info.report.ok and f"{rpn_file}:roi_heads.box_predictor.cls_score.weight" in info.report.ignored
    props = det.rpn(_images(7, (64, 80)))[0]
    assert 0 < len(props.boxes) <= 25
    _, meta = convert_file(rpn_file, tmp_path / "rpn_clip.safetensors")
    assert meta["regionclip.format"] == "rpn" and meta["regionclip.rpn"] == "clip-fpn"


def test_clip_trunk_rpn_exports_and_matches_eager(tmp_path: Path) -> None:
    """The exported RPN graph (backbone + head; the runtime keeps the torch preprocess, which divides by 255 for this
    trunk) gives the eager proposals."""
    pytest.importorskip("onnx", reason="pip install 'regionclip[onnx]'")
    pytest.importorskip("onnxruntime", reason="pip install 'regionclip[onnx]'")
    from _region_helpers import TINY_CLIP as TINY_CLIP_RESNET, tiny_options, write_images

    from regionclip.config import DetectorConfig, InputConfig
    from regionclip.export import export_model, make_backend
    from regionclip.factory import build_detector
    from regionclip.pipeline import Pipeline

    inp = InputConfig(min_size=96, max_size=128)
    det = build_detector(DetectorConfig(clip=TINY_CLIP_RESNET, input=inp,
                                        rpn=RPNConfig.fpn(**TINY_CLIP, post_nms_topk=50, nms_thresh=0.9)))
    assert det.rpn is not None
    _randomize(det.rpn, 3)
    export_model(det.eval(), tmp_path / "onnx", fmt="onnx")
    eager, fast = Pipeline(det, inp), Pipeline(make_backend(det, "onnxruntime", tmp_path / "onnx"), inp)
    prep = [eager.prepare(p) for p in write_images(tmp_path / "img", [(100, 130), (90, 70)], seed=1)]
    for pe, pf in zip(eager.proposals(prep, tiny_options()), fast.proposals(prep, tiny_options())):
        assert len(pe.boxes) > 0
        torch.testing.assert_close(pf.boxes, pe.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(pf.objectness_logits, pe.objectness_logits, atol=1e-4, rtol=0)
