"""Sharded inference under torchrun (issue 15): 2 gloo processes on CPU give the same files as one process, and a
run killed half-way resumes without redoing or doubling an image."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _region_helpers import write_images, write_tiny_checkpoint
from regionclip.data.loader import InferenceItem
from regionclip.engine.extract import load_regions
from regionclip.parallel.sharding import shard_items

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# torchrun gives each process one thread; the one-process reference uses one too, because float32 GEMM results
# depend on the thread count by a few ulp (docs/DESIGN.md#sharding), and the files must be byte-identical
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_shard_items_is_a_deterministic_balanced_partition() -> None:
    items = [InferenceItem(f"k{i}", f"f{i}", boxes=torch.zeros(n, 4).numpy()) for i, n in
             enumerate([50, 1, 1, 1, 1, 1, 40, 2, 3, 30, 5, 5])]
    parts = [shard_items(items, r, 3) for r in range(3)]
    keys = [it.key for p in parts for it in p]
    assert sorted(keys) == sorted(it.key for it in items) and len(keys) == len(set(keys))
    loads = [sum(1 + len(it.boxes) for it in p) for p in parts]
    assert max(loads) - min(loads) <= 6  # by cost, not by position (positions would give 61 / 9 / 45)
    assert [[it.key for it in p] for p in parts] == [[it.key for it in shard_items(items, r, 3)] for r in range(3)]
    for p in parts:  # input order kept inside a shard
        assert [it.key for it in p] == [it.key for it in items if it in p]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shard")
    write_tiny_checkpoint(d / "tiny.pth")
    sizes = [(60, 80), (70, 90), (64, 64), (90, 100), (50, 50), (80, 60), (66, 77), (88, 44)]
    imgs = write_images(d / "imgs", sizes)
    boxes = {p.name: [[2, 3, 40, 30], [10, 10, 45, 45]][: 1 + i % 2] for i, p in enumerate(imgs)}
    (d / "boxes.json").write_text(json.dumps(boxes))
    return d


def _detect_args(d: Path, out: str) -> list[str]:
    return ["-m", "regionclip.cli.main", "detect", str(d / "imgs"), "--weights", str(d / "tiny.pth"), "--vocab",
            "a,b,c", "--boxes", str(d / "boxes.json"), "--preset", "coco-gt", "--num-workers", "0", "--no-vis",
            "--quiet", "-o", str(d / out)]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_a_kill(workdir) -> None:
    d = workdir
    _run([sys.executable] + _detect_args(d, "one"), d)
    _run(TORCHRUN + _detect_args(d, "two"), d)
    for name in ("results.json", "images.json"):
        assert (d / "one" / name).read_bytes() == (d / "two" / name).read_bytes(), name
    journals = sorted((d / "two").glob("predictions.rank*.jsonl"))
    assert len(journals) == 2 and all(len(j.read_text().splitlines()) > 1 for j in journals)  # both ranks worked

    # a rank killed half-way: its journal ends with a partial line and lacks its last images
    rank1 = d / "two" / "predictions.rank1.jsonl"
    lines = rank1.read_text().splitlines(keepends=True)
    rank1.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    (d / "two" / "results.json").unlink()
    missing = len(lines) - 2
    _run(TORCHRUN + _detect_args(d, "two"), d)
    assert (d / "one" / "results.json").read_bytes() == (d / "two" / "results.json").read_bytes()
    keys = [json.loads(x)["key"] for j in sorted((d / "two").glob("predictions*.jsonl"))
            for x in j.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 8  # every image exactly once over all journals: only the lost ones redone
    assert missing >= 1

    # a real SIGKILL of the whole torchrun group while it runs, then the same command again
    proc = subprocess.Popen(TORCHRUN + _detect_args(d, "killed"), cwd=d, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(len(p.read_text().splitlines()) >= 2 for p in (d / "killed").glob("predictions.rank*.jsonl")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _run(TORCHRUN + _detect_args(d, "killed"), d)
    assert (d / "one" / "results.json").read_bytes() == (d / "killed" / "results.json").read_bytes()
    keys = [json.loads(x)["key"] for j in (d / "killed").glob("predictions*.jsonl")
            for x in j.read_text().splitlines()[1:] if x.strip()]
    assert len(keys) == len(set(keys)) == 8


@pytest.mark.slow
def test_sharded_extraction_equals_one_process(workdir) -> None:
    d = workdir
    args = ["-m", "regionclip.cli.main", "extract-regions", str(d / "imgs"), "--regions", "boxes", "--boxes",
            str(d / "boxes.json"), "--weights", str(d / "tiny.pth"), "--num-workers", "0", "--quiet"]
    _run([sys.executable] + args + ["-o", str(d / "ex1")], d)
    _run(TORCHRUN + args + ["-o", str(d / "ex2")], d)
    a, b = load_regions(d / "ex1"), load_regions(d / "ex2")
    assert sorted(a) == sorted(b) and len(a) == 8
    for k in a:
        for f in a[k]:
            assert torch.equal(a[k][f], b[k][f]), (k, f)
    index = json.loads((d / "ex2" / "index.json").read_text())
    assert index["num_images"] == 8 and len(index["shards"]) == 2
