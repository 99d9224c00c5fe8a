"""Throughput and peak memory of region feature extraction (or detection): streamed/batched vs one image at a time.

Prints images/s and peak memory for GT mode (user boxes) and RPN mode (top-100 / top-1000 proposals), RN50 and
RN50x4, for three paths of the same pipeline (:class:`regionclip.pipeline.Pipeline`, loaded with
``RegionCLIP.from_pretrained``):

* one-at-a-time: decode in the main process, one image per backbone pass, the whole region head in one call;
* batch 1 with decode workers: :meth:`Pipeline.iter_batches` (``--task detect``: ``RegionCLIP.run``) with
  ``num_workers`` DataLoader processes, chunked region head;
* batch B: the same with B equal-size images per backbone pass.

Then the region-head peak memory as the number of boxes grows (chunked vs unchunked, ``RegionPredictor``). Every
measurement runs in its own subprocess so peak memory is not polluted by earlier runs. Weights are random
official-format checkpoints (tests/conftest.py::random_checkpoints); speed does not depend on the weight values.

    python benchmarks/benchmark.py --quick                           # smoke run: RN50, 1 image, GT mode (minutes)
    python benchmarks/benchmark.py                                   # defaults: modest CPU settings
    python benchmarks/benchmark.py --device cuda --images 8 --repeats 3
    python benchmarks/benchmark.py --variants rn50 --modes gt rpn100 --sweep 100 1000 5000
    python benchmarks/benchmark.py --task detect --modes gt          # RegionCLIP.detect / RegionCLIP.run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
MODES = {"gt": None, "rpn100": 100, "rpn1000": 1000}


# ---------------------------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory above the level at ``__enter__``: CUDA allocator stats on GPU, else RSS sampled every ms from
    /proc (large tensors are mmap-ed, so RSS follows allocations and frees closely)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return self
        self._base = self._peak = self._rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss_mb())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, self._rss_mb()) - self._base


def _timed(fn: Callable[[], Any], device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- worker side
def _load(task: dict) -> Any:
    """The model of one measurement, through the public front door (load options as a user gives them)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import random_checkpoints  # generates the random files once per machine

    from regionclip import RegionCLIP

    ckpts = random_checkpoints(task["variant"], 0)
    rpn = MODES.get(task.get("mode", "gt")) is not None
    model = RegionCLIP.from_pretrained(
        ckpts["regionclip"], ckpts["rpn"] if rpn else None, preset="lvis-rpn" if rpn else "lvis-gt",
        device=task["device"], fuse=not task.get("unfused", False),
        rpn_overrides={"nms_thresh": 0.9, "post_nms_topk": 1000} if rpn else None)
    if task.get("task") == "detect":
        # random [65, D] class embeddings of the same checkpoint family (names are numbered)
        model.set_vocabulary(class_embeddings=ckpts["concept_emb"])
    return model


def _images(n: int) -> list[Path]:
    from regionclip.assets import demo_image_paths

    demo = [Path(p) for p in demo_image_paths()]
    return [demo[i % len(demo)] for i in range(n)]


