"""`regionclip detect` end to end: tiny checkpoints (fast) and the README command with full-size random
official-format weights (slow)."""
import json
from pathlib import Path

import pytest
import torch

from _region_helpers import write_tiny_checkpoint
from regionclip.cli.main import main


@pytest.fixture
def tiny_ckpt_with_text(tmp_path):
    """A tiny RegionCLIP-layout checkpoint: backbone.* (CLIP ResNet, 16-d) and lang_encoder.* (CLIP text tower)."""
    return write_tiny_checkpoint(tmp_path / "tiny_regionclip.pth")


def _boxes_file(tmp_path, demo_images):
    boxes = {demo_images[0].name: [[100, 100, 900, 700], [1000, 200, 1500, 900], [120, 110, 880, 690]],
             demo_images[1].name: [[0, 0, 1920, 1080], [500, 500, 600, 650]]}
    p = tmp_path / "boxes.json"
    p.write_text(json.dumps(boxes))
    return p


def test_detect_boxes_runtime_vocab_equals_concept_file(tmp_path, demo_images, tiny_ckpt_with_text, monkeypatch, capsys):
    """The embed-concepts file and the runtime vocabulary give the same detections (issue: vocabulary)."""
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    boxes = _boxes_file(tmp_path, demo_images)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ntraffic cone\nforklift\n")
    emb = tmp_path / "emb.pth"
    assert main(["embed-concepts", str(vocab), "-o", str(emb), "--weights", str(tiny_ckpt_with_text),
                 "--no-progress"]) == 0
    common = ["--weights", str(tiny_ckpt_with_text), "--preset", "coco-gt", "--boxes", str(boxes), "--vocab", str(vocab),
              "--score-thresh", "0.0"] + [str(p) for p in demo_images]
    assert main(["detect", "-o", str(tmp_path / "a"), "--no-vis"] + common) == 0
    assert main(["detect", "-o", str(tmp_path / "b"), "--concept-emb", str(emb)] + common) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(a) > 0 and [(r["image_id"], r["category_id"]) for r in a] == [(r["image_id"], r["category_id"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["bbox"] == pytest.approx(rb["bbox"], abs=1e-3) and ra["score"] == pytest.approx(rb["score"], rel=1e-4)
    meta = json.loads((tmp_path / "b" / "images.json").read_text())
    assert [c["name"] for c in meta["categories"]] == ["cat", "traffic cone", "forklift"]
    assert {r["image_id"] for r in a} == {1, 2}
    assert (tmp_path / "b" / f"{demo_images[0].stem}_vis.jpg").exists()
    out = capsys.readouterr().out
    assert "images/s" in out


def test_detect_cli_errors_are_one_line(tmp_path, demo_images, tiny_ckpt_with_text, capsys):
    assert main(["detect", "--weights", str(tmp_path / "nope.pth"), str(demo_images[0])]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["detect", "--weights", str(tiny_ckpt_with_text), "--preset", "coco-gt", "--vocab", " , ",
                 "-o", str(tmp_path / "o"), str(demo_images[0])]) == 2
    assert "empty name" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_detect_command_with_random_official_weights(tmp_path, rn50_ckpts, capsys):
    """The README's detect command (preset `custom`: RPN regions, LVIS-1203 vocabulary) with local random
    official-format files: writes results.json, images.json, annotated images and reports images/s."""
    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "lvis_1203_random.pth"
    torch.save(torch.randn(1203, 1024, generator=g), emb)
    rc = main(["detect", "-o", str(tmp_path / "demo"), "--weights", str(rn50_ckpts["regionclip"]),
               "--rpn-weights", str(rn50_ckpts["rpn"]), "--concept-emb", str(emb), "--vocab", "lvis1203"])
    assert rc == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    meta = json.loads((tmp_path / "demo" / "images.json").read_text())
    assert len(meta["images"]) == 2 and len(meta["categories"]) == 1203
    assert 0 < len(res) <= 2 * 300
    assert all(1 <= r["category_id"] <= 1203 and r["score"] > 0.02 for r in res)
    assert (tmp_path / "demo" / "sample_img1_vis.jpg").exists()
    print(capsys.readouterr().out)


def test_unreadable_image_is_skipped_and_reported(tmp_path, demo_images, tiny_ckpt_with_text, capsys):
    """A corrupt file in a folder: the other images' results are written, the bad one is named, exit code 1."""
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(demo_images[0], folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    shutil.copy(demo_images[1], folder / "c.jpg")
    emb = tmp_path / "emb.pth"
    torch.save(torch.randn(2, 16), emb)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({n: [[10, 10, 500, 400]] for n in ("a.jpg", "b.jpg", "c.jpg")}))
    rc = main(["detect", str(folder), "--weights", str(tiny_ckpt_with_text), "--preset", "coco-gt", "--boxes",
               str(boxes), "--vocab", "cat,dog", "--concept-emb", str(emb), "--batch-size", "2", "-o",
               str(tmp_path / "out"), "--no-vis"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "b.jpg" in err and "skipped" in err
    meta = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [Path(m["file_name"]).name for m in meta["images"]] == ["a.jpg", "c.jpg"]
    assert [m["id"] for m in meta["images"]] == [1, 3]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["image_id"] for r in res} == {1, 3}
