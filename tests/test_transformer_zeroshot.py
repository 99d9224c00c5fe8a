"""Zero-shot-branch checkpoints (§11.3 key remapping, layouts, conversion) and end-to-end zero-shot runs with every
transformer family on the demo images (random tiny weights)."""
from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn.functional as F

from regionclip.api import RegionCLIP
from regionclip.assets import demo_image_paths
from regionclip.checkpoint.io import CheckpointError
from regionclip.checkpoint.zeroshot_branch import BRANCH_KEY_RULES, LANG, remap_branch_keys, transformer_layout
from regionclip.config import InputConfig, PostprocessConfig
from regionclip.factory import load_detector, load_text_tower
from regionclip.modeling.recognizer import RegionRecognizer, foreground_probs
from regionclip.factory.transformer import export_branch_state_dict
from regionclip.modeling.transformer.region_head import TransformerRegionDetector, TransformerRegionEncoder
from regionclip.modeling.transformer.vit import VisionTransformerTrunk
from regionclip.inference.postprocess import postprocess_detections
from regionclip.modeling.unicl_text import UniCLTextEncoder
from regionclip.text.unicl_embeddings import zeroshot_class_embeddings

SMALL_INPUT = InputConfig(min_size=128, max_size=224)
TINY_TIMM = {
    "swin": dict(patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=7),
    "davit": dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4)),
    "focalnet": dict(embed_dim=16, depths=(1, 1, 2, 1), focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3),
                     use_overlap_down=True, normalize_modulator=True, use_post_norm=True, layerscale_value=1e-4),
}


