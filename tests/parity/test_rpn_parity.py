"""Offline R50-FPN RPN vs the original's proposals (shared/parity/refs/rn50_rpn.pt).

Seed-0 random detectron2 RPN checkpoint, LVIS mask_rcnn_R_50_FPN_1x build, NMS 0.9, 1000 proposals, CPU fp32.
Proposals are compared with ``_compare.assert_proposals_match``: boxes and logits within rounding noise of other
CPUs, same order except among near-tied logits (docs/PARITY_NOISE.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
from _compare import assert_proposals_match

from regionclip.checkpoint.rpn_keys import infer_rpn_config, rpn_state_dict_from_checkpoint
from regionclip.modeling.rpn import OfflineRPN, build_offline_rpn
from regionclip.structures import Proposals

pytestmark = pytest.mark.parity

NAMES = ("sample_img1.jpg", "sample_img2.jpg")


def build_rpn(ckpts: Dict[str, Path]) -> OfflineRPN:
    """The offline RPN from the random detectron2 checkpoint (NMS 0.9, 1000 proposals), strictly loaded."""
    ckpt = torch.load(ckpts["rpn"], weights_only=True)
    sd, ignored = rpn_state_dict_from_checkpoint(ckpt)
    assert ignored == []  # the random file holds exactly the keys the original uses
    cfg = infer_rpn_config(sd, nms_thresh=0.9, post_nms_topk=1000)
    assert cfg.arch == "fpn" and not cfg.lsj and cfg.pre_nms_topk == 1000
    model = build_offline_rpn(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def rpn_proposals(rpn: OfflineRPN, images: list[torch.Tensor]) -> tuple[list[Proposals], list[Proposals]]:
    """(one call per image, one call with all images) proposals for [3, H, W] float 0..255 images."""
    with torch.no_grad():
        return [rpn([img])[0] for img in images], rpn(images)


@pytest.fixture(scope="module")
def rpn(rn50_ckpts: Dict[str, Path]) -> OfflineRPN:
    return build_rpn(rn50_ckpts)


def test_rpn_proposals_match_original(rpn: OfflineRPN, parity_inputs: dict, parity_rpn: dict) -> None:
    images = [parity_inputs[n]["image_uint8_rgb_chw"].float() for n in NAMES]
    singles, batched = rpn_proposals(rpn, images)
    for name, img, single, both in zip(NAMES, images, singles, batched):
        ref = parity_rpn["images"][name]
        assert rpn.padded_size(*img.shape[-2:]) == tuple(ref["offline_input_padded_hw"])
        assert tuple(img.shape[-2:]) == tuple(ref["image_size_resized_hw"])
        assert single.boxes.dtype == torch.float32
        assert_proposals_match(single.boxes, single.objectness_logits, ref["proposal_boxes"],
                               ref["proposal_objectness_logits"])
        # Running both images as one batch gives the same per-image output: each image is padded as if alone,
        # and the batched convolutions do the same sums per image on every kernel setting measured.
        assert torch.equal(both.boxes, single.boxes)
        assert torch.equal(both.objectness_logits, single.objectness_logits)
