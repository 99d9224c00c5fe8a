"""Detectors as modules (issue 25): ``forward`` = the pipeline's staged calls on one batch tensor, hooks see it,
``torch.export`` captures it (user-box mode); fusion returns a new inference module and leaves the trained one
as it was."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _region_helpers import TINY_CLIP, random_boxes, tiny_detector
from torch import nn

from regionclip.modeling.clip_resnet import ModifiedResNet
from regionclip.modeling.detector import RegionCLIPDetector, RegionOutputs
from regionclip.modeling.fusion import fused_for_inference
from regionclip.modeling.transformer.region_head import TransformerRegionDetector, TransformerRegionEncoder
from regionclip.modeling.transformer.vit import VisionTransformerTrunk

SIZES = [(96, 128), (80, 112)]  # two resized images of different sizes, padded to the first


def _batch(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the images, their uint8 zero-padded batch [2, 3, 96, 128], image_sizes [2, 2])."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in SIZES]
    batch = torch.zeros(len(images), 3, *SIZES[0], dtype=torch.uint8)
    for b, img in zip(batch, images):
        b[:, :img.shape[1], :img.shape[2]] = img
    return images, batch, torch.tensor(SIZES)


def _boxes() -> list[torch.Tensor]:
    return [random_boxes(5, h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


def _rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])


def _with_box_regression(det: RegionCLIPDetector) -> RegionCLIPDetector:
    det.bbox_pred = nn.Linear(det.embed_dim, 4)
    with torch.no_grad():
        det.bbox_pred.weight.normal_(std=0.01, generator=torch.Generator().manual_seed(1))
    return det


def _tiny_vit_detector() -> TransformerRegionDetector:
    torch.manual_seed(0)
    trunk = VisionTransformerTrunk(64, 1, 2, 16, 4, act="gelu", ln_eps=1e-6, patch_bias=True, ln_pre=False,
                                   final_norm="map")
    return TransformerRegionDetector(TransformerRegionEncoder(trunk, 16)).eval()


def _staged(det, images, boxes, class_emb, chunk_size):
    """What the pipeline calls, stage by stage."""
    features = det.compute_features(images)
    emb, _ = det.encode_regions(features, boxes, chunk_size=chunk_size)
    flat = torch.cat(boxes)
    return emb, det.classify(emb, class_emb), det.predict_boxes(emb, flat)


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_forward_equals_the_staged_calls_with_given_boxes(family: str) -> None:
    det = _with_box_regression(tiny_detector(0)) if family == "resnet" else _tiny_vit_detector()
    images, batch, sizes = _batch()
    boxes = _boxes()
    class_emb = torch.randn(4, det.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = det(batch, class_emb, _rois(boxes), sizes, chunk_size=3)
        emb, probs, pred = _staged(det, images, boxes, class_emb, chunk_size=3)
    assert isinstance(out, RegionOutputs)
    assert torch.equal(out.region_embeddings, emb) and torch.equal(out.class_probs, probs)
    assert torch.equal(out.pred_boxes, pred) and torch.equal(out.boxes, torch.cat(boxes))
    assert out.batch_index.tolist() == [0] * 5 + [1] * 5 and bool(out.objectness.isnan().all())
    assert out.class_probs.shape == (10, 5 if family == "resnet" else 4)  # background column only for the ResNet
    if family == "resnet":
        assert not torch.equal(out.pred_boxes, out.boxes)  # the box regression ran


def test_forward_equals_the_staged_calls_with_proposals() -> None:
    det = tiny_detector(0, rpn=True)
    images, batch, sizes = _batch()
    class_emb = torch.randn(3, det.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = det(batch, class_emb, image_sizes=sizes, chunk_size=64)
        props = det.propose(images)
        emb, probs, _ = _staged(det, images, [p.boxes for p in props], class_emb, chunk_size=64)
    assert len(out.boxes) == sum(len(p.boxes) for p in props) > 0
    assert torch.equal(out.boxes, torch.cat([p.boxes for p in props]))
    assert torch.equal(out.objectness, torch.cat([p.objectness_logits for p in props]))
    assert out.batch_index.tolist() == sum(([i] * len(p.boxes) for i, p in enumerate(props)), [])
    assert torch.equal(out.region_embeddings, emb) and torch.equal(out.class_probs, probs)


def test_forward_of_a_full_batch_needs_no_sizes() -> None:
    det = tiny_detector(0)
    g = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=g) for _ in range(2)]
    boxes = [random_boxes(4, 96, 128, seed=i) for i in range(2)]
    class_emb = torch.randn(3, det.embed_dim, generator=g)
    with torch.no_grad():
        out = det(torch.stack(images), class_emb, _rois(boxes), chunk_size=2)
        emb, probs, _ = _staged(det, images, boxes, class_emb, chunk_size=2)
    assert torch.equal(out.region_embeddings, emb) and torch.equal(out.class_probs, probs)
    with pytest.raises(ValueError, match=r"\[R, 5\]"):
        det(torch.stack(images), class_emb, torch.cat(boxes), chunk_size=2)


def test_forward_hooks_fire() -> None:
    det = tiny_detector(0)
    _, batch, sizes = _batch()
    seen: dict[str, object] = {}
    det.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs=dict(kwargs)), with_kwargs=True)
    det.register_forward_hook(lambda m, args, out: seen.update(out=out))
    with torch.no_grad():
        out = det(batch, torch.randn(3, det.embed_dim), _rois(_boxes()), sizes, chunk_size=4)
    assert seen["out"] is out and seen["kwargs"] == {"chunk_size": 4}


def test_forward_is_exportable_in_user_box_mode() -> None:
    """torch.export captures the whole detector (static shapes); the exported program computes what eager does."""
    det = _with_box_regression(tiny_detector(0))
    _, batch, sizes = _batch()
    rois, class_emb = _rois(_boxes()), torch.randn(4, det.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        program = torch.export.export(det, (batch, class_emb, rois, sizes), kwargs={"chunk_size": 4})
        _, other, _ = _batch(seed=1)  # new pixel values, same shapes
        for images in (batch, other):
            got = program.module()(images, class_emb, rois, sizes, chunk_size=4)
            want = det(images, class_emb, rois, sizes, chunk_size=4)
            for name, a, b in zip(RegionOutputs._fields, got, want):
                torch.testing.assert_close(a, b, equal_nan=True, msg=name)


def test_fusion_returns_a_new_module_and_leaves_the_trained_one_untouched() -> None:
    det = _with_box_regression(tiny_detector(0, rpn=True))
    before = {k: v.clone() for k, v in det.state_dict().items()}
    fused = fused_for_inference(det)
    assert fused is not det and isinstance(fused, RegionCLIPDetector)
    # the original: same weights and keys, unfused, trainable (gradients flow), saveable
    after = det.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not det.backbone.fused and not det.rpn.fused and det.backbone.layer1[0].conv1.weight.requires_grad
    det.train()
    images, batch, sizes = _batch()
    boxes = _boxes()
    out = det(batch, torch.randn(3, det.embed_dim), _rois(boxes), sizes, chunk_size=8)
    out.class_probs.sum().backward()
    assert det.backbone.layer4[0].conv1.weight.grad is not None
    det.eval()
    # the copy: folded (BN keys gone), frozen, refuses training, same results within the fusion tests' tolerance
    assert fused.backbone.fused and fused.rpn.fused and "backbone.bn1.running_var" not in fused.state_dict()
    assert not any(p.requires_grad for p in fused.parameters())
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused.train()
    with torch.no_grad():
        class_emb = torch.randn(3, det.embed_dim, generator=torch.Generator().manual_seed(5))
        ref = det(batch, class_emb, _rois(boxes), sizes, chunk_size=8)
        got = fused(batch, class_emb, _rois(boxes), sizes, chunk_size=8)
        p_ref, p_got = det.propose(images), fused.propose(images)
    rel = ((got.region_embeddings - ref.region_embeddings).abs().max() / ref.region_embeddings.abs().max()).item()
    assert rel < 1e-5  # tests/test_speed_paths.py's bound
    for a, b in zip(p_got, p_ref):  # tests/test_rpn.py's bounds
        torch.testing.assert_close(a.objectness_logits, b.objectness_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=1e-3)


def test_fusion_of_an_already_fused_trunk_changes_only_the_layout() -> None:
    m = ModifiedResNet(TINY_CLIP.layers, TINY_CLIP.embed_dim, TINY_CLIP.heads, TINY_CLIP.image_resolution,
                       TINY_CLIP.width).eval()
    nhwc = fused_for_inference(m)
    nchw = fused_for_inference(nhwc, channels_last=False)
    assert nhwc.channels_last and not nchw.channels_last and not m.fused
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nchw.encode_image(x), nhwc.encode_image(x))
    with pytest.raises(TypeError, match="fused_for_inference takes"):
        fused_for_inference(nn.Linear(2, 2))


def test_load_keeps_only_the_fused_copy(tiny_ckpt, monkeypatch) -> None:
    """RegionCLIP.load fuses a copy and drops the loaded module: no second model stays in memory."""
    import regionclip.api as api

    loaded: list[weakref.ref] = []
    real = api.load_detector

    def recording(*args, **kwargs):
        det, info = real(*args, **kwargs)
        loaded.append(weakref.ref(det))
        return det, info

    monkeypatch.setattr(api, "load_detector", recording)
    model = api.RegionCLIP.from_pretrained(tiny_ckpt)
    gc.collect()
    assert model.detector.backbone.fused and loaded and loaded[0]() is None
