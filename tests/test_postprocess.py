"""Scoring and post-processing, checked on small hand-made cases (spec §4.6-4.7)."""
import math

import pytest
import torch

from regionclip.config import PostprocessConfig
from regionclip.modeling.heads import text_classifier_logits
from regionclip.ops.boxes import soft_nms
from regionclip.inference.postprocess import combine_rpn_scores, postprocess_detections, rescale_to_original


def test_classifier_zero_background_and_temperature():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[10.0, 0.0], [0.0, 0.5]])  # norms differ on purpose: rows are normalized
    logits = text_classifier_logits(x, t, temperature=0.01)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[:, -1], torch.zeros(2))  # constant background logit, last column
    torch.testing.assert_close(logits[0, :2], torch.tensor([60.0, 80.0]))  # cos (0.6, 0.8) / 0.01
    torch.testing.assert_close(logits[1, :2], torch.tensor([100.0, 0.0]))


def test_classifier_dimension_mismatch_is_clear():
    with pytest.raises(ValueError, match="1024-d = RN50, 640-d = RN50x4"):
        text_classifier_logits(torch.zeros(2, 1024), torch.zeros(3, 640))


def test_raw_rpn_multiplication_drops_negative_logits_and_exceeds_one():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.5, 0.25, 0.25]])
    logits = torch.tensor([9.0, -0.5, 0.0])
    s = combine_rpn_scores(probs, logits, "raw")
    assert math.isclose(float(s[0, 0]), math.sqrt(0.9 * 9.0), rel_tol=1e-6)  # 2.846 > 1
    assert torch.isnan(s[1]).all()  # sqrt of a negative product
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float32)
    out = postprocess_detections(boxes, s, (100, 100), PostprocessConfig(score_thresh=0.001, nms_thresh=0.5))
    assert 1 not in out["region_index"].tolist()  # the negative-logit proposal is gone entirely
    assert float(out["scores"].max()) > 1.0
    # a zero logit gives score 0 for every class: filtered by the strict > threshold
    assert 2 not in out["region_index"].tolist()
    sig = combine_rpn_scores(probs, logits, "sigmoid")
    assert torch.isfinite(sig).all() and float(sig.max()) <= 1.0


def test_rpn_multiplication_needs_objectness():
    with pytest.raises(ValueError, match="GT boxes|user/GT boxes"):
        combine_rpn_scores(torch.rand(2, 3), None, "raw")


def test_threshold_classwise_nms_topk_and_order():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    # 2 classes + bg; box 0 and 1 overlap (IoU 0.81) and both prefer class 0
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4]])
    cfg = PostprocessConfig(score_thresh=0.15, nms_thresh=0.5, detections_per_image=3)
    out = postprocess_detections(boxes, scores, (100, 100), cfg)
    # candidates > 0.15: (0,c0) .7, (0,c1) .2, (1,c0) .6, (1,c1) .3, (2,c1) .5; per-class NMS removes (1,c0) and (0,c1)
    assert out["scores"].tolist() == pytest.approx([0.7, 0.5, 0.3])
    assert out["labels"].tolist() == [0, 1, 1]
    assert out["region_index"].tolist() == [0, 2, 1]


def test_nonfinite_boxes_dropped_and_clip():
    boxes = torch.tensor([[-5, -5, 120, 50], [0, 0, float("nan"), 1]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    out = postprocess_detections(boxes, scores, (100, 100), PostprocessConfig())
    assert out["region_index"].tolist() == [0]
    assert out["boxes"].tolist() == [[0.0, 0.0, 100.0, 50.0]]


def test_soft_nms_gaussian_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.3])
    keep, decayed = soft_nms(boxes, scores, torch.zeros(3, dtype=torch.long), "gaussian", sigma=0.5, prune=0.001)
    # box1 vs box0: IoU = 50/100 = 0.5 -> 0.8 * exp(-0.25/0.5) = 0.48522; box2 disjoint keeps 0.3
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(decayed, torch.tensor([0.9, 0.8 * math.exp(-0.5), 0.3]))
    keep_l, dec_l = soft_nms(boxes, scores, torch.zeros(3, dtype=torch.long), "linear", iou_thresh=0.3)
    torch.testing.assert_close(dec_l, torch.tensor([0.9, 0.4, 0.3]))  # 0.8 * (1 - 0.5)
    keep_h, _ = soft_nms(boxes, scores, torch.zeros(3, dtype=torch.long), "hard", iou_thresh=0.5)
    assert keep_h.tolist() == [0, 2]  # IoU 0.5 >= 0.5 suppressed, as the original
    # different classes never suppress each other
    keep_c, dec_c = soft_nms(boxes, scores, torch.tensor([0, 1, 0]), "gaussian")
    torch.testing.assert_close(dec_c, torch.tensor([0.9, 0.8, 0.3]))


def test_soft_nms_in_postprocess_reports_decayed_scores():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    cfg = PostprocessConfig(score_thresh=0.05, soft_nms="gaussian", nms_thresh=0.5)
    out = postprocess_detections(boxes, scores, (100, 100), cfg)
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8 * math.exp(-0.5)]))


def test_report_unmultiplied_scores_keeps_selection():
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    logits = torch.tensor([1.0, 4.0])
    s = combine_rpn_scores(probs, logits, "raw")  # [sqrt(.6), sqrt(2.0)]
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    cfg = PostprocessConfig(score_thresh=0.01, report_unmultiplied_scores=True, rpn_score="raw")
    out = postprocess_detections(boxes, s, (100, 100), cfg, probs=probs)
    assert out["region_index"].tolist() == [1, 0]  # ranked by multiplied scores
    torch.testing.assert_close(out["scores"], torch.tensor([0.5, 0.6]))  # reported: probabilities


def test_rescale_clip_and_drop_empty():
    dets = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0], [100.0, 5.0, 100.0, 9.0]]),
            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1]), "region_index": torch.tensor([0, 1])}
    out = rescale_to_original(dets, (50, 100), (100, 150))
    torch.testing.assert_close(out["boxes"], torch.tensor([[15.0, 20.0, 30.0, 60.0]]))
    assert out["labels"].tolist() == [0]
