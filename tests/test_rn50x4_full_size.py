"""RN50x4 at full size with random official-format weights: strict loading, architecture read off the file,
GT-box and RPN modes end to end (the parity fixtures cover RN50 only)."""
import pytest
import torch

from regionclip.checkpoint.io import read_weight_file
from regionclip.config import PostprocessConfig
from regionclip.factory import load_detector
from regionclip.modeling.detector import PreparedImage
from regionclip.structures import Proposals

pytestmark = pytest.mark.slow


def test_rn50x4_loads_and_detects(parity_inputs, rn50x4_ckpts):
    ck = rn50x4_ckpts
    det, info = load_detector(ck["regionclip"], ck["rpn"], rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 100})
    assert info.report.ok and info.config.clip.width == 80 and info.config.clip.layers == (4, 6, 10, 6)
    assert det.pooler_resolution == 18 and det.embed_dim == 640 and det.rpn is not None
    emb = read_weight_file(ck["concept_emb"])
    assert emb.shape == (65, 640)
    det.set_vocabulary(emb)
    inp = parity_inputs["sample_img1.jpg"]
    p = PreparedImage(inp["image_uint8_rgb_chw"], tuple(inp["orig_hw"]), (750, 1333))
    with torch.no_grad():
        res4 = det.compute_res4([p.image])
        assert res4.shape == (1, 1280, 46, 83)
        gt = det.detect_prepared([p], [Proposals(inp["gt_boxes_resized"])], res4=res4,
                                 postprocess=PostprocessConfig(score_thresh=0.0, detections_per_image=-1))[0]
        rpn = det.detect_prepared([p], None, res4=res4,
                                  postprocess=PostprocessConfig(score_thresh=0.001, rpn_score="raw"))[0]
    # every (box, class) pair above 0 survives unless NMS removes it; scores are softmax probabilities
    assert len(gt) > 0 and float(gt.scores.max()) <= 1.0 and int(gt.labels.max()) < 65
    assert 0 < len(rpn) <= 100 and torch.isfinite(rpn.scores).all()
    assert (rpn.boxes[:, 2] <= 1920).all() and (rpn.boxes[:, 3] <= 1080).all()