def tiny_detector(family: str, seed: int = 0) -> tuple[TransformerRegionDetector, UniCLTextEncoder]:
    """Random tiny detector of ``family`` and its 1-layer UniCL text tower (width 64, D = 32)."""
    torch.manual_seed(seed)
    if family == "vit":
        trunk = VisionTransformerTrunk(128, 2, 2, 16, 14, act="gelu", ln_eps=1e-6, patch_bias=True, ln_pre=False,
                                       final_norm="map")
    else:
        pytest.importorskip("timm")
        from regionclip.modeling.transformer.timm_trunks import TimmTrunk

        trunk = TimmTrunk(family, TINY_TIMM[family])
    text = UniCLTextEncoder(64, 1, 1, 32, autoregressive=family == "swin")
    det = TransformerRegionDetector(TransformerRegionEncoder(trunk, 32))
    with torch.no_grad():
        det.logit_scale.fill_(3.0)
        # timm zero-inits some biases / LN shifts; make every weight count
        for p in [*det.parameters(), *text.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    return det.eval(), text.eval()


def test_branch_key_remapping_every_rule_in_order() -> None:
    """One key per rule of spec §11.3, plus keys that show the order and the str.replace semantics."""
    # order matters: rule 6 claims lang_encoder.lang_encoder.* before rule 9 would prefix it a second time, and
    # rules 7/8 (exact keys) run before rule 9 (prefix); untouched keys stay as they are
    sd = {k: torch.zeros(1) for k in ["lang_encoder.lang_encoder.ln_final.weight", "lang_encoder.logit_scale",
                                      "lang_encoder.lang_proj", "backbone.blocks.0.norm1.weight", "image_projection"]}
    assert sorted(remap_branch_keys(sd)) == sorted([LANG + "lang_encoder.ln_final.weight", LANG + "logit_scale",
                                                    LANG + "lang_proj", "backbone.blocks.0.norm1.weight",
                                                    "image_projection"])
    # each rule separately, so collisions do not hide a rule
    expected = {
        "image_encoder.x": "backbone.x", "text_encoder.x": LANG + "lang_encoder.x", "text_projection": LANG + "lang_proj",
        "logit_scale": LANG + "logit_scale", "norm.bias": "backbone.norm.bias",
        "lang_encoder.lang_encoder.x": LANG + "lang_encoder.x", "lang_encoder.logit_scale": LANG + "logit_scale",
        "lang_encoder.lang_proj": LANG + "lang_proj", "lang_encoder.x": LANG + "lang_encoder.x",
        "lang_projection": LANG + "lang_proj",
    }
    assert len(expected) == len(BRANCH_KEY_RULES)
    for rule, (src, dst) in zip(BRANCH_KEY_RULES, expected.items()):
        assert remap_branch_keys({src: torch.zeros(1)}) == {dst: torch.zeros(1)}, rule
    # "any" rules replace inside a key, "prefix" rules only at the start (the original's str.replace calls)
    assert list(remap_branch_keys({"module.image_encoder.x": torch.zeros(1)})) == ["module.backbone.x"]
    assert list(remap_branch_keys({"a.text_encoder.x": torch.zeros(1)})) == ["a.text_encoder.x"]
    assert list(remap_branch_keys({"x.norm.weight": torch.zeros(1)})) == ["x.norm.weight"]


@pytest.mark.parametrize("spelling", ["model", "vit", "swin", "focalnet"])
def test_branch_checkpoint_round_trip(tmp_path, spelling: str) -> None:
    """Every spelling of the branch's files loads back into an identical detector (ViT trunk in timm layout) and an
    identical text tower (built by the factory, not held by the detector)."""
    det, text = tiny_detector("vit")
    sd = export_branch_state_dict(det, spelling, text_tower=text)
    assert any(k.startswith("image_encoder." if spelling == "swin" else "backbone.") for k in sd)
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    loaded, info = load_detector(tmp_path / "ckpt.pth", use_rpn=False)
    assert isinstance(loaded, TransformerRegionDetector) and info.report.ok and info.config is None
    assert loaded.state_dict().keys() == det.state_dict().keys()
    for k, v in det.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    assert any(k.startswith("text_encoder.") for k in info.report.ignored)  # set aside for the text-tower loader
    tower = load_text_tower(tmp_path / "ckpt.pth")
    assert isinstance(tower, UniCLTextEncoder) and tower.state_dict().keys() == text.state_dict().keys()
    for k, v in text.state_dict().items():
        torch.testing.assert_close(tower.state_dict()[k], v, msg=k)


def test_branch_vit_pos_embed_resized_to_model_grid_at_load() -> None:
    """A checkpoint with another grid is interpolated to the branch model's 14x14 (IMG_SIZE 224) when loading."""
    det, text = tiny_detector("vit")
    sd = export_branch_state_dict(det, text_tower=text)
    pos = sd["backbone.pos_embed"]
    cls, grid = pos[:, :1], pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    sd["backbone.pos_embed"] = torch.cat([cls, small.permute(0, 2, 3, 1).reshape(1, 49, -1)], dim=1)
    loaded, _ = load_detector_from_dict(sd)
    back = F.interpolate(small, size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(loaded.backbone.trunk.positional_embedding[1:],
                               back.permute(0, 2, 3, 1).reshape(196, -1))


def load_detector_from_dict(sd):
    from regionclip.factory.transformer import load_transformer_detector

    return load_transformer_detector(sd, use_rpn=False)


def test_microsoft_swin_layout_converts_through_timm_filter() -> None:
    """Microsoft's Swin puts each downsample at the end of a stage (timm: at the start of the next)."""
    det, text = tiny_detector("swin")
    sd = export_branch_state_dict(det, "swin", text_tower=text)
    ms = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
          for k, v in sd.items()}
    assert "image_encoder.layers.0.downsample.reduction.weight" in ms
    loaded, report = load_detector_from_dict(ms)
    assert report.ok
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.forward_dense(x), det.backbone.forward_dense(x))


def test_transformer_layout_detection(tmp_path) -> None:
    assert transformer_layout({"backbone.attnpool.c_proj.weight": torch.zeros(1)}) is None  # RegionCLIP ResNet
    assert transformer_layout({"visual.transformer.resblocks.0.ln_1.weight": torch.zeros(1)}) == "openai_vit"
    det, text = tiny_detector("vit")
    assert transformer_layout(export_branch_state_dict(det, "vit", text_tower=text)) == "branch"
    with pytest.raises(CheckpointError, match="visual.trunk"):
        transformer_layout({"visual.trunk.blocks.0.norm1.weight": torch.zeros(1)})