def run_throughput(task: dict) -> dict:
    """One (variant, mode, path, batch size) measurement: images/s over ``images`` images, peak memory, and the
    regions (extract) or detections (detect) per image."""
    from regionclip.data.loader import InferenceItem
    from regionclip.engine.extract import ExtractConfig, extract_batch
    from regionclip.pipeline import ItemError, RunOptions

    sys.path.insert(0, str(REPO / "tests"))
    from _region_helpers import random_boxes

    model = _load(task)
    pipe = model.pipeline
    files = _images(task["images"])
    topk = MODES[task["mode"]]
    gt = topk is None
    # the demo images are 1920x1080 (original pixels); the boxes are given in that frame
    boxes = [random_boxes(task["boxes"], 1080, 1920, seed=i).numpy() for i in range(len(files))]
    baseline = task["path"] == "baseline"
    chunk = 10**9 if baseline else task["chunk"]
    options = model.run_options(batch_size=task["batch"], dtype=task["dtype"], chunk_size=chunk, max_proposals=topk,
                                num_workers=0 if baseline else task["workers"])
    cfg = ExtractConfig(regions="boxes" if gt else "rpn", run=options)
    items = [InferenceItem(key=str(i), file_name=str(f), boxes=boxes[i] if gt else None) for i, f in enumerate(files)]
    counts: list[int] = []

    def one_at_a_time() -> None:
        for i, f in enumerate(files):
            if task["task"] == "detect":
                counts.append(len(model.detect([f], boxes=[boxes[i]] if gt else None, options=options)[0].boxes))
                continue
            p = pipe.prepare(f)
            regions = [pipe.user_regions(boxes[i], p, image_name=str(f))] if gt else None
            counts.append(len(extract_batch(pipe, [p], cfg, regions=regions)[0]["feats"]))

    def streamed() -> None:
        if task["task"] == "detect":
            for res in model.run(items, options):
                if res.error is not None:
                    raise RuntimeError(f"{res.item.file_name}: {res.error}")
                counts.append(len(res.detections.boxes))
            return
        for batch in pipe.iter_batches(items, options):
            if isinstance(batch, ItemError):
                raise RuntimeError(f"{batch.item.file_name}: {batch.error}")
            counts.extend(len(r["feats"]) for r in extract_batch(pipe, batch.prepared, cfg, regions=batch.regions))

    run = one_at_a_time if baseline else streamed
    if task.get("warmup", True):  # one image with 8 boxes (allocator, oneDNN primitives); not timed
        p0 = pipe.prepare(files[0])
        extract_batch(pipe, [p0], ExtractConfig(regions="boxes", run=RunOptions(dtype=task["dtype"])),
                      regions=[pipe.user_regions(boxes[0][:8], p0)])
    times, peaks = [], []
    for _ in range(task["repeats"]):
        counts.clear()
        with PeakMemory(task["device"]) as mem:
            times.append(_timed(run, task["device"]))
        peaks.append(mem.peak_mb)
    return {"images_per_s": len(files) / statistics.median(times), "peak_mb": max(peaks),
            "per_image": statistics.mean(counts) if counts else 0.0}


def run_sweep(task: dict) -> dict:
    """Region-head peak memory (and time) for R boxes on one image with the res4 map already cached."""
    sys.path.insert(0, str(REPO / "tests"))
    from _region_helpers import random_boxes

    from regionclip.predictor import RegionPredictor

    model = _load(task)
    pred = RegionPredictor(model, chunk_size=task["chunk"], dtype=task["dtype"]).set_image(_images(1)[0])
    pred.encode_boxes(random_boxes(8, 1080, 1920, seed=1))  # warm-up
    boxes = random_boxes(task["boxes"], 1080, 1920, seed=0)
    with PeakMemory(task["device"]) as mem:
        t = _timed(lambda: pred.encode_boxes(boxes), task["device"])
    return {"peak_mb": mem.peak_mb, "seconds": t}


