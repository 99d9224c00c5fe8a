"""extract-regions: the three region sources, the sharded store, resuming (also after SIGKILL), the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from _region_helpers import (TINY_POST, random_boxes, tiny_detector, tiny_model, tiny_options, tiny_pipeline,
                             write_images)
from regionclip.data.loader import items_from_coco, items_from_inputs
from regionclip.engine.extract import (ExtractConfig, RegionStore, extract_regions, load_index, load_regions,
                                       original_name)
from regionclip.formats import match_boxes, read_boxes_file
from regionclip.ops.boxes import clip_boxes, nonempty, scale_boxes
from regionclip.pipeline import RunOptions, top_proposals
from regionclip.predictor import RegionPredictor
from regionclip.text.vocabulary import Vocabulary

TESTS = Path(__file__).resolve().parent
SIZES = [(90, 140), (120, 80), (90, 140), (64, 96), (90, 140)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    paths = write_images(root / "imgs", SIZES, seed=7)
    boxes = {p.name: random_boxes(4 + i, h, w, seed=i).numpy() for i, (p, (h, w)) in enumerate(zip(paths, SIZES))}
    return root, paths, boxes, torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def attach_boxes(items, boxes, source="boxes file"):
    """Each item with its boxes, matched as the CLI does (regionclip.formats.match_boxes)."""
    return [replace(it, boxes=b) for it, b in zip(items, match_boxes(items, boxes, source=source))]


def _shard_keys(out: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted((out / "shards").glob("shard-*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            keys += [im["key"] for im in json.loads(sf.metadata()["regionclip"])["images"]]
            assert all(sf.get_tensor(k).shape[0] >= 0 for k in sf.keys())  # every tensor readable
    return keys


def test_user_boxes_equal_gt_mode_detection_features(tmp_path, data) -> None:
    root, paths, boxes, emb = data
    model = tiny_model(seed=3)
    pipe, vocab = model.pipeline, Vocabulary.create(emb)
    items = attach_boxes(items_from_inputs([root / "imgs"]), boxes)
    extract_regions(pipe, items, tmp_path, ExtractConfig(regions="boxes", run=RunOptions(batch_size=2, chunk_size=3)),
                    vocabulary=vocab, progress=False)
    got = load_regions(tmp_path)
    assert sorted(got) == sorted(p.name for p in paths)
    for p in paths:
        rec = got[p.name]
        assert torch.equal(rec["boxes"], torch.as_tensor(boxes[p.name]))
        ref = pipe.detect([p], vocab, tiny_options(keep_probs=True, keep_features=True), boxes=[boxes[p.name]])[0]
        assert len(ref) > 0
        torch.testing.assert_close(rec["feats"][ref.region_index], ref.features, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["probs"][ref.region_index], ref.probs, rtol=1e-5, atol=1e-6)
        pred = RegionPredictor(model).set_image(p)
        torch.testing.assert_close(rec["feats"], pred.encode_boxes(boxes[p.name]), rtol=1e-5, atol=1e-6)
        assert torch.equal(rec["classes"], rec["probs"][:, :-1].argmax(1))


def test_rpn_regions_are_topk_proposals_in_original_frame(tmp_path, data) -> None:
    root, paths, _, _ = data
    pipe = tiny_pipeline(seed=4, rpn=True)
    det = pipe.model
    extract_regions(pipe, items_from_inputs(paths[:2]), tmp_path, ExtractConfig(regions="rpn", run=RunOptions(max_proposals=12)),
                    progress=False)
    for p in paths[:2]:
        rec = load_regions(tmp_path, str(p))
        prepared = pipe.prepare(p)
        with torch.no_grad():
            props = top_proposals(det.propose([prepared.image]), 12)[0]
            feats, _ = det.encode_regions(det.compute_features([prepared.image]), [props.boxes], chunk_size=256)
        b = clip_boxes(scale_boxes(props.boxes, 1 / prepared.scale_xy[0], 1 / prepared.scale_xy[1]),
                       *prepared.original_hw)
        keep = nonempty(b)
        assert rec["boxes"].shape == (int(keep.sum()), 4) and 0 < len(rec["boxes"]) <= 12
        torch.testing.assert_close(rec["boxes"], b[keep])
        torch.testing.assert_close(rec["feats"], feats[keep], rtol=1e-5, atol=1e-6)
        assert torch.equal(rec["objectness"], props.objectness_logits[keep])
        assert (rec["objectness"][:-1] >= rec["objectness"][1:]).all()  # objectness order, as the original


def test_detection_regions_mode_b_and_original_format(tmp_path, data) -> None:
    root, paths, _, emb = data
    pipe = tiny_pipeline(seed=5, rpn=True)
    det, vocab = pipe.model, Vocabulary.create(emb, ["a", "b", "c"])
    cfg = ExtractConfig(regions="detections", run=RunOptions(postprocess=TINY_POST, max_proposals=20),
                        write_original=True)
    extract_regions(pipe, items_from_inputs(paths[:2]), tmp_path, cfg, vocabulary=vocab, progress=False)
    assert load_index(tmp_path)["class_names"] == ["a", "b", "c"]
    for p in paths[:2]:
        rec = load_regions(tmp_path, str(p))
        prepared = pipe.prepare(p)
        props = top_proposals(det.propose([prepared.image]), 20)
        ref = pipe.detect_prepared([prepared], vocab, tiny_options(keep_probs=True, keep_features=True),
                                   regions=props)[0]
        assert len(ref) > 0 and torch.equal(rec["classes"], ref.labels)
        torch.testing.assert_close(rec["boxes"], ref.boxes)
        torch.testing.assert_close(rec["probs"], ref.probs)
        torch.testing.assert_close(rec["feats"], ref.features)
        assert rec["probs"].shape[1] == 4  # K + 1, background last
        orig = torch.load(tmp_path / "original" / original_name(p.name), weights_only=True)
        assert sorted(orig) == ["boxes", "classes", "feats", "probs"]  # exactly the original's mode-B dict
        assert torch.equal(orig["feats"], rec["feats"]) and torch.equal(orig["classes"], rec["classes"])
    assert original_name("dir/a.b.jpg") == "a.pth"


def test_resume_skips_done_images_and_rejects_other_settings(tmp_path, data) -> None:
    root, paths, boxes, _ = data
    pipe = tiny_pipeline(seed=6)
    items = attach_boxes(items_from_inputs(paths), {k: v for k, v in boxes.items()})
    cfg = ExtractConfig(regions="boxes", shard_images=2)
    first = extract_regions(pipe, items[:3], tmp_path, cfg, progress=False)
    assert first.num_done_before == 0 and len(list((tmp_path / "shards").glob("*.safetensors"))) == 2
    second = extract_regions(pipe, items, tmp_path, cfg, progress=False)
    assert second.num_done_before == 3
    keys = _shard_keys(tmp_path)
    assert sorted(keys) == sorted(it.key for it in items) and len(keys) == len(set(keys))
    index = load_index(tmp_path)
    assert index["num_images"] == 5 and index["num_regions"] == sum(len(b) for b in boxes.values())
    with pytest.raises(ValueError, match="other settings"):
        extract_regions(pipe, items, tmp_path, ExtractConfig(regions="boxes", run=RunOptions(dtype="bfloat16")),
                        progress=False)
    with RegionStore(tmp_path / "locked", {"x": 1}):
        with pytest.raises(RuntimeError, match="another extraction"):
            RegionStore(tmp_path / "locked", {"x": 1})  # same process
        code = ("from regionclip.engine.extract import RegionStore\n"
                f"RegionStore({str(tmp_path / 'locked')!r}, {{'x': 1}})")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert other.returncode != 0 and "another extraction" in other.stderr  # other process
    RegionStore(tmp_path / "locked", {"x": 1}).close()  # released on exit


def test_bad_boxes_and_unreadable_images_are_reported_not_fatal(tmp_path, data) -> None:
    from regionclip.data.loader import InferenceItem

    root, paths, boxes, _ = data
    bad = dict(boxes)
    bad[paths[1].name] = np.array([[50, 50, 40, 60]], np.float32)  # x2 < x1
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = attach_boxes(items_from_inputs(paths[:3]), bad)
    items.append(InferenceItem("broken", str(tmp_path / "broken.png"), boxes=np.zeros((0, 4), np.float32)))
    s = extract_regions(tiny_pipeline(), items, tmp_path / "out", ExtractConfig(regions="boxes"), progress=False)
    index = load_index(tmp_path / "out")
    assert s.num_errors == 2 and index["num_images"] == 2
    errors = {e["key"]: e["error"] for e in index["errors"]}
    assert "negative width" in errors[str(paths[1])] and "broken.png" in errors["broken"]


def test_box_files_and_coco_items(tmp_path, data) -> None:
    root, paths, boxes, _ = data
    csv_path = tmp_path / "b.csv"
    csv_path.write_text("file_name,x1,y1,x2,y2\n" + "".join(
        f"{k},{','.join(str(float(v)) for v in row)}\n" for k, b in boxes.items() for row in b))
    parsed = read_boxes_file(csv_path)
    assert sorted(parsed) == sorted(boxes)
    np.testing.assert_allclose(parsed[paths[0].name], boxes[paths[0].name], rtol=1e-6)
    coco = {"images": [{"id": 11, "file_name": paths[0].name, "height": 90, "width": 140}],
            "categories": [{"id": 5, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 11, "category_id": 5, "bbox": [10, 10, 20, 30], "iscrowd": 0},
                            {"id": 2, "image_id": 11, "category_id": 5, "bbox": [0, 0, 50, 50], "iscrowd": 1}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    items = items_from_coco(tmp_path / "coco.json", root / "imgs")
    assert items[0].key == "11" and items[0].boxes.tolist() == [[10, 10, 30, 40]]  # crowd dropped, XYXY
    assert items[0].category_ids.tolist() == [5]
    assert read_boxes_file(tmp_path / "coco.json")[paths[0].name].tolist() == [[10, 10, 30, 40]]
    with pytest.raises(ValueError, match="no boxes for image"):
        attach_boxes(items_from_inputs(paths[:1]), {"other.png": boxes[paths[0].name]})


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from _region_helpers import tiny_pipeline
from regionclip.data.loader import items_from_inputs
from regionclip.engine.extract import ExtractConfig, extract_regions
from regionclip.pipeline import RunOptions

pipe = tiny_pipeline(seed=8, rpn=True)
if {slow}:
    inner = pipe.model.encode_regions
    def slow(*a, **k):
        time.sleep(0.3)  # a slow model, so the parent can kill the run half-way
        return inner(*a, **k)
    pipe.model.encode_regions = slow
extract_regions(pipe, items_from_inputs([{imgs!r}]), {out!r},
                ExtractConfig(regions="rpn", run=RunOptions(max_proposals=10, num_workers=1, batch_size=2), shard_images=2),
                progress=False)
"""


