"""End-to-end region-text pretraining on tiny towers and a synthetic caption set stored in all three formats:
the loss goes down, frozen parts stay frozen, the checkpoint has the original layout, loads in
``load_detector`` / ``embed-concepts`` and detects, and ``--resume`` continues the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _pretrain_helpers import synthetic_pairs, tiny_config, write_jsonl, write_tar_shards, write_tsv

from regionclip.checkpoint.io import read_weight_file
from regionclip.cli.main import main
from regionclip.data.captions import CaptionDataset, ConcatCaptions, open_caption_source
from regionclip.engine.pretrain import build_pretrainer, load_pretrain_config
from regionclip.engine.train import latest_checkpoint, step_generator
from regionclip.modeling.pretrainer import whole_image_boxes

MAX_ITER = 10


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    pairs = synthetic_pairs(8)
    paths = [str(write_jsonl(tmp / "jsonl", pairs)), str(write_tar_shards(tmp / "tar", pairs)[0].parent),
             str(write_tsv(tmp / "tsv", pairs)[0])]
    cfg_path = tmp / "pretrain_tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp, paths, max_iter=MAX_ITER)))
    cfg = load_pretrain_config(cfg_path)
    # a fixed evaluation batch: all 8 images (from the three formats), fixed augmentation seeds
    data = CaptionDataset(ConcatCaptions([open_caption_source(p) for p in paths]), 64, 96)
    batch = [data[(i, 1000 + i)] for i in range(0, len(data), 3)]
    task = build_pretrainer(cfg)
    initial = {k: v.clone() for k, v in task.export_state_dict().items()}
    task.eval()
    with torch.no_grad():
        before = task(batch, generator=step_generator(0, 0, 0, 0))
    assert main(["pretrain", "--config", str(cfg_path)]) == 0
    return {"tmp": tmp, "cfg_path": cfg_path, "cfg": cfg, "task": task, "batch": batch, "before": before,
            "initial": initial, "pairs": pairs}


def test_config_defaults_are_the_original_schedule(tmp_path):
    cfg = load_pretrain_config(None)
    s = cfg.solver
    assert (s.base_lr, s.steps, s.max_iter, s.warmup_iters, s.ims_per_batch) == (0.002, (300000, 525000), 600000,
                                                                                  1000, 96)
    assert cfg.clip_grad_per_parameter == 5.0 and cfg.model.rpn_overrides == {"nms_thresh": 0.5,
                                                                              "post_nms_topk": 300}
    partial = load_pretrain_config(None, ["solver.max_iter=5"])
    assert partial.solver.warmup_iters == 1000 and partial.solver.max_iter == 5  # other fields keep pretrain values
    repo = Path(__file__).resolve().parents[1]
    for name, dim_hint in (("pretrain_rn50.yaml", "RN50_sd"), ("pretrain_rn50x4.yaml", "RN50x4_sd")):
        shipped = load_pretrain_config(repo / "configs" / name)
        assert shipped.solver.base_lr == 0.002 and shipped.pretrain.num_regions == 100
        assert dim_hint in shipped.model.clip_weights and shipped.clip_grad_per_parameter == 5.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {num_region: 3}\n")
    with pytest.raises(ValueError, match="num_region"):
        load_pretrain_config(bad)


def test_loss_goes_down(pretrained):
    lines = [json.loads(x) for x in (pretrained["tmp"] / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["total_loss"] for x in lines if "total_loss" in x]
    assert len(losses) == MAX_ITER and all(torch.isfinite(torch.tensor(losses)))
    task = pretrained["task"]
    ckpt = latest_checkpoint(pretrained["tmp"] / "out")
    task.load_export_state_dict(read_weight_file(pretrained["tmp"] / "out" / ckpt["model"]))
    with torch.no_grad():
        after = task(pretrained["batch"], generator=step_generator(0, 0, 0, 0))
    before = pretrained["before"]
    total = {k: sum(float(v) for n, v in d.items() if n.startswith("loss")) for k, d in (("b", before), ("a", after))}
    assert after["loss_img_txt_level"] < 0.8 * before["loss_img_txt_level"]
    assert total["a"] < total["b"], (before, after)


def test_checkpoint_layout_and_frozen_parts(pretrained):
    out = pretrained["tmp"] / "out"
    sd = read_weight_file(out / latest_checkpoint(out)["model"])
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"backbone", "teacher_backbone", "lang_encoder", "offline_backbone",
                        "offline_proposal_generator"}
    init = pretrained["initial"]
    assert set(sd) == set(init)
    changed = {k for k in sd if not torch.equal(sd[k], init[k])}
    assert changed and all(k.startswith("backbone.") for k in changed)  # teacher, text and RPN are frozen
    assert not any(k.startswith(("backbone.conv1", "backbone.layer1.")) for k in changed)  # FREEZE_AT 2
    assert any(k.startswith("backbone.attnpool.") for k in changed) and any("layer3" in k for k in changed)


def test_checkpoint_loads_in_load_detector_and_detects(pretrained):
    from regionclip.factory import load_detector, load_text_tower
    from regionclip.pipeline import Pipeline, RunOptions
    from regionclip.text.embeddings import concept_embeddings
    from regionclip.text.vocabulary import Vocabulary

    out = pretrained["tmp"] / "out"
    weights = out / latest_checkpoint(out)["model"]
    det, loaded = load_detector(weights)
    assert det.rpn is not None and loaded.report.ok
    assert set(loaded.split.teacher) and set(loaded.split.text_encoder)
    sd = read_weight_file(weights)
    torch.testing.assert_close(det.backbone.attnpool.c_proj.weight, sd["backbone.attnpool.c_proj.weight"])
    # the text encoder of the checkpoint (lang_encoder.*) gives the vocabulary, as embed-concepts does
    encoder = load_text_tower(weights)
    emb = concept_embeddings(["square", "circle"], encoder, templates=["a photo of a {}."])
    _, image, _ = pretrained["pairs"][0]
    vocab = Vocabulary.create(emb, ["square", "circle"], embed_dim=det.embed_dim)
    dets = Pipeline(det, loaded.config.input).detect([image], vocab, RunOptions())
    assert len(dets) == 1 and dets[0].boxes.shape[1] == 4 and len(dets[0]) > 0
    assert set(dets[0].names) <= {"square", "circle"}
    emb_file = pretrained["tmp"] / "emb.pth"
    assert main(["embed-concepts", "square,circle", "-o", str(emb_file), "--weights", str(weights),
                 "--no-progress"]) == 0
    assert read_weight_file(emb_file).shape == (2, 16)


def test_resume_continues_from_the_last_checkpoint(pretrained):
    tmp = pretrained["tmp"]
    assert main(["pretrain", "--config", str(pretrained["cfg_path"]), "--resume",
                 "--set", f"solver.max_iter={MAX_ITER + 2}", "--set", f"train.checkpoint_period={MAX_ITER + 2}"]) == 0
    lines = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    iters = [x["iteration"] for x in lines if "total_loss" in x]
    assert iters == list(range(1, MAX_ITER + 3))  # the resumed run appended iterations 11 and 12 only
    assert latest_checkpoint(tmp / "out")["iteration"] == MAX_ITER + 2


def test_whole_image_box_modes():
    padded = whole_image_boxes([(64, 80), (96, 70)], "padded")
    own = whole_image_boxes([(64, 80), (96, 70)], "image")
    assert [b.tolist() for b in padded] == [[[0, 0, 80, 96]]] * 2
    assert [b.tolist() for b in own] == [[[0, 0, 80, 64]], [[0, 0, 70, 96]]]
