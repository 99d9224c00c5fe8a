"""Trusted 16-bit inference (docs/DESIGN.md#cpu-speed): mixed precision by stage (modeling.detector.BF16_STAGES) and the
float32 refinement of the regions that decide the detections (regionclip.inference.precision)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.ops import box_iou
from _region_helpers import random_boxes, tiny_detector, tiny_options

from regionclip.config import InputConfig, PostprocessConfig
from regionclip.modeling.detector import BF16_STAGES
from regionclip.pipeline import Pipeline
from regionclip.inference.postprocess import combine_rpn_scores, postprocess_detections
from regionclip.inference.precision import decisive_regions
from regionclip.structures import Proposals
from regionclip.text.vocabulary import Vocabulary

BF16 = torch.bfloat16


def test_stage_policy_keeps_trunk_and_attnpool_float32_under_autocast():
    det = tiny_detector(0)
    img = [torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)]
    assert "layer4" in BF16_STAGES and "trunk" not in BF16_STAGES
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        feats = det.compute_features(img)
        assert feats.dtype == torch.float32  # trunk stays float32 (was bf16 under autocast)
        seen = {}
        hook = det.backbone.attnpool.register_forward_pre_hook(lambda m, a: seen.update(dtype=a[0].dtype))
        emb, _ = det.encode_regions(feats, [random_boxes(5, 96, 128)], chunk_size=4)
        hook.remove()
    assert seen["dtype"] == torch.float32 and emb.dtype == torch.float32
    with torch.no_grad():
        ref = det.compute_features(img)
    assert torch.equal(feats, ref)  # exactly the float32 trunk


def _softmax_scores(logits: torch.Tensor, obj: torch.Tensor, cfg: PostprocessConfig) -> torch.Tensor:
    probs = torch.softmax(torch.cat([logits, torch.zeros(len(logits), 1)], 1), dim=1)
    return combine_rpn_scores(probs, obj, cfg.rpn_score)


def _iou_agree(a: dict, b: dict) -> bool:
    """Every detection of ``a`` has one in ``b`` with the same class at IoU >= 0.5 (compare.py's agreement)."""
    if len(a["labels"]) == 0:
        return True
    ok = (box_iou(a["boxes"], b["boxes"]) >= 0.5) & (a["labels"][:, None] == b["labels"][None])
    return bool(ok.any(1).all())


@pytest.mark.parametrize("rpn_score,full", [("raw", True), ("raw", False), ("none", True)])
def test_decisive_regions_are_all_a_bounded_error_can_change(rpn_score, full):
    """The margin argument of regionclip.inference.precision, checked on random data: perturb every logit by at most the
    bound and replace only the non-decisive regions' scores by the perturbed ones: what is reported keeps its
    class and box (IoU >= 0.5) both ways - so refining the decisive regions alone is enough."""
    g = torch.Generator().manual_seed(0)
    r, k, d = 300, 20, 0.3
    boxes = random_boxes(r, 200, 300, seed=1)
    obj = torch.rand(r, generator=g) * 3 - 0.5
    cfg = PostprocessConfig(score_thresh=0.02, nms_thresh=0.5, detections_per_image=60 if full else 10_000,
                            rpn_score=rpn_score)
    power = 0.5 if rpn_score != "none" else 1.0
    for trial in range(5):
        logits = torch.randn(r, k, generator=g) * 2
        scan = _softmax_scores(logits, obj, cfg)
        sel = decisive_regions(scan, boxes, (200, 300), cfg, has_background=True, score_power=power,
                               logit_error=d)
        assert 0 < int(sel.sum()) < r  # the test means something: some regions are left out
        for _ in range(4):
            exact = _softmax_scores(logits + (torch.rand(r, k, generator=g) * 2 - 1) * d, obj, cfg)  # "float32"
            mixed = torch.where(sel[:, None], exact, scan)  # decisive regions refined, the rest from the scan
            a = postprocess_detections(boxes, exact, (200, 300), cfg)
            b = postprocess_detections(boxes, mixed, (200, 300), cfg)
            assert _iou_agree(a, b) and _iou_agree(b, a), f"trial {trial}"


def test_refined_bf16_detections_equal_float32():
    """The bf16 scan alone changes which detections are reported; the trusted path reports float32's."""
    det = tiny_detector(0)
    pipe = Pipeline(det, InputConfig(min_size=96, max_size=128))
    img = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    prepared = [pipe.prepare(img)]
    boxes = random_boxes(60, 96, 128, seed=3)
    obj = torch.rand(60, generator=torch.Generator().manual_seed(4)) * 2
    regions = [Proposals(boxes, obj)]
    post = PostprocessConfig(score_thresh=0.05, nms_thresh=0.5, detections_per_image=30, rpn_score="raw")
    f32_opts = tiny_options(16, post)
    # classes planted near 8 regions' own float32 embeddings: probabilities spread over several classes, so the
    # 1/0.01 temperature turns bf16 rounding into visible score changes (random classes give p ~ 1: no signal)
    emb = pipe.encode(pipe.features(prepared, f32_opts), [boxes[:8]], f32_opts)
    noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)) * emb.norm(dim=1).mean()
    vocab = Vocabulary.create(emb + 0.05 * noise, [f"c{i}" for i in range(8)], embed_dim=emb.shape[1])
    f32 = pipe.detect_prepared(prepared, vocab, f32_opts, regions=regions)[0]
    opts = tiny_options(16, post, dtype="bfloat16")
    assert opts.refine_float32  # the default
    scan = pipe.detect_prepared(prepared, vocab, replace(opts, refine_float32=False), regions=regions)[0]
    mixed = pipe.detect_prepared(prepared, vocab, opts, regions=regions)[0]
    assert len(f32.scores) == 30
    def pairs(d):
        return sorted(zip(d.region_index.tolist(), d.labels.tolist()))

    assert pairs(scan) != pairs(f32)  # the plain bf16 result reports other (region, class) pairs
    assert pairs(mixed) == pairs(f32)
    # decisive regions carry float32 scores; the others keep the scan's (bf16-level error)
    torch.testing.assert_close(mixed.scores.sort().values, f32.scores.sort().values, rtol=2e-2, atol=1e-4)
