"""Nothing lost, whatever the input (issue 14): per-image errors with names, the other images' outputs complete and
identical to a clean run, validated class embeddings at every entry point, interrupted runs resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _region_helpers import write_images
from regionclip.api import RegionCLIP
from regionclip.cli.main import main
from regionclip.pipeline import Pipeline
from regionclip.predictor import RegionPredictor




def _setup(tmp_path: Path) -> tuple[list[Path], Path]:
    imgs = write_images(tmp_path / "imgs", [(60, 80), (60, 70), (64, 64), (90, 100)])
    (tmp_path / "imgs" / "img004.png").write_bytes(b"not an image at all")
    boxes = {p.name: [[2, 3, 40, 30], [10, 10, 50, 45]] for p in imgs}
    boxes["img004.png"] = [[1, 1, 5, 5]]
    return imgs, tmp_path / "boxes.json", boxes


def _detect(tmp_path: Path, ckpt: Path, emb: Path, boxes: Path, out: str, *extra: str) -> int:
    return main(["detect", str(tmp_path / "imgs"), "--weights", str(ckpt), "--concept-emb", str(emb),
                 "--vocab", "a,b,c", "--boxes", str(boxes), "--score-thresh", "0", "--num-workers", "0",
                 "--no-vis", "--quiet", "-o", str(tmp_path / out), *extra])


def _results(tmp_path: Path, out: str) -> dict:
    res = json.loads((tmp_path / out / "results.json").read_text())
    by: dict = {}
    for r in res:
        by.setdefault(r["image_id"], []).append((r["category_id"], [round(v, 4) for v in r["bbox"]],
                                                 round(r["score"], 6)))
    return by


def test_bad_boxes_unreadable_and_oversized_images_are_skipped_by_name(tmp_path, tiny_ckpt, emb_file, capsys):
    imgs, boxes_path, boxes = _setup(tmp_path)
    good = {k: v for k, v in boxes.items() if k != "img004.png"}
    boxes_path.write_text(json.dumps(good | {"img004.png": []}))
    tmp_clean = tmp_path / "clean"
    (tmp_clean / "imgs").mkdir(parents=True)
    for p in imgs:
        (tmp_clean / "imgs" / p.name).write_bytes(p.read_bytes())
    (tmp_clean / "b.json").write_text(json.dumps(good))
    assert _detect(tmp_clean, tiny_ckpt, emb_file, tmp_clean / "b.json", "out") == 0
    clean = _results(tmp_clean, "out")

    bad = dict(good)
    bad["img001.png"] = [[10, 10, 50, 45], [30, 5, 20, 40]]  # x2 < x1 in box 1
    bad["img002.png"] = [[float("nan"), 1, 5, 5]]
    boxes_path.write_text(json.dumps(bad | {"img004.png": [[1, 1, 5, 5]]}))
    capsys.readouterr()
    rc = _detect(tmp_path, tiny_ckpt, emb_file, boxes_path, "out", "--max-pixels", "6000")
    err = capsys.readouterr().err
    assert rc == 1
    assert "img001.png" in err and "box 1" in err and str(boxes_path) in err  # image, box index and file named
    assert "img002.png" in err and "NaN" in err
    assert "img004.png" in err  # unreadable
    assert "img003.png" in err and ("6000" in err or "6,000" in err)  # 90x100 px over the 6000-pixel limit
    got = _results(tmp_path, "out")
    # img000 is the only image that is readable, under the limit and has valid boxes; its output equals the clean run
    assert got == {1: clean[1]}


def test_interrupted_detect_resumes_exactly_once(tmp_path, tiny_ckpt, emb_file, monkeypatch, capsys):
    imgs, boxes_path, boxes = _setup(tmp_path)
    (tmp_path / "imgs" / "img004.png").unlink()
    del boxes["img004.png"]
    boxes_path.write_text(json.dumps(boxes))
    assert _detect(tmp_path, tiny_ckpt, emb_file, boxes_path, "clean") == 0
    calls = {"n": 0}
    orig = Pipeline.detect_prepared

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(Pipeline, "detect_prepared", flaky)
    capsys.readouterr()
    assert _detect(tmp_path, tiny_ckpt, emb_file, boxes_path, "run") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()[-1]) < 200
    journal = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 2  # meta + the two images finished before Ctrl-C
    monkeypatch.setattr(Pipeline, "detect_prepared", orig)
    seen = []
    monkeypatch.setattr(Pipeline, "detect_prepared", lambda self, p, *a, **k: seen.extend(p) or orig(self, p, *a, **k))
    assert _detect(tmp_path, tiny_ckpt, emb_file, boxes_path, "run") == 0
    assert len(seen) == 2  # only the two missing images ran
    assert _results(tmp_path, "run") == _results(tmp_path, "clean")
    keys = [json.loads(x).get("key") for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 4


@pytest.mark.parametrize("problem", ["nan", "inf", "zero", "width"])
def test_bad_class_embeddings_are_refused_everywhere(tmp_path, tiny_ckpt, problem, capsys):
    emb = torch.randn(3, 16)
    if problem == "nan":
        emb[1, 4] = float("nan")
    elif problem == "inf":
        emb[2, 0] = float("inf")
    elif problem == "zero":
        emb[0] = 0
    else:
        emb = torch.randn(3, 12)
    f = tmp_path / "bad.pth"
    torch.save(emb, f)
    want = {"nan": "row", "inf": "row", "zero": "all zeros", "width": "12-d"}[problem]
    model = RegionCLIP.from_pretrained(tiny_ckpt, preset="coco-gt")
    with pytest.raises(ValueError, match=want):  # file, API
        model.set_vocabulary(["a", "b", "c"], f)
    with pytest.raises(ValueError, match=want):  # tensor, API
        model.set_vocabulary(["a", "b", "c"], emb)
    with pytest.raises(ValueError, match=want):  # tensor, predictor
        RegionPredictor(model).vocabulary((["a", "b", "c"], emb))
    img = write_images(tmp_path / "i", [(40, 40)])[0]
    rc = main(["detect", str(img), "--weights", str(tiny_ckpt), "--concept-emb", str(f), "--vocab", "a,b,c",
               "--preset", "coco-gt", "--no-vis", "--quiet", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(f) in err and want in err


def test_cheap_argument_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model must not load for a bad argument")

    monkeypatch.setattr(RegionCLIP, "load", boom)
    img = write_images(tmp_path, [(40, 40)])[0]
    assert main(["detect", str(img), "--vocab", "", "-o", str(tmp_path / "o")]) == 2
    assert "empty vocabulary" in capsys.readouterr().err
    assert main(["detect", str(img), "--vocab", "a,,b", "-o", str(tmp_path / "o")]) == 2
    assert "empty name" in capsys.readouterr().err
    assert main(["detect", str(img), "--vocab", "a", "--concept-emb", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err


class _Custom:
    """A class weights_only loading refuses to import (pickled by reference to this module)."""


def test_bad_checkpoint_messages_say_the_right_thing(tmp_path):
    from regionclip.checkpoint.io import CheckpointError, read_weight_file

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": _Custom()}, unsafe)  # a pickled object weights_only refuses
    with pytest.raises(CheckpointError) as e:
        read_weight_file(unsafe)
    msg = str(e.value)
    assert "weights_only=True" in msg and "re-download" in msg
    assert "weights_only=False" not in msg and "TorchScript" in msg  # never the advice to run code from the file
    truncated = tmp_path / "truncated.pth"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(100)}, good)
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch weight file"):
        read_weight_file(truncated)
