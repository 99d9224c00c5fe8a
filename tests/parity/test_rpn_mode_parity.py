"""RPN mode end to end against the original (../shared/parity/refs/rn50_rpn.pt): R50-FPN offline RPN (NMS 0.9,
1000 proposals), MULTIPLY_RPN_SCORE with the raw logit, RN50 seed-0 random weights."""
import pytest
import torch

from regionclip.checkpoint.io import read_weight_file
from regionclip.config import PostprocessConfig
from regionclip.factory import load_detector
from regionclip.modeling.detector import PreparedImage

pytestmark = pytest.mark.parity
NAMES = ["sample_img1.jpg", "sample_img2.jpg"]


@pytest.fixture(scope="module")
def detector(rn50_ckpts):
    det, _ = load_detector(rn50_ckpts["regionclip"], rn50_ckpts["rpn"],
                           rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 1000})
    det.set_vocabulary(read_weight_file(rn50_ckpts["concept_emb"]))
    return det


@pytest.mark.parametrize("name", NAMES)
def test_rpn_mode_matches_original(detector, parity_inputs, parity_rpn, name):
    ref, inp = parity_rpn["images"][name], parity_inputs[name]
    p = PreparedImage(inp["image_uint8_rgb_chw"], tuple(inp["orig_hw"]), tuple(ref["image_size_resized_hw"]))
    with torch.no_grad():
        props = detector.propose([p.image])[0]
        assert props.boxes.shape == ref["proposal_boxes"].shape
        assert (props.boxes - ref["proposal_boxes"]).abs().max() <= 1e-3
        torch.testing.assert_close(props.objectness_logits, ref["proposal_objectness_logits"], rtol=1e-5, atol=1e-5)
        res4 = detector.compute_res4([p.image])
        emb = detector.encode_regions(res4, [props.boxes])
        torch.testing.assert_close(emb[:50], ref["region_emb_raw"], rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(emb.norm(dim=1), ref["region_emb_raw_l2norm_all"], rtol=1e-4, atol=1e-3)
        probs = detector.classify(emb)
        torch.testing.assert_close(probs, ref["cls_probs"], rtol=1e-4, atol=1e-5)
        cfg = PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100, rpn_score="raw")
        dets = detector.detect_prepared([p], None, postprocess=cfg, res4=res4)[0]
    assert torch.equal(dets.labels, ref["final_classes"])
    assert torch.equal(dets.region_index, ref["det_region_index"])
    torch.testing.assert_close(dets.scores, ref["final_scores"], rtol=1e-4, atol=1e-5)
    assert (dets.boxes - ref["final_boxes"]).abs().max() <= 1e-3


def test_batched_rpn_mode_equals_single(detector, parity_inputs, parity_rpn):
    """Two images in one padded batch give the same detections as one at a time."""
    prepared = [PreparedImage(parity_inputs[n]["image_uint8_rgb_chw"], tuple(parity_inputs[n]["orig_hw"]), (750, 1333))
                for n in NAMES]
    cfg = PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100, rpn_score="raw")
    batched = detector.detect_prepared(prepared, None, postprocess=cfg)
    for n, d in zip(NAMES, batched):
        ref = parity_rpn["images"][n]
        assert torch.equal(d.labels, ref["final_classes"])
        assert (d.boxes - ref["final_boxes"]).abs().max() <= 1e-3
