"""RPN mode end to end against the original (../shared/parity/refs/rn50_rpn.pt): R50-FPN offline RPN (NMS 0.9,
1000 proposals), MULTIPLY_RPN_SCORE with the raw logit, RN50 seed-0 random weights.

Each test computes its outputs in one small function (the only library calls) and compares them with the helpers
of ``_compare.py``: proposals with near-tied logits may swap rows (as the original rerun on another CPU does),
per-region outputs are compared through that pairing, final classes and order stay exact.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _compare import (EMB_ATOL, EMB_NORM_ATOL, EMB_NORM_RTOL, EMB_RTOL, PROB_ATOL, PROB_RTOL, assert_close,
                      assert_detections_match, assert_proposals_match)
from torch import Tensor

from regionclip.checkpoint.io import read_weight_file
from regionclip.config import InputConfig, PostprocessConfig
from regionclip.factory import load_detector
from regionclip.pipeline import Pipeline, RunOptions
from regionclip.structures import PreparedImage
from regionclip.text.vocabulary import Vocabulary

pytestmark = pytest.mark.parity
NAMES = ["sample_img1.jpg", "sample_img2.jpg"]
RPN_POSTPROCESS = PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100, rpn_score="raw")


def build_rpn_detector(ckpts: dict[str, Path]) -> tuple[Pipeline, Vocabulary]:
    """RN50 detector + the random R50-FPN RPN (NMS 0.9, 1000 proposals) in the pipeline, vocabulary = 65 random
    embeddings."""
    det, _ = load_detector(ckpts["regionclip"], ckpts["rpn"], rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 1000})
    return Pipeline(det, InputConfig()), Vocabulary.create(read_weight_file(ckpts["concept_emb"]))


def rpn_mode_outputs(detector: tuple[Pipeline, Vocabulary], inp: dict, resized_hw: tuple[int, int]
                     ) -> dict[str, Tensor]:
    """Every RPN-mode quantity compared with the original, for one image of ``inputs.pt``.

    Returns proposal_boxes [R, 4] / proposal_objectness_logits [R] (our order), region_emb_raw [R, D] (all R, our
    order), cls_probs [R, K+1], final detections (final_boxes [N, 4] original pixels, final_scores,
    final_classes, det_region_index [N] into our proposal rows).
    """
    pipe, vocab = detector
    p = PreparedImage(inp["image_uint8_rgb_chw"], tuple(inp["orig_hw"]), tuple(resized_hw))
    # every region is encoded here (the reference holds all 1000 rows); detection skips the unreachable ones
    opts = RunOptions(postprocess=RPN_POSTPROCESS)
    with torch.no_grad():
        props = pipe.proposals([p], opts)[0]
        res4 = pipe.features([p], opts)
        emb = pipe.encode(res4, [props.boxes], opts)
        probs = pipe.classify(emb, vocab)
        dets = pipe.detect_prepared([p], vocab, opts, features=res4)[0]
    return {"proposal_boxes": props.boxes, "proposal_objectness_logits": props.objectness_logits,
            "region_emb_raw": emb, "cls_probs": probs, "final_boxes": dets.boxes, "final_scores": dets.scores,
            "final_classes": dets.labels, "det_region_index": dets.region_index}


def assert_rpn_mode_outputs_match(out: dict[str, Tensor], ref: dict) -> None:
    """All of :func:`rpn_mode_outputs` against one image of ``rn50_rpn.pt``."""
    perm = assert_proposals_match(out["proposal_boxes"], out["proposal_objectness_logits"], ref["proposal_boxes"],
                                  ref["proposal_objectness_logits"])
    emb = out["region_emb_raw"][perm]  # reference row order
    n_stored = ref["region_emb_raw"].shape[0]  # the original stored the first 50 regions' embeddings
    assert_close("region_emb_raw[:50]", emb[:n_stored], ref["region_emb_raw"], EMB_ATOL, EMB_RTOL)
    assert_close("region_emb_raw L2 norms", emb.norm(dim=1), ref["region_emb_raw_l2norm_all"], EMB_NORM_ATOL,
                 EMB_NORM_RTOL)
    assert_close("cls_probs", out["cls_probs"][perm], ref["cls_probs"], PROB_ATOL, PROB_RTOL)
    assert_detections_match(out["final_boxes"], out["final_scores"], out["final_classes"], ref["final_boxes"],
                            ref["final_scores"], ref["final_classes"], region_index=out["det_region_index"],
                            ref_region_index=ref["det_region_index"], region_perm=perm)


@pytest.fixture(scope="module")
def detector(rn50_ckpts: dict[str, Path]) -> tuple[Pipeline, Vocabulary]:
    return build_rpn_detector(rn50_ckpts)


@pytest.mark.parametrize("name", NAMES)
def test_rpn_mode_matches_original(detector, parity_inputs, parity_rpn, name):
    ref = parity_rpn["images"][name]
    assert_rpn_mode_outputs_match(rpn_mode_outputs(detector, parity_inputs[name], ref["image_size_resized_hw"]), ref)


def test_batched_rpn_mode_equals_single(detector, parity_inputs, parity_rpn):
    """Two images in one padded batch give the original's one-image-at-a-time detections."""
    prepared = [PreparedImage(parity_inputs[n]["image_uint8_rgb_chw"], tuple(parity_inputs[n]["orig_hw"]), (750, 1333))
                for n in NAMES]
    pipe, vocab = detector
    batched = pipe.detect_prepared(prepared, vocab, RunOptions(postprocess=RPN_POSTPROCESS))
    for n, d in zip(NAMES, batched):
        ref = parity_rpn["images"][n]
        assert_detections_match(d.boxes, d.scores, d.labels, ref["final_boxes"], ref["final_scores"],
                                ref["final_classes"])
