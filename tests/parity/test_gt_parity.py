"""GT-box mode against the original's outputs (../shared/parity/refs/rn50_gt.pt), RN50 seed-0 random weights.

Each test computes its outputs in one small function (the only library calls) and compares them with the
tolerance helpers of ``_compare.py``, which allow float rounding of other CPUs (docs/PARITY_NOISE.md) and keep
final classes and their order exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _compare import (EMB_ATOL, EMB_RTOL, EMB_UNIT_ATOL, EMB_UNIT_RTOL, PROB_ATOL, PROB_RTOL, assert_close,
                      assert_detections_match, assert_res4_match)
from torch import Tensor

from regionclip.checkpoint.io import read_weight_file
from regionclip.config import InputConfig, PostprocessConfig
from regionclip.factory import load_detector
from regionclip.pipeline import Pipeline, RunOptions
from regionclip.structures import PreparedImage, Proposals
from regionclip.text.vocabulary import Vocabulary

pytestmark = pytest.mark.parity
NAMES = ["sample_img1.jpg", "sample_img2.jpg"]
GT_POSTPROCESS = PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100)


def build_gt_detector(ckpts: dict[str, Path]) -> tuple[Pipeline, Vocabulary]:
    """The RN50 detector without RPN in the pipeline, vocabulary = the 65 random concept embeddings."""
    det, _ = load_detector(ckpts["regionclip"], use_rpn=False)
    return Pipeline(det, InputConfig()), Vocabulary.create(read_weight_file(ckpts["concept_emb"]))


def gt_outputs(detector: tuple[Pipeline, Vocabulary], inp: dict, resized_hw: tuple[int, int]) -> dict[str, Tensor]:
    """Every GT-mode quantity compared with the original, for one image of ``inputs.pt``.

    Returns res4 [1, C, H, W]; region_emb_raw / region_emb_norm [R, D]; cls_probs [R, K+1]; final detections
    (final_boxes [N, 4] original pixels, final_scores, final_classes, det_region_index [N]).
    """
    pipe, vocab = detector
    p = PreparedImage(inp["image_uint8_rgb_chw"], tuple(inp["orig_hw"]), tuple(resized_hw))
    opts = RunOptions(postprocess=GT_POSTPROCESS)
    with torch.no_grad():
        res4 = pipe.features([p], opts)
        emb = pipe.encode(res4, [inp["gt_boxes_resized"]], opts)
        probs = pipe.classify(emb, vocab)
        dets = pipe.detect_prepared([p], vocab, opts, regions=[Proposals(inp["gt_boxes_resized"])])[0]
    return {"res4": res4, "region_emb_raw": emb, "region_emb_norm": torch.nn.functional.normalize(emb),
            "cls_probs": probs, "final_boxes": dets.boxes, "final_scores": dets.scores,
            "final_classes": dets.labels, "det_region_index": dets.region_index}


def assert_gt_outputs_match(out: dict[str, Tensor], ref: dict) -> None:
    """All of :func:`gt_outputs` against one image of ``rn50_gt.pt``."""
    assert_res4_match(out["res4"], ref)
    assert_close("region_emb_raw", out["region_emb_raw"], ref["region_emb_raw"], EMB_ATOL, EMB_RTOL)
    assert_close("region_emb_norm", out["region_emb_norm"], ref["region_emb_norm"], EMB_UNIT_ATOL, EMB_UNIT_RTOL)
    assert_close("cls_probs", out["cls_probs"], ref["cls_probs"], PROB_ATOL, PROB_RTOL)
    assert_detections_match(out["final_boxes"], out["final_scores"], out["final_classes"], ref["final_boxes"],
                            ref["final_scores"], ref["final_classes"], region_index=out["det_region_index"],
                            ref_region_index=ref["det_region_index"])


@pytest.fixture(scope="module")
def detector(rn50_ckpts: dict[str, Path]) -> tuple[Pipeline, Vocabulary]:
    return build_gt_detector(rn50_ckpts)


def test_resized_input_matches_original(detector, parity_inputs):
    """Decode + test-time resize (PIL bilinear, integer arithmetic) gives the original's backbone input exactly
    on every CPU measured (docs/PARITY_NOISE.md)."""
    from regionclip.assets import demo_image_paths

    for path in demo_image_paths():
        resized = detector[0].prepare(path).image
        assert torch.equal(resized, parity_inputs[path.name]["image_uint8_rgb_chw"]), f"{path.name} differs"


@pytest.mark.parametrize("name", NAMES)
def test_gt_mode_matches_original(detector, parity_inputs, parity_gt, name):
    ref = parity_gt["images"][name]
    assert_gt_outputs_match(gt_outputs(detector, parity_inputs[name], ref["image_size_resized_hw"]), ref)


def cli_gt_results(tmp_path: Path, ckpts: dict[str, Path], gt_json: Path) -> list[dict]:
    """`regionclip detect --preset coco-gt --boxes gt_boxes.json` on the two demo images -> results.json rows."""
    from regionclip.assets import demo_image_paths
    from regionclip.cli.main import main

    out = tmp_path / "det"
    rc = main(["detect", *[str(p) for p in demo_image_paths()], "--weights", str(ckpts["regionclip"]),
               "--preset", "coco-gt", "--boxes", str(gt_json), "--concept-emb", str(ckpts["concept_emb"]),
               "-o", str(out), "--no-vis"])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_detect_cli_with_gt_json_reproduces_original(tmp_path, rn50_ckpts, parity_gt, shared_dir):
    """`regionclip detect --boxes gt_boxes.json` (integer COCO boxes, original-image pixels) gives the original's
    GT-mode detections: the integer boxes are scaled and truncated exactly as detectron2's mapper does."""
    from regionclip.assets import coco_ovd_categories

    results = cli_gt_results(tmp_path, rn50_ckpts, shared_dir / "parity" / "gt_boxes.json")
    coco_ids = torch.tensor([c["coco_id"] for c in coco_ovd_categories()])
    for image_id, name in ((1, "sample_img1.jpg"), (2, "sample_img2.jpg")):
        ref = parity_gt["images"][name]
        ours = [r for r in results if r["image_id"] == image_id]
        xyxy = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (r["bbox"] for r in ours)])
        assert_detections_match(xyxy, torch.tensor([r["score"] for r in ours]),
                                torch.tensor([r["category_id"] for r in ours]), ref["final_boxes"],
                                ref["final_scores"], coco_ids[ref["final_classes"]])
