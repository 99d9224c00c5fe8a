"""Issue 22, robustness of the front ends: no silent loss, clear one-line errors naming the item and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _region_helpers import write_images
from regionclip.api import RegionCLIP
from regionclip.cli.main import main
from regionclip.formats import read_boxes_file
from regionclip.formats.box_files import BoxesFileError




def _detect_args(tmp_path: Path, ckpt: Path, emb: Path, out: str = "out", *extra: str) -> list[str]:
    return ["detect", str(tmp_path / "imgs"), "--weights", str(ckpt), "--concept-emb", str(emb), "--vocab", "a,b,c",
            "--boxes", str(tmp_path / "boxes.json"), "--score-thresh", "0", "--num-workers", "0", "--no-vis",
            "--quiet", "-o", str(tmp_path / out), *extra]


def _images_and_boxes(tmp_path: Path, n: int = 3) -> list[Path]:
    imgs = write_images(tmp_path / "imgs", [(60, 80), (64, 64), (70, 50), (50, 90)][:n])
    (tmp_path / "boxes.json").write_text(json.dumps({p.name: [[2, 3, 40, 30], [10, 10, 45, 45]] for p in imgs}))
    return imgs


# ---------------------------------------------------------------------------------------------- boxes CSV header
def test_csv_typo_in_first_row_is_an_error_not_a_header(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("a.jpg,1,2,45O,40\nb.jpg,1,2,3,4\n")
    with pytest.raises(BoxesFileError, match=r"b\.csv line 1, column x2: '45O' is not a number"):
        read_boxes_file(f)
    f.write_text("b.jpg,1,2,3,4\na.jpg,1,x,3,4\n")
    with pytest.raises(BoxesFileError, match=r"line 2, column y1: 'x'"):
        read_boxes_file(f)
    f.write_text("name,left,top,right,bottom\na.jpg,1,2,45,40\n")  # a real header (known names): skipped
    assert read_boxes_file(f)["a.jpg"].tolist() == [[1, 2, 45, 40]]
    f.write_text("File_Name, X1, Y1, X2, Y2\na.jpg,1,2,45,40\n")
    assert list(read_boxes_file(f)) == ["a.jpg"]
    f.write_text("img,x,y,w,h\na.jpg,1,2,45,40\n")  # x,y,w,h is not this file's layout: refused, not guessed
    with pytest.raises(BoxesFileError, match="column x1: 'x'"):
        read_boxes_file(f)


# ---------------------------------------------------------------------------------------------- option ranges
@pytest.mark.parametrize("cmd,flag,value,want", [
    ("detect", "--score-thresh", "2", "between 0.0 and 1.0"),
    ("detect", "--score-thresh", "nan", "finite"),
    ("detect", "--max-dets", "0", ">= 1"),
    ("detect", "--nms-thresh", "1.5", "between 0.0 and 1.0"),
    ("detect", "--batch-size", "-2", ">= 1"),
    ("detect", "--chunk-size", "0", ">= 1"),
    ("detect", "--num-workers", "-1", ">= 0"),
    ("detect", "--vis-conf-threshold", "-0.1", "between 0.0 and 1.0"),
    ("extract-regions", "--topk", "0", ">= 1"),
    ("extract-regions", "--shard-mb", "0", "> 0.0"),
    ("evaluate", "--limit", "0", ">= 1"),
    ("index", "--nprobe", "0", ">= 1"),
    ("search", "--top-k", "-5", ">= 1"),
])
def test_option_ranges_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, cmd, flag, value, want):
    def boom(*a, **k):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr(RegionCLIP, "load", boom)
    img = write_images(tmp_path, [(40, 40)])[0]
    positional = {"detect": [str(img)], "extract-regions": [str(img)], "evaluate": [],
                  "index": [str(tmp_path), "-o", str(tmp_path / "ix")], "search": [str(tmp_path), "cat"]}[cmd]
    with pytest.raises(SystemExit) as e:
        main([cmd, *positional, f"{flag}={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert flag in err and want in err and value in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- convert
def test_convert_on_a_shell_script_says_it_is_not_a_checkpoint(tmp_path, capsys):
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/bash\necho hello\n")
    assert main(["convert", str(script), "-o", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(script) in err and "not a checkpoint file" in err
    assert "#!/bin/bash" in err and "pickled" not in err
    assert not (tmp_path / "out.safetensors").exists()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert main(["convert", str(empty), "-o", str(tmp_path / "out.safetensors")]) == 2
    assert "is empty" in capsys.readouterr().err
    # a safetensors file with a .pth name is read by content, and a truncated safetensors file is named as such
    from safetensors.torch import save_file

    st = tmp_path / "emb.pth"
    save_file({"w": torch.ones(2, 3)}, str(st))
    from regionclip.checkpoint.io import CheckpointError, read_weight_file

    assert read_weight_file(st)["w"].shape == (2, 3)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated or not a safetensors file"):
        read_weight_file(cut)


# ---------------------------------------------------------------------------------------------- vocabularies
def test_embedding_file_given_as_the_vocabulary_is_loaded_as_embeddings(tmp_path, tiny_ckpt, emb_file):
    model = RegionCLIP.from_pretrained(tiny_ckpt, preset="coco-gt")
    assert model.set_vocabulary(str(emb_file)) == ["0", "1", "2"]  # was: "not valid UTF-8"
    assert torch.equal(model.vocabulary.class_embeddings, torch.load(emb_file, weights_only=True))
    from safetensors.torch import save_file

    st = tmp_path / "emb.safetensors"
    save_file({"embeddings": torch.randn(2, 16)}, str(st))
    assert len(model.set_vocabulary(st)) == 2
    with pytest.raises(ValueError, match="class_embeddings="):  # both given: say which goes where
        model.set_vocabulary(str(emb_file), emb_file)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    assert model.set_vocabulary(names, emb_file) == ["cat", "dog", "bird"]  # a names file is still a names file


def test_duplicate_names_warn_with_concept_embeddings_as_with_the_text_encoder(tmp_path, tiny_ckpt, emb_file):
    model = RegionCLIP.from_pretrained(tiny_ckpt, preset="coco-gt")
    with pytest.warns(UserWarning, match=r"duplicate class names 'cat' \(#0 and #2\)"):
        model.make_vocabulary("cat,dog,cat", cache_dir=tmp_path / "cache")  # the text-encoder path
    with pytest.warns(UserWarning, match=r"duplicate class names 'cat' \(#0 and #2\)"):
        model.make_vocabulary("cat,dog,cat", emb_file)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\ncat\n")
    with pytest.warns(UserWarning, match="duplicate class names"):
        model.make_vocabulary(names, emb_file)


# ---------------------------------------------------------------------------------------------- index
def test_index_on_a_truncated_shard_or_an_empty_store_is_one_clear_line(tmp_path, capsys):
    from test_search import make_store

    feats = make_store(tmp_path / "s", n_images=2)
    shard = next((feats / "shards").glob("shard-*.safetensors"))
    data = shard.read_bytes()
    for cut in (len(data) // 2, 20):
        shard.write_bytes(data[:cut])
        assert main(["index", str(feats), "-o", str(tmp_path / "ix"), "--backend", "exact", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(shard) in err and "truncated or damaged" in err, err
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    assert main(["index", str(empty), "-o", str(tmp_path / "ix2"), "--backend", "exact", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty / "shards") in err and "no shards" in err
    assert not (tmp_path / "ix2").exists()


# ---------------------------------------------------------------------------------------------- resume by content
def _journal_lines(tmp_path: Path, out: str = "out") -> list[str]:
    return (tmp_path / out / "predictions.jsonl").read_text().splitlines()


def test_resume_keys_on_file_contents_not_paths(tmp_path, tiny_ckpt, emb_file, capsys):
    _images_and_boxes(tmp_path)
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 0
    before = _journal_lines(tmp_path)
    assert len(before) == 1 + 3
    # the same contents under another path: the same run, nothing to redo
    moved = tmp_path / "moved" / "emb_copy.pth"
    moved.parent.mkdir()
    moved.write_bytes(emb_file.read_bytes())
    ckpt2 = tmp_path / "moved" / "tiny_copy.pth"
    ckpt2.write_bytes(tiny_ckpt.read_bytes())
    capsys.readouterr()
    assert main(_detect_args(tmp_path, ckpt2, moved)) == 0
    assert "3 of 3 images already done" in capsys.readouterr().err
    assert _journal_lines(tmp_path) == before
    # other contents under the same path (was: old embeddings for the first images, new ones for the rest)
    torch.save(torch.randn(3, 16, generator=torch.Generator().manual_seed(99)), emb_file)
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's load report: one line
    assert err.startswith("regionclip detect: error:") and "concept_emb_sha256" in err and "--overwrite" in err
    assert _journal_lines(tmp_path) == before  # nothing mixed in
    # the boxes file and the weights are keyed the same way
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    boxes["img000.png"][0] = [3, 3, 40, 30]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    torch.save(torch.load(moved, weights_only=True), emb_file)  # the original embeddings again
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 2
    assert "boxes_sha256" in capsys.readouterr().err
    # told to start over (either spelling), it does, and the results are the new inputs' only
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file, "out", "--no-resume")) == 0
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file, "fresh")) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == \
        json.loads((tmp_path / "fresh" / "results.json").read_text())


def test_digests_are_computed_once_per_file_not_per_image(tmp_path, tiny_ckpt, emb_file, monkeypatch):
    import regionclip.checkpoint.io as cio

    _images_and_boxes(tmp_path, 4)
    calls: list[str] = []
    orig = cio.file_sha256
    monkeypatch.setattr(cio, "file_sha256", lambda p, **k: calls.append(Path(p).name) or orig(p, **k))
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 0
    assert sorted(calls) == ["boxes.json", "emb.pth", "tiny.pth"]  # each input once for 4 images


# ---------------------------------------------------------------------------------------------- detect lock
def test_two_detect_runs_cannot_write_one_folder(tmp_path, tiny_ckpt, emb_file, capsys):
    import subprocess
    import sys

    from regionclip.parallel.sharding import LOCK_NAME

    _images_and_boxes(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from regionclip.utils import lock_dir; "
                               f"held = lock_dir({str(out)!r}, {LOCK_NAME!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("regionclip detect: error: another detect run is writing to") and str(out) in err
        assert not (out / "predictions.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 0  # released when the holder died
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 0  # and by a finished run


# ---------------------------------------------------------------------------------------------- disk full
def test_disk_full_during_detect_is_one_line_and_leaves_a_complete_journal(tmp_path, tiny_ckpt, emb_file,
                                                                           monkeypatch, capsys):
    import errno
    import os

    _images_and_boxes(tmp_path)
    out = tmp_path / "out"
    real_write = os.write
    journal_writes = {"n": 0}

    def full_disk_write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("predictions.jsonl"):
            return real_write(fd, data)
        journal_writes["n"] += 1
        if journal_writes["n"] < 2:
            return real_write(fd, data)
        real_write(fd, bytes(data[:len(data) // 2]))  # what fits, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk_write)
    rc = main(_detect_args(tmp_path, tiny_ckpt, emb_file))
    monkeypatch.setattr(os, "write", real_write)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("regionclip detect: error: no space left on the disk of") and str(out) in err
    assert "run the same command again" in err
    lines = (out / "predictions.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1 + 1 + 1  # meta + the one image written, no partial line
    assert all(json.loads(x) for x in lines[:-1])
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written
    assert not (out / "results.json").exists()
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 0  # space freed: the run resumes and finishes
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file, "fresh")) == 0
    assert json.loads((out / "results.json").read_text()) == json.loads((tmp_path / "fresh" / "results.json").read_text())



# ---------------------------------------------------------------------------------------------- fewer images
def test_front_ends_that_process_fewer_images_say_so_and_fail(tmp_path, tiny_ckpt, emb_file, monkeypatch, capsys):
    """A stream that ends early (the issue's StopIteration) is simulated by a run that drops all but one image:
    each CLI checks its own output against the inputs, whatever the engine reported."""
    import copy

    import regionclip.cli.evaluate as cli_evaluate
    import regionclip.cli.extract_regions as cli_extract

    imgs = _images_and_boxes(tmp_path)
    orig_run = RegionCLIP.run
    monkeypatch.setattr(RegionCLIP, "run", lambda self, items, *a, **k: orig_run(self, list(items)[:1], *a, **k))
    assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 1
    err = capsys.readouterr().err
    assert "2 of 3 images were not processed" in err and "img001.png" in err

    orig_extract = cli_extract.extract_regions
    monkeypatch.setattr(cli_extract, "extract_regions", lambda p, items, *a, **k: orig_extract(p, items[:1], *a, **k))
    assert main(["extract-regions", str(tmp_path / "imgs"), "--regions", "boxes", "--boxes",
                 str(tmp_path / "boxes.json"), "--weights", str(tiny_ckpt), "--num-workers", "0", "--quiet",
                 "-o", str(tmp_path / "feats")]) == 1
    assert "2 of 3 images were not processed" in capsys.readouterr().err

    coco = {"images": [{"id": i + 1, "file_name": p.name, "height": h, "width": w}
                       for i, (p, (h, w)) in enumerate(zip(imgs, [(60, 80), (64, 64), (70, 50)]))],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 3, "bbox": [2, 3, 30, 25],
                             "area": 750, "iscrowd": 0} for i in range(3)],
            "categories": [{"id": c, "name": n} for c, n in zip((1, 2, 3), "abc")]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    orig_eval = cli_evaluate.evaluate_dataset

    def first_only(dataset, *a, **k):
        ds = copy.copy(dataset)
        ds.records = dataset.records[:1]
        return orig_eval(ds, *a, **k)

    monkeypatch.setattr(cli_evaluate, "evaluate_dataset", first_only)
    args = ["evaluate", "--dataset", str(tmp_path / "coco.json"), "--image-root", str(tmp_path / "imgs"),
            "--regions", "gt", "--weights", str(tiny_ckpt), "--concept-emb", str(emb_file), "--num-workers", "0",
            "--no-progress", "-o", str(tmp_path / "eval")]
    assert main(args) == 1
    out = capsys.readouterr()
    assert "2 of 3 images were not processed" in out.err and "over 1 of 3 images only" in out.out
    monkeypatch.setattr(cli_evaluate, "evaluate_dataset", orig_eval)
    assert main([*args, "--overwrite"]) == 0  # every image scored: success


# ---------------------------------------------------------------------------------------------- folder walk
def test_folders_take_every_format_pillow_reads_and_summarise_skipped_files(tmp_path, tiny_ckpt, emb_file, capsys,
                                                                          caplog):
    import numpy as np
    from PIL import Image

    from regionclip.data.datasets import load_image_folder
    from regionclip.data.folders import image_extensions
    from regionclip.data.folders import list_images
    from regionclip.data.loader import items_from_inputs

    assert {".avif", ".jfif", ".jpe", ".tif", ".webp", ".qoi"} <= set(image_extensions())
    assert not {".pdf", ".eps", ".h5"} & set(image_extensions())
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.avif", format="AVIF")
    Image.fromarray(rgb).save(folder / "b.jfif", format="JPEG")
    Image.fromarray(rgb).save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "data.csv").write_text("x\n")
    (folder / "sub").mkdir()
    want = ["a.avif", "b.jfif", "c.png"]
    with caplog.at_level("WARNING"):
        assert [it.key for it in items_from_inputs([folder])] == want
    assert "2 file(s) skipped" in caplog.text and "data.csv, notes.txt" in caplog.text
    assert [p.name for p in list_images(folder)] == want
    assert [Path(r.file_name).name for r in load_image_folder(folder, ["a"])] == want
    (tmp_path / "boxes.json").write_text(json.dumps({n: [[2, 3, 40, 30]] for n in want}))
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("WARNING"):  # the CLI's logging goes to stderr (pytest's handler takes it here)
        assert main(_detect_args(tmp_path, tiny_ckpt, emb_file)) == 0
    assert capsys.readouterr().out.startswith("3 images") and "2 file(s) skipped" in caplog.text
    done = [json.loads(x)["key"] for x in _journal_lines(tmp_path)[1:]]
    assert done == want  # the AVIF photo is detected, not skipped


# ---------------------------------------------------------------------------------------------- Ctrl-C
_FORK_SIGINT = """
import os, signal, sys
import regionclip.utils as u
def child():  # SIGINT inside the at-fork window of a new DataLoader worker, as a Ctrl-C at that moment
    if u._FORK_GUARD_INSTALLED:
        os.kill(os.getpid(), signal.SIGINT)
os.register_at_fork(after_in_child=child)
from regionclip.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_prints_one_line_and_no_worker_traceback(tmp_path, tiny_ckpt, emb_file):
    import os
    import signal
    import subprocess
    import sys
    import time

    imgs = write_images(tmp_path / "imgs", [(120, 160)] * 24)  # enough work to still be running when interrupted
    (tmp_path / "boxes.json").write_text(json.dumps({p.name: [[2, 3, 40, 30]] * 20 for p in imgs}))
    args = _detect_args(tmp_path, tiny_ckpt, emb_file, "out", "--num-workers", "2")
    args[args.index("--quiet")] = "--overwrite"  # keep the progress bar: it says when images are being processed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    # 1. a worker hit while being forked: was "Traceback ... KeyboardInterrupt" from the worker (and the worker lost)
    few = write_images(tmp_path / "few", [(60, 80)] * 3, prefix="few")
    boxes = json.loads((tmp_path / "boxes.json").read_text()) | {f.name: [[2, 3, 40, 30]] for f in few}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    small = [str(tmp_path / "few") if a == str(tmp_path / "imgs") else a for a in args]
    p = subprocess.run([sys.executable, "-c", _FORK_SIGINT, *small], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr[-2000:]
    # 2. Ctrl-C (SIGINT to the whole process group) while workers decode: the one line, exit 130
    p2 = subprocess.Popen([sys.executable, "-m", "regionclip.cli.main", *args], stderr=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seen = ""
    while "detect:" not in seen and p2.poll() is None:
        seen += p2.stderr.read(1)
    time.sleep(0.5)
    os.killpg(p2.pid, signal.SIGINT)
    _, err = p2.communicate(timeout=120)
    err = (seen + err).strip()
    assert p2.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert err.splitlines()[-1].startswith("regionclip detect: interrupted")
