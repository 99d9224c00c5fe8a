"""Released fine-tuned detector layout: box regression, test-time embeddings, class-agnostic masks (tiny)."""
from dataclasses import replace

import pytest
import torch

from regionclip import RegionCLIP
from regionclip.config import InputConfig, PostprocessConfig
from regionclip.modeling.clip_resnet import ModifiedResNet
from regionclip.ops.box_coder import decode_boxes
from regionclip.pipeline import RunOptions


@pytest.fixture
def finetuned_ckpt(tmp_path):
    torch.manual_seed(0)
    vis = ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 8)
    sd = {"backbone." + k: v for k, v in vis.state_dict().items()}
    sd.update({
        "roi_heads.box_predictor.cls_score.weight": torch.randn(3, 16),  # training (base) classes
        "roi_heads.box_predictor.test_cls_score.weight": torch.randn(5, 16),  # base + novel at test time
        "roi_heads.box_predictor.cls_bg_score.weight": torch.zeros(1, 16),
        "roi_heads.box_predictor.bbox_pred.weight": torch.randn(4, 16) * 0.05,
        "roi_heads.box_predictor.bbox_pred.bias": torch.zeros(4),
        "roi_heads.mask_head.deconv.weight": torch.randn(256, 256, 2, 2) * 0.05,
        "roi_heads.mask_head.deconv.bias": torch.zeros(256),
        "roi_heads.mask_head.predictor.weight": torch.randn(1, 256, 1, 1) * 0.1,
        "roi_heads.mask_head.predictor.bias": torch.zeros(1),
    })
    p = tmp_path / "finetuned.pth"
    torch.save({"model": sd}, p)
    return p, sd


def test_finetuned_layout_loads_everything(finetuned_ckpt):
    path, sd = finetuned_ckpt
    model = RegionCLIP.from_pretrained(path)
    det = model.detector
    assert det.bbox_pred is not None and det.mask_head is not None
    assert model.loaded.report.ok and not model.loaded.report.unexpected
    # the test-time classifier (test_cls_score) is the default vocabulary, as in the original's eval mode
    torch.testing.assert_close(model.vocabulary.class_embeddings, sd["roi_heads.box_predictor.test_cls_score.weight"])
    torch.testing.assert_close(model.loaded.split.train_class_embeddings, sd["roi_heads.box_predictor.cls_score.weight"])


def test_nonzero_background_embedding_is_rejected(finetuned_ckpt, tmp_path):
    _, sd = finetuned_ckpt
    sd = dict(sd)
    sd["roi_heads.box_predictor.cls_bg_score.weight"] = torch.ones(1, 16)
    p = tmp_path / "bad_bg.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(ValueError, match="background"):
        RegionCLIP.from_pretrained(p)


def test_box_deltas_and_masks_applied(finetuned_ckpt, demo_images):
    path, sd = finetuned_ckpt
    model = RegionCLIP.from_pretrained(path)
    det, pipe = model.detector, model.pipeline
    pipe.input_cfg = InputConfig(min_size=64, max_size=128)
    prepared = [pipe.prepare(demo_images[0])]
    regions = [pipe.user_regions(torch.tensor([[100.0, 100.0, 900.0, 700.0]]), prepared[0])]
    with torch.no_grad():
        res4 = det.compute_features([prepared[0].image])
        emb, _ = det.encode_regions(res4, [regions[0].boxes], chunk_size=256)
        expected = decode_boxes(det.bbox_pred(emb), regions[0].boxes, weights=(10.0, 10.0, 5.0, 5.0))
        torch.testing.assert_close(det.predict_boxes(emb, regions[0].boxes), expected)
    # deltas are never applied to given boxes (GT mode), whatever the config says
    cfg = PostprocessConfig(score_thresh=0.0, apply_box_deltas=True)
    out = pipe.detect_prepared(prepared, model.vocabulary, RunOptions(postprocess=cfg), regions=regions)[0]
    assert len(out) == 5  # one box, five test classes above threshold 0
    sx, sy = 1920 / prepared[0].resized_hw[1], 1080 / prepared[0].resized_hw[0]
    torch.testing.assert_close(out.boxes[0], regions[0].boxes[0] * torch.tensor([sx, sy, sx, sy]), rtol=1e-5, atol=1e-3)
    assert out.masks is not None and out.masks.shape == (5, 1080, 1920) and out.masks.dtype == torch.bool
    # masks live inside their boxes (pasted at the detection box)
    ys, xs = out.masks[0].nonzero(as_tuple=True)
    if len(xs):
        b = out.boxes[0]
        assert xs.min() >= b[0] - 1 and xs.max() <= b[2] + 1 and ys.min() >= b[1] - 1 and ys.max() <= b[3] + 1