def _run_script(tmp_path: Path, imgs: Path, out: Path, slow: bool) -> subprocess.Popen:
    script = tmp_path / f"run_{'slow' if slow else 'fast'}.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(tests=str(TESTS), slow=slow, imgs=str(imgs), out=str(out))))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_half_way_then_resume_finishes_without_duplicates(tmp_path) -> None:
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, [(90, 140)] * 16, seed=9)
    out = tmp_path / "out"
    proc = _run_script(tmp_path, imgs, out, slow=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "index.json").exists() and load_index(out)["num_images"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(_shard_keys(out))
    assert 4 <= done_at_kill < len(paths)  # really half-way

    resumed = _run_script(tmp_path, imgs, out, slow=False)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    keys = _shard_keys(out)
    assert sorted(keys) == sorted(p.name for p in paths) and len(keys) == len(set(keys))  # complete, no duplicates
    assert not [f for f in (out / "shards").iterdir() if f.name.endswith(".tmp")]
    index = load_index(out)
    assert index["num_images"] == len(paths) and len({im["key"] for im in index["images"]}) == len(paths)

    reference = tmp_path / "reference"
    ref = _run_script(tmp_path, imgs, reference, slow=False)
    assert ref.wait(timeout=300) == 0
    a, b = load_regions(out), load_regions(reference)
    for k in b:
        assert a[k].keys() == b[k].keys()
        for f in b[k]:
            assert torch.equal(a[k][f], b[k][f]), (k, f)


def test_cli_extract_regions_boxes_and_resume(tmp_path, data, capsys) -> None:
    from regionclip.cli.main import main

    root, paths, boxes, vocab = data
    det = tiny_detector(seed=10)
    torch.save(det.state_dict(), tmp_path / "tiny.pth")
    torch.save(vocab, tmp_path / "emb.pth")
    (tmp_path / "boxes.json").write_text(json.dumps({k: v.tolist() for k, v in boxes.items()}))
    argv = ["extract-regions", str(root / "imgs"), "--weights", str(tmp_path / "tiny.pth"), "--regions", "boxes",
            "--boxes", str(tmp_path / "boxes.json"), "--concept-emb", str(tmp_path / "emb.pth"), "--vocab", "x,y,z",
            "-o", str(tmp_path / "out"), "--format", "original", "--num-workers", "0", "--quiet"]
    assert main(argv) == 0
    assert f"{len(paths)} images extracted" in capsys.readouterr().out
    index = load_index(tmp_path / "out")
    assert index["num_images"] == len(paths) and index["class_names"] == ["x", "y", "z"]
    assert len(list((tmp_path / "out" / "original").glob("*.pth"))) == len(paths)
    assert main(argv) == 0
    assert "0 images extracted in" in (out := capsys.readouterr().out) and f"{len(paths)} were already done" in out
    assert main(argv[:2] + ["--weights", str(tmp_path / "tiny.pth"), "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert "no RPN weights" in capsys.readouterr().err