def test_missing_weights_give_clear_errors(tmp_path) -> None:
    det, text = tiny_detector("vit")
    sd = export_branch_state_dict(det, text_tower=text)
    no_proj = {k: v for k, v in sd.items() if k != "image_projection"}
    with pytest.raises(CheckpointError, match="no image projection"):
        load_detector_from_dict(no_proj)
    no_block = {k: v for k, v in sd.items() if not k.startswith("backbone.blocks.1.mlp.fc2.")}
    with pytest.raises(CheckpointError, match=r"MISSING 2: backbone\.trunk\.transformer\.resblocks\.1\.mlp\.c_proj"):
        load_detector_from_dict(no_block)
    only_text = {k: v for k, v in sd.items() if k.startswith(LANG) or k == "image_projection"}
    with pytest.raises(CheckpointError, match="no transformer image encoder found"):
        load_detector_from_dict(only_text)
    with pytest.raises(FileNotFoundError, match="weight file not found"):
        load_detector(tmp_path / "missing.pth")
    # no text tower: still loads; naming classes then asks for embeddings
    no_text = {k: v for k, v in sd.items() if not k.startswith(LANG)}
    det, report = load_detector_from_dict(no_text)
    assert report.ok
    with pytest.raises(ValueError, match="--concept-emb"):
        load_text_tower(no_text)


def test_missing_timm_names_the_extra(monkeypatch) -> None:
    from regionclip.modeling.transformer.timm_trunks import TimmTrunk

    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r"regionclip\[transformers\]"):
        TimmTrunk("swin", TINY_TIMM["swin"])


