"""FPN RPN on a CLIP RN50 trunk (``rpn_lvis_1203_clipbackbone`` layout) vs the original's proposals.

Fixture written by ``scripts/fixtures/make_clip_rpn.py`` with the original: the key list of its
``mask_rcnn_CLIP_R_50_FPN_1x.yaml`` model (``fixtures/clip_rpn_keys.json``), seed-0 random weights from
``../shared/parity/make_random_ckpt.py``'s rules on those keys (regenerated here, deterministic per key), the
zero-shot settings (NMS 0.9, 1000 proposals), the two demo images at 750x1333, CPU float32
(``fixtures/clip_rpn_proposals.pt``). Proposals compared with ``_compare.assert_proposals_match`` (boxes within
rounding noise, same order except among near-tied logits, docs/PARITY_NOISE.md).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from _compare import RES4_ATOL, RES4_RTOL, assert_close, assert_proposals_match

from regionclip.checkpoint.io import load_into
from regionclip.checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from regionclip.config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from regionclip.data.images import load_image, resize_image
from regionclip.modeling.rpn import OfflineRPN, build_offline_rpn
from regionclip.modeling.fusion import fused_for_inference

pytestmark = pytest.mark.parity

FIXTURES = Path(__file__).parent / "fixtures"
ASSETS = Path(__file__).resolve().parents[2] / "src" / "regionclip" / "assets" / "images"
NAMES = ("sample_img1.jpg", "sample_img2.jpg")


@pytest.fixture(scope="module")
def ref() -> Dict[str, Any]:
    return torch.load(FIXTURES / "clip_rpn_proposals.pt", weights_only=True)


@pytest.fixture(scope="module")
def released_layout_ckpt(shared_dir: Path, ref: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The whole original model's state dict (``{'model': ...}`` contents) with the fixture's random weights."""
    spec = importlib.util.spec_from_file_location("make_random_ckpt", shared_dir / "parity" / "make_random_ckpt.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keys = json.loads((FIXTURES / "clip_rpn_keys.json").read_text())["keys"]
    sd, _ = mod.build_state_dict(keys, ref["seed"], ref["residual_scale"])
    return sd


@pytest.fixture(scope="module")
def rpn(released_layout_ckpt: Dict[str, torch.Tensor], ref: Dict[str, Any]) -> OfflineRPN:
    sd, ignored = rpn_state_dict_from_checkpoint({"model": released_layout_ckpt})
    assert ignored and all(k.startswith("roi_heads.") for k in ignored)  # the Mask R-CNN heads, not the RPN
    assert len(sd) == ref["load"]["rpn_keys"]
    cfg = infer_rpn_config(sd, nms_thresh=0.9, post_nms_topk=1000)
    # everything the original's offline config sets, read off the keys alone
    assert (cfg.arch, cfg.trunk, cfg.lsj, cfg.input_format) == ("fpn", "clip", False, ref["input_format"])
    assert (cfg.resnet_layers, cfg.stem_out_channels, cfg.fpn_out_channels) == ((3, 4, 6, 3), 64, 256)
    assert list(cfg.pixel_mean) == ref["pixel_mean"] == list(CLIP_PIXEL_MEAN)
    assert list(cfg.pixel_std) == ref["pixel_std"] == list(CLIP_PIXEL_STD)
    assert [[s] for s in cfg.anchor_sizes] == ref["anchor_sizes"]
    assert [list(cfg.aspect_ratios)] == ref["aspect_ratios"]
    assert cfg.pre_nms_topk == ref["pre_nms_topk_test"] and cfg.size_divisibility == ref["size_divisibility"]
    model = build_offline_rpn(cfg)
    report = load_into(model, sd, strict=True, source="clip-trunk RPN (random, released layout)", ignored=ignored)
    assert not report.missing and not report.unexpected
    return model


def _resized(name: str) -> torch.Tensor:
    return resize_image(load_image(ASSETS / name))


def _run(model: OfflineRPN, img: torch.Tensor) -> tuple:
    """(padded input hw, p2 [1, C, h, w], proposals) through preprocess -> backbone -> proposal_generator, which is
    exactly ``OfflineRPN.forward`` for one image, keeping the p2 map to localise a mismatch."""
    with torch.no_grad():
        batch, sizes = model.preprocess([img.float()])
        feats = model.backbone(batch)
        (boxes, logits), = model.proposal_generator(feats, sizes)
    return tuple(batch.shape[-2:]), feats["p2"], boxes, logits


@pytest.mark.parametrize("name", NAMES)
def test_clip_trunk_rpn_matches_original(rpn: OfflineRPN, ref: Dict[str, Any], name: str) -> None:
    r = ref["images"][name]
    img = _resized(name)
    assert list(img.shape[-2:]) == r["image_size_resized_hw"]
    assert hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest() == r["resized_uint8_rgb_sha256"]
    padded, p2, boxes, logits = _run(rpn, img)
    assert list(padded) == r["offline_input_padded_hw"] and list(p2.shape) == r["p2_shape"]
    assert_close("p2 channel means", p2[0].mean((1, 2)), r["p2_channel_mean"], RES4_ATOL, RES4_RTOL)
    assert boxes.dtype == torch.float32
    assert_proposals_match(boxes, logits, r["proposal_boxes"], r["proposal_objectness_logits"])
    # the public entry point gives the same
    out = rpn([img])[0]
    assert torch.equal(out.boxes, boxes) and torch.equal(out.objectness_logits, logits)


def test_fused_clip_trunk_rpn_matches_original(rpn: OfflineRPN, ref: Dict[str, Any]) -> None:
    """What the API runs by default (BNs folded into the convs, channels-last): still the original's proposals."""
    fused = fused_for_inference(rpn)
    assert fused.fused and fused.backbone.bottom_up.fused
    assert not any("bn" in k.split(".")[-2] for k in fused.state_dict() if k.startswith("backbone.bottom_up."))
    name = NAMES[0]
    r = ref["images"][name]
    _, _, boxes, logits = _run(fused, _resized(name))
    assert_proposals_match(boxes, logits, r["proposal_boxes"], r["proposal_objectness_logits"])