def worker_main(task: dict) -> None:
    import torch

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    result = run_sweep(task) if task["kind"] == "sweep" else run_throughput(task)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver side
def spawn(task: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def machine_info(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: RN50, GT mode, 1 image, 8 boxes, batch 1, no warm-up, no sweep (checks that "
                    "every path runs; the numbers are not measurements)")
    ap.add_argument("--task", default="extract", choices=["extract", "detect"],
                    help="extract: region features (extract-regions' path); detect: RegionCLIP.detect / .run "
                    "(classify + post-process, 65 random classes)")
    ap.add_argument("--variants", nargs="+", default=["rn50", "rn50x4"], choices=["rn50", "rn50x4"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--images", type=int, default=4, help="images per measurement (>= the largest batch size)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--boxes", type=int, default=20, help="user boxes per image in GT mode")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--chunk", type=int, default=256, help="region-head chunk of the streamed paths")
    ap.add_argument("--workers", type=int, default=2, help="decoding workers of the streamed paths")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--unfused", action="store_true", help="load without inference fusion (fuse=False)")
    ap.add_argument("--sweep", nargs="*", type=int, default=[100, 500, 1000, 2000, 5000],
                    help="box counts of the memory sweep (RN50, GT mode); empty to skip")
    ap.add_argument("--sweep-unchunked-max", type=int, default=2000,
                    help="largest R run unchunked in the sweep (unchunked 5000 boxes needs ~10 GB on RN50)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.quick:
        args.variants, args.modes, args.batch_sizes, args.images, args.repeats = ["rn50"], ["gt"], [1], 1, 1
        args.boxes, args.sweep = 8, []
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        ap.error("--dtype float16 needs --device cuda (CPU autocast has no fast float16; use bfloat16)")
    if max(args.batch_sizes) > args.images:
        ap.error(f"--images {args.images} is smaller than the largest batch size {max(args.batch_sizes)}")

    from regionclip.inference.hardware import cpu_flags_line

    print(f"# machine: {machine_info(args.device)}")
    print(f"# {cpu_flags_line()}")
    print(f"# task {args.task}, device {args.device}, dtype {args.dtype}, {'unfused' if args.unfused else 'fused'} "
          f"model, {args.images} images (the two 1920x1080 demo images, cycled; resized to 1333x750), "
          f"{args.repeats} repeat(s), GT mode = {args.boxes} random boxes/image" + (" [--quick]" if args.quick else ""))
    base = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "images": args.images,
            "repeats": args.repeats, "boxes": args.boxes, "chunk": args.chunk, "workers": args.workers,
            "task": args.task, "unfused": args.unfused, "warmup": not args.quick}
    per = "regions/img" if args.task == "extract" else "dets/img"
    results: list[dict] = []
    if not args.skip_throughput:
        print(f"\n{'variant':8} {'mode':8} {'path':30} {per:>11} {'images/s':>9} {'speed-up':>8} {'peak MB':>9}")
        for variant in args.variants:
            for mode in args.modes:
                rows = [("baseline", 1)] + [("batched", b) for b in args.batch_sizes]
                ref = None
                for path, bs in rows:
                    task = {**base, "kind": "throughput", "variant": variant, "mode": mode, "path": path,
                            "batch": bs}
                    r = {**task, **spawn(task)}
                    results.append(r)
                    label = "one-at-a-time, unchunked" if path == "baseline" else \
                        f"batch {bs}, chunk {args.chunk}, {args.workers} workers"
                    if "error" in r:
                        print(f"{variant:8} {mode:8} {label:30} error: {r['error']}")
                        continue
                    ref = r["images_per_s"] if path == "baseline" else ref
                    up = f"{r['images_per_s'] / ref:.2f}x" if ref else "-"
                    print(f"{variant:8} {mode:8} {label:30} {r['per_image']:11.0f} {r['images_per_s']:9.3f} "
                          f"{up:>8} {r['peak_mb']:9.0f}", flush=True)
    if args.sweep:
        print(f"\nRegion-head peak memory vs number of boxes (RN50, one image, res4 cached, {args.device})")
        print(f"{'boxes':>6} {f'chunk {args.chunk} MB':>13} {'s':>7} {'unchunked MB':>13} {'s':>7}")
        for n in args.sweep:
            row: list[Optional[dict]] = []
            for chunk in (args.chunk, 10**9):
                if chunk == 10**9 and n > args.sweep_unchunked_max:
                    row.append(None)
                    continue
                task = {**base, "kind": "sweep", "variant": "rn50", "mode": "gt", "boxes": n, "chunk": chunk}
                r = {**task, **spawn(task)}
                results.append(r)
                row.append(r)
            cells = [f"{'-':>13} {'-':>7}" if r is None else (f"{'error':>13} {'':>7}" if "error" in r else
                     f"{r['peak_mb']:13.0f} {r['seconds']:7.1f}") for r in row]
            print(f"{n:6d} {' '.join(cells)}", flush=True)
            for cell in row:
                if cell is not None and "error" in cell:
                    print(f"       error: {cell['error']}")
    print(f"\n# finished; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        from regionclip.utils import write_json_atomic

        write_json_atomic(results, args.json, indent=1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