def test_deltas_applied_to_rpn_proposals(finetuned_ckpt, demo_images, monkeypatch):
    from regionclip.ops.boxes import clip_boxes
    from regionclip.structures import Proposals

    path, _ = finetuned_ckpt
    model = RegionCLIP.from_pretrained(path)
    det, pipe = model.detector, model.pipeline
    pipe.input_cfg = InputConfig(min_size=64, max_size=128)
    p = pipe.prepare(demo_images[0])
    props = Proposals(torch.tensor([[10.0, 10.0, 60.0, 50.0], [30.0, 5.0, 100.0, 70.0]]), torch.tensor([2.0, 1.0]))
    monkeypatch.setattr(det, "propose", lambda images: [props])
    cfg = PostprocessConfig(score_thresh=0.0, nms_thresh=1.0, apply_box_deltas=True, detections_per_image=-1)
    out = pipe.detect_prepared([p], model.vocabulary, RunOptions(postprocess=cfg))[0]
    # the same proposals with apply_box_deltas off keep their boxes
    plain = pipe.detect_prepared([p], model.vocabulary, RunOptions(postprocess=replace(cfg, apply_box_deltas=False))
                                 )[0]
    with torch.no_grad():
        emb, _ = det.encode_regions(det.compute_features([p.image]), [props.boxes], chunk_size=256)
        moved = decode_boxes(det.bbox_pred(emb), props.boxes, weights=(10.0, 10.0, 5.0, 5.0))
    sx, sy = 1920 / p.resized_hw[1], 1080 / p.resized_hw[0]
    assert len(out) > 0 and len(plain) > 0
    for i in range(len(out)):
        r = int(out.region_index[i])
        exp = clip_boxes(moved[r], *p.resized_hw) * torch.tensor([sx, sy, sx, sy])  # clipped in the resized frame
        torch.testing.assert_close(out.boxes[i], exp, rtol=1e-5, atol=1e-3)
    for i in range(len(plain)):
        r = int(plain.region_index[i])
        exp = clip_boxes(props.boxes[r], *p.resized_hw) * torch.tensor([sx, sy, sx, sy])
        torch.testing.assert_close(plain.boxes[i], exp, rtol=1e-5, atol=1e-3)
    assert not torch.allclose(moved, props.boxes)  # the regression actually moved the boxes


def test_finetuned_defaults_without_preset(finetuned_ckpt, tmp_path):
    """No preset: a checkpoint with bbox_pred gets the transfer-learning test settings, a pretrained one not."""
    path, sd = finetuned_ckpt
    pp = RegionCLIP.from_pretrained(path).settings.postprocess
    assert pp.apply_box_deltas and pp.soft_nms == "gaussian"
    plain = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    p2 = tmp_path / "pretrained.pth"
    torch.save({"model": plain}, p2)
    pp2 = RegionCLIP.from_pretrained(p2).settings.postprocess
    assert not pp2.apply_box_deltas and pp2.soft_nms is None
    # a preset still decides
    assert not RegionCLIP.from_pretrained(path, preset="coco-gt").settings.postprocess.apply_box_deltas