def test_postprocess_without_background_column() -> None:
    """has_background=False keeps the last column as a class (the ResNet path drops it)."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    cfg = PostprocessConfig(score_thresh=0.5, nms_thresh=0.5, detections_per_image=10)
    with_bg = postprocess_detections(boxes, scores, (40, 40), cfg)
    no_bg = postprocess_detections(boxes, scores, (40, 40), cfg, has_background=False)
    assert with_bg["labels"].tolist() == [0] and with_bg["region_index"].tolist() == [1]
    assert sorted(zip(no_bg["region_index"].tolist(), no_bg["labels"].tolist())) == [(0, 1), (1, 0)]


@pytest.mark.parametrize("family", ["vit", "swin", "davit", "focalnet"])
def test_end_to_end_zero_shot_on_demo_images(tmp_path, family: str) -> None:
    """Branch checkpoint file -> RegionCLIP.from_pretrained -> names -> detect with user boxes on the demo images."""
    det, text = tiny_detector(family)
    path = tmp_path / f"{family}.pth"
    torch.save(export_branch_state_dict(det, family if family != "davit" else "model", text_tower=text), path)
    model = RegionCLIP.from_pretrained(path)
    assert isinstance(model.detector, RegionRecognizer) and model.detector.has_background is False
    model.pipeline.input_cfg = SMALL_INPUT
    names = model.set_vocabulary(["cat", "dog", "person", "car"])
    images = [str(p) for p in demo_image_paths()]
    boxes = [[[0, 0, 600, 500], [300, 200, 1200, 900], [1000, 100, 1900, 1000]]] * len(images)
    d, pipe = model.detector, model.pipeline
    dets = model.detect(images, boxes, keep_probs=True, score_thresh=0.0, nms_thresh=0.5, detections_per_image=100)
    for img, det_i in zip(images, dets):
        assert det_i.probs.shape[1] == len(names)  # no background column
        torch.testing.assert_close(det_i.probs.sum(1), torch.ones(len(det_i.probs)))
        assert int(det_i.labels.max()) < len(names) and det_i.class_names == names
        # every (box, class) pair survives threshold 0 with NMS 0.5 on these distinct boxes
        assert len(det_i.scores) == 3 * len(names)
        # scores = softmax(exp(logit_scale) * cos) recomputed from the pieces
        prepared = pipe.prepare(img)
        regions = pipe.user_regions(boxes[0], prepared)  # same (integer) boxes as detect got
        with torch.no_grad():
            emb, _ = d.encode_regions(d.compute_features([prepared.image]), [regions.boxes], chunk_size=256)
        class_emb = model.vocabulary.class_embeddings
        probs = F.softmax(d.logit_scale.exp() * F.normalize(emb, dim=-1) @ F.normalize(class_emb, dim=-1).T, dim=-1)
        torch.testing.assert_close(det_i.scores, probs[det_i.region_index, det_i.labels], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(foreground_probs(d.has_background, probs), probs)
    assert not torch.allclose(dets[0].scores, dets[1].scores)  # the two images differ


def test_predictor_on_transformer_model_uses_every_class(tmp_path) -> None:
    """Box prompts through RegionPredictor: top class ranges over all K classes (no background column to drop)."""
    from regionclip.predictor import RegionPredictor

    det, text = tiny_detector("vit")
    path = tmp_path / "vit.pth"
    torch.save(export_branch_state_dict(det, "vit", text_tower=text), path)
    model = RegionCLIP.from_pretrained(path)
    model.pipeline.input_cfg = SMALL_INPUT
    pred = RegionPredictor(model)
    pred.set_image(str(demo_image_paths()[0]))
    boxes = torch.tensor([[0, 0, 600, 500], [300, 200, 1200, 900], [1000, 100, 1900, 1000]], dtype=torch.float32)
    out = pred.classify_boxes(boxes, ["cat", "dog"])
    assert out.probs.shape == (3, 2)
    torch.testing.assert_close(out.scores, out.probs.max(dim=1).values)
    assert out.labels.tolist() == out.probs.argmax(dim=1).tolist()


def test_evaluate_cli_runs_with_a_transformer_checkpoint(tmp_path) -> None:
    """`regionclip evaluate` (GT boxes, COCO-format json) accepts a zero-shot-branch ViT file."""
    import json

    from regionclip.cli.main import main

    det, text = tiny_detector("vit")
    path = tmp_path / "vit.pth"
    torch.save(export_branch_state_dict(det, "vit", text_tower=text), path)
    images = demo_image_paths()
    gt = {"images": [{"id": i + 1, "file_name": p.name, "height": 1080, "width": 1920} for i, p in enumerate(images)],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 400, 300], "area": 120000,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 2, "bbox": [500, 200, 300, 600], "area": 180000,
                           "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--dataset", str(tmp_path / "gt.json"), "--image-root", str(images[0].parent),
               "--preset", "coco-gt", "--weights", str(path), "-o", str(out), "--no-progress"])  # classes from the json
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "AP50" in metrics
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 2} and {r["image_id"] for r in results} == {1, 2}


def test_transformer_options_reach_the_loader(tmp_path) -> None:
    """--vit-act / transformer_options: what a file's shapes cannot tell changes the model; a ResNet file refuses."""
    det, text = tiny_detector("vit")
    path = tmp_path / "vit.pth"
    torch.save(export_branch_state_dict(det, "vit", text_tower=text), path)
    boxes = [[[0, 0, 600, 500], [300, 200, 1200, 900]]]
    img = [str(demo_image_paths()[0])]
    embs = []
    for act in ("gelu", "quick_gelu"):
        m = RegionCLIP.from_pretrained(path, transformer_options={"act": act})
        m.pipeline.input_cfg = SMALL_INPUT
        m.set_vocabulary(["cat", "dog"])
        embs.append(m.detect(img, boxes, keep_features=True)[0].features)
    assert not torch.allclose(embs[0], embs[1])
    from regionclip.modeling.clip_resnet import ModifiedResNet

    rn = tmp_path / "rn.pth"
    torch.save({"model": {"backbone." + k: v for k, v in ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 8).state_dict().items()}},
               rn)
    with pytest.raises(ValueError, match="transformer options"):
        RegionCLIP.from_pretrained(rn, transformer_options={"act": "gelu"})


def test_transformer_class_embeddings_are_disk_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    det, text = tiny_detector("vit")
    path = tmp_path / "vit.pth"
    torch.save(export_branch_state_dict(det, "vit", text_tower=text), path)
    m = RegionCLIP.from_pretrained(path)
    calls = []
    import regionclip.text.name_cache

    def counting(text_encoder, names, **kw):
        calls.append(list(names))
        return zeroshot_class_embeddings(text_encoder, names, **kw)

    monkeypatch.setattr(regionclip.text.name_cache, "zeroshot_class_embeddings", counting)
    first = m.embed_names(["cat", "dog"])
    again = m.embed_names(["dog", "cat", "bird"])  # only "bird" is new
    assert calls == [["cat", "dog"], ["bird"]]
    torch.testing.assert_close(again[:2], first.flip(0))
    torch.testing.assert_close(again[2:], zeroshot_class_embeddings(load_text_tower(path), ["bird"]))
    other = RegionCLIP.from_pretrained(path, transformer_options={"autoregressive": True})
    other.embed_names(["cat"])  # another text-tower setting: its own cache file
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
