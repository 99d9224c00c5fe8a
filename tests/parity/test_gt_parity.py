"""GT-box mode against the original's outputs (../shared/parity/refs/rn50_gt.pt), RN50 seed-0 random weights."""
import pytest
import torch

from regionclip.checkpoint.io import read_weight_file
from regionclip.config import PostprocessConfig
from regionclip.factory import load_detector
from regionclip.modeling.detector import PreparedImage
from regionclip.structures import Proposals

pytestmark = pytest.mark.parity
NAMES = ["sample_img1.jpg", "sample_img2.jpg"]


@pytest.fixture(scope="module")
def detector(rn50_ckpts):
    det, _ = load_detector(rn50_ckpts["regionclip"], use_rpn=False)
    det.set_vocabulary(read_weight_file(rn50_ckpts["concept_emb"]))
    return det


@pytest.mark.parametrize("name", NAMES)
def test_gt_mode_matches_original(detector, parity_inputs, parity_gt, name):
    ref, inp = parity_gt["images"][name], parity_inputs[name]
    p = PreparedImage(inp["image_uint8_rgb_chw"], tuple(inp["orig_hw"]), tuple(ref["image_size_resized_hw"]))
    with torch.no_grad():
        res4 = detector.compute_res4([p.image])
        assert list(res4.shape) == list(ref["res4_shape"])
        torch.testing.assert_close(res4[0, :16], ref["res4_first16ch"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res4[0].mean((1, 2)), ref["res4_channel_mean"], rtol=1e-5, atol=1e-5)
        emb = detector.encode_regions(res4, [inp["gt_boxes_resized"]])
        torch.testing.assert_close(emb, ref["region_emb_raw"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.nn.functional.normalize(emb), ref["region_emb_norm"], rtol=1e-4, atol=1e-5)
        probs = detector.classify(emb)
        torch.testing.assert_close(probs, ref["cls_probs"], rtol=1e-4, atol=1e-5)
        dets = detector.detect_prepared([p], [Proposals(inp["gt_boxes_resized"])],
                                        postprocess=PostprocessConfig(score_thresh=0.001, nms_thresh=0.5,
                                                                      detections_per_image=100))[0]
    assert torch.equal(dets.labels, ref["final_classes"])
    assert torch.equal(dets.region_index, ref["det_region_index"])
    torch.testing.assert_close(dets.scores, ref["final_scores"], rtol=1e-4, atol=1e-5)
    assert (dets.boxes - ref["final_boxes"]).abs().max() <= 1e-3


def test_detect_cli_with_gt_json_reproduces_original(tmp_path, rn50_ckpts, parity_gt, shared_dir):
    """`regionclip detect --boxes gt_boxes.json` (integer COCO boxes, original-image pixels) gives the original's
    GT-mode detections: the integer boxes are scaled and truncated exactly as detectron2's mapper does."""
    import json

    from regionclip.assets import demo_image_paths
    from regionclip.cli.main import main

    out = tmp_path / "det"
    rc = main(["detect", *[str(p) for p in demo_image_paths()], "--weights", str(rn50_ckpts["regionclip"]),
               "--preset", "coco-gt", "--boxes", str(shared_dir / "parity" / "gt_boxes.json"),
               "--concept-emb", str(rn50_ckpts["concept_emb"]), "-o", str(out), "--no-vis"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    coco_ids = [c["coco_id"] for c in __import__("regionclip").assets.coco_ovd_categories()]
    for image_id, name in ((1, "sample_img1.jpg"), (2, "sample_img2.jpg")):
        ref = parity_gt["images"][name]
        ours = [r for r in results if r["image_id"] == image_id]
        assert [r["category_id"] for r in ours] == [coco_ids[c] for c in ref["final_classes"].tolist()]
        torch.testing.assert_close(torch.tensor([r["score"] for r in ours]), ref["final_scores"], rtol=1e-4, atol=1e-5)
        xyxy = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (r["bbox"] for r in ours)])
        assert (xyxy - ref["final_boxes"]).abs().max() <= 1e-3
