"""Offline R50-FPN RPN vs the original's proposals (shared/parity/refs/rn50_rpn.pt).

Seed-0 random detectron2 RPN checkpoint, LVIS mask_rcnn_R_50_FPN_1x build, NMS 0.9, 1000 proposals, CPU fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from regionclip.modeling.rpn import OfflineRPN, build_offline_rpn, infer_rpn_config, rpn_state_dict_from_checkpoint

pytestmark = pytest.mark.parity

NAMES = ("sample_img1.jpg", "sample_img2.jpg")


@pytest.fixture(scope="module")
def rpn(rn50_ckpts: Dict[str, Path]) -> OfflineRPN:
    ckpt = torch.load(rn50_ckpts["rpn"], weights_only=True)
    sd, ignored = rpn_state_dict_from_checkpoint(ckpt)
    assert ignored == []  # the random file holds exactly the keys the original uses
    cfg = infer_rpn_config(sd, nms_thresh=0.9, post_nms_topk=1000)
    assert cfg.arch == "fpn" and not cfg.lsj and cfg.pre_nms_topk == 1000
    model = build_offline_rpn(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def test_rpn_proposals_match_original(rpn: OfflineRPN, parity_inputs: dict, parity_rpn: dict) -> None:
    images = [parity_inputs[n]["image_uint8_rgb_chw"].float() for n in NAMES]
    singles = [rpn([img])[0] for img in images]
    batched = rpn(images)
    for name, img, single, both in zip(NAMES, images, singles, batched):
        ref = parity_rpn["images"][name]
        assert rpn.padded_size(*img.shape[-2:]) == tuple(ref["offline_input_padded_hw"])
        assert tuple(img.shape[-2:]) == tuple(ref["image_size_resized_hw"])
        ref_boxes, ref_logits = ref["proposal_boxes"], ref["proposal_objectness_logits"]
        assert single.boxes.shape == ref_boxes.shape and single.boxes.dtype == torch.float32
        box_diff = (single.boxes - ref_boxes).abs().max().item()
        logit_diff = (single.objectness_logits - ref_logits).abs().max().item()
        print(f"{name}: max |box diff| {box_diff:.3g} px, max |logit diff| {logit_diff:.3g}")
        # Same order and selection; boxes agree to float32 rounding of exp (a few ulp, ~1e-4 px at x~1300).
        assert box_diff <= 1e-3
        assert logit_diff <= 1e-5
        # Running both images as one batch gives the same per-image output.
        assert torch.equal(both.boxes, single.boxes)
        assert torch.equal(both.objectness_logits, single.objectness_logits)
