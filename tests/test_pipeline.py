"""The one inference pipeline: each bug of the five hand-assembled front ends has a test here (issue 13), plus the
exact work skipping of the raw-logit presets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _region_helpers import tiny_checkpoint_state, tiny_options, tiny_pipeline, tiny_vocab, write_images, write_tiny_checkpoint
from regionclip.api import RegionCLIP
from regionclip.assets import coco_ovd_categories
from regionclip.cli.main import main
from regionclip.config import PostprocessConfig
from regionclip.data.datasets import load_annotations
from regionclip.evaluation.inference import dataset_predictor
from regionclip.modeling.detector import RegionCLIPDetector
from regionclip.ops.boxes import scale_boxes_like_d2
from regionclip.pipeline import RunOptions
from regionclip.structures import Detections


@pytest.fixture
def tiny_rpn_ckpt(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny_pretrained_rpn.pth", rpn=True)


def test_defaults_without_preset_follow_the_checkpoint_kind(tmp_path, tiny_rpn_ckpt) -> None:
    # pretrained + RPN: the original's zero-shot RPN settings (NMS 0.9, 1000 proposals, raw-logit multiplication)
    m = RegionCLIP.from_pretrained(tiny_rpn_ckpt)
    assert m.settings.kind == "pretrained" and m.settings.regions == "rpn"
    assert m.detector.rpn.cfg.nms_thresh == 0.9 and m.detector.rpn.cfg.post_nms_topk == 1000
    assert m.settings.postprocess.rpn_score == "raw"
    assert "NMS 0.9" not in m.settings.describe() or "nms_thresh=0.9" in m.settings.describe()
    # a fine-tuned LVIS checkpoint: the LVIS test settings, not COCO's
    ft = tmp_path / "ft_lvis.pth"
    torch.save({"model": tiny_checkpoint_state(rpn=True, finetuned_rows=1203)}, ft)
    m2 = RegionCLIP.from_pretrained(ft)
    pp = m2.settings.postprocess
    assert m2.settings.kind == "finetuned-lvis"
    assert (pp.score_thresh, pp.detections_per_image, pp.rpn_score) == (0.02, 300, "raw")
    assert pp.soft_nms == "gaussian" and pp.apply_box_deltas
    assert len(m2.vocabulary) == 1203 and m2.vocabulary.category_ids[:3] == (1, 2, 3)  # embedded test classes
    # an explicit preset still wins at load time; a post-processing value is a per-call choice
    m3 = RegionCLIP.from_pretrained(ft, preset="coco-gt")
    assert m3.run_options(score_thresh=0.5).postprocess.score_thresh == 0.5
    assert m3.settings.regions == "gt" and m3.detector.rpn is None


def test_detect_batch_size_batches_the_model(tmp_path, tiny_rpn_ckpt, demo_images, monkeypatch) -> None:
    seen = []
    orig = RegionCLIPDetector.compute_features

    def spy(self, images):
        seen.append(len(images))
        return orig(self, images)

    monkeypatch.setattr(RegionCLIPDetector, "compute_features", spy)
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    rc = main(["detect", *map(str, demo_images), "--weights", str(tiny_rpn_ckpt), "--vocab", "cat,dog",
               "--batch-size", "2", "--num-workers", "0", "--no-vis", "--quiet", "-o", str(tmp_path / "out")])
    assert rc == 0 and seen == [2]  # both 1920x1080 demo images went through one backbone pass


def test_vocab_aliases_get_dataset_category_ids(tmp_path, tiny_rpn_ckpt, demo_images, monkeypatch) -> None:
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    coco_ids = [c["coco_id"] for c in coco_ovd_categories()]
    rc = main(["detect", str(demo_images[0]), "--weights", str(tiny_rpn_ckpt), "--vocab", "coco", "--no-vis",
               "--quiet", "--num-workers", "0", "--score-thresh", "0", "--max-proposals", "20",
               "-o", str(tmp_path / "out")])
    assert rc == 0
    cats = json.loads((tmp_path / "out" / "images.json").read_text())["categories"]
    assert [c["id"] for c in cats] == coco_ids and max(coco_ids) > 65  # COCO ids, not 1..65
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(coco_ids)


def test_detections_to_keeps_every_field() -> None:
    d = Detections(torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.long), (5, 6), ["a"],
                   region_index=torch.tensor([3]), features=torch.ones(1, 2), image_id=7, file_name="x.jpg")
    e = d.to("cpu")
    assert e.image_id == 7 and e.file_name == "x.jpg" and torch.equal(e.features, d.features)
    assert torch.equal(e.region_index, d.region_index)


def _coco_json(tmp_path: Path, images: list[Path]) -> Path:
    data = {"images": [{"id": i + 1, "file_name": p.name, "height": 90, "width": 140} for i, p in enumerate(images)],
            "categories": [{"id": 1, "name": "c0"}, {"id": 2, "name": "c1"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [7, 9, 33, 41], "iscrowd": 0,
                             "area": 1.0}]}  # image 2 has no annotation
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_gt_evaluation_truncates_whole_number_boxes_and_allows_empty_images(tmp_path) -> None:
    """The same predictor serves `regionclip evaluate` and evaluation during training (both call
    dataset_predictor): whole-number json boxes are truncated after scaling, an image without annotations gets
    no detections instead of an error."""
    paths = write_images(tmp_path / "imgs", [(90, 140), (90, 140)])
    ds = load_annotations(_coco_json(tmp_path, paths), tmp_path / "imgs")
    pipe = tiny_pipeline(seed=1)
    vocab = tiny_vocab(2)
    seen = []
    orig = pipe.detect_prepared

    def spy(prepared, vocabulary, options, *, regions=None, features=None):
        seen.extend(r.boxes.clone() for r in regions)
        return orig(prepared, vocabulary, options, regions=regions, features=features)

    pipe.detect_prepared = spy  # type: ignore[method-assign]
    dets = [d for _, d in dataset_predictor(pipe, vocab, tiny_options(), "gt")(list(ds))]
    assert len(dets) == 2 and len(dets[1]) == 0 and dets[1].image_id == ds.records[1].image_id
    p = pipe.prepare(paths[0])
    want = scale_boxes_like_d2(torch.tensor([[7, 9, 40, 50]]), *p.scale_xy, truncate=True)
    assert torch.equal(seen[0], want) and not torch.equal(want, want.round() + 0.5)  # whole pixels: truncated


def test_skipping_unreachable_proposals_is_exact() -> None:
    """raw-logit multiplication: proposals with sqrt(logit) <= score_thresh are not encoded, detections identical."""
    pipe = tiny_pipeline(seed=2, rpn=True, min_size=128, max_size=192)
    vocab = tiny_vocab(4)
    rng = np.random.default_rng(0)
    img = torch.from_numpy((rng.random((3, 150, 190)) * 255).astype(np.uint8))
    prepared = [pipe.prepare(img)]
    props = pipe.proposals(prepared, RunOptions())
    logits = props[0].objectness_logits
    thresh = float(logits.float().quantile(0.6).clamp(min=0) ** 0.5)  # ~60 % of the proposals unreachable
    for soft in (None, "gaussian"):
        post = PostprocessConfig(score_thresh=thresh, rpn_score="raw", detections_per_image=50, soft_nms=soft)
        encoded = []
        orig = pipe.encode

        def spy(features, boxes, options, encoded=encoded, orig=orig):
            encoded.append(sum(len(b) for b in boxes))
            return orig(features, boxes, options)

        pipe.encode = spy  # type: ignore[method-assign]
        fast = pipe.detect_prepared(prepared, vocab, RunOptions(postprocess=post), regions=props)[0]
        full = pipe.detect_prepared(prepared, vocab, RunOptions(postprocess=post, skip_unreachable=False),
                                    regions=props)[0]
        pipe.encode = orig  # type: ignore[method-assign]
        assert encoded[1] == len(logits) and 0 < encoded[0] < 0.6 * len(logits)
        assert len(full) > 0
        for f in ("boxes", "scores", "labels", "region_index"):
            assert torch.equal(getattr(fast, f), getattr(full, f)), f


def test_max_proposals_keeps_the_best_ones() -> None:
    pipe = tiny_pipeline(seed=2, rpn=True)
    img = torch.from_numpy((np.random.default_rng(1).random((3, 96, 120)) * 255).astype(np.uint8))
    prepared = [pipe.prepare(img)]
    allp = pipe.proposals(prepared, RunOptions())[0]
    top = pipe.proposals(prepared, RunOptions(max_proposals=5))[0]
    assert torch.equal(top.boxes, allp.boxes[:5]) and torch.equal(top.objectness_logits, allp.objectness_logits[:5])
