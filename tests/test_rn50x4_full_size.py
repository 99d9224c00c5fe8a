"""RN50x4 at full size with random official-format weights: strict loading, architecture read off the file,
GT-box and RPN modes end to end (the parity fixtures cover RN50 only)."""
import pytest
import torch

from regionclip.checkpoint.io import read_weight_file
from regionclip.config import InputConfig, PostprocessConfig
from regionclip.factory import load_detector
from regionclip.pipeline import Pipeline, RunOptions
from regionclip.structures import PreparedImage, Proposals
from regionclip.text.vocabulary import Vocabulary

pytestmark = pytest.mark.slow


def test_rn50x4_loads_and_detects(parity_inputs, rn50x4_ckpts):
    ck = rn50x4_ckpts
    det, info = load_detector(ck["regionclip"], ck["rpn"], rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 100})
    assert info.report.ok and info.config.clip.width == 80 and info.config.clip.layers == (4, 6, 10, 6)
    assert det.pooler_resolution == 18 and det.embed_dim == 640 and det.rpn is not None
    emb = read_weight_file(ck["concept_emb"])
    assert emb.shape == (65, 640)
    vocab = Vocabulary.create(emb, embed_dim=det.embed_dim)
    pipe = Pipeline(det, InputConfig())
    inp = parity_inputs["sample_img1.jpg"]
    p = PreparedImage(inp["image_uint8_rgb_chw"], tuple(inp["orig_hw"]), (750, 1333))
    with torch.no_grad():
        res4 = pipe.features([p])
        assert res4.shape == (1, 1280, 46, 83)
        gt_opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.0, detections_per_image=-1))
        gt = pipe.detect_prepared([p], vocab, gt_opts, regions=[Proposals(inp["gt_boxes_resized"])],
                                  features=res4)[0]
        rpn_opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.001, rpn_score="raw"))
        rpn = pipe.detect_prepared([p], vocab, rpn_opts, features=res4)[0]
    # every (box, class) pair above 0 survives unless NMS removes it; scores are softmax probabilities
    assert len(gt) > 0 and float(gt.scores.max()) <= 1.0 and int(gt.labels.max()) < 65
    assert 0 < len(rpn) <= 100 and torch.isfinite(rpn.scores).all()
    assert (rpn.boxes[:, 2] <= 1920).all() and (rpn.boxes[:, 3] <= 1080).all()
