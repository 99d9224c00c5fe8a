"""``regionclip extract-regions`` throughput: one process vs ``torchrun --standalone --nproc-per-node P`` (CPU, gloo).

Every run extracts the same N images (copies of the bundled demo images in a temporary folder) with the same
random official-format RN50 checkpoint (tests/conftest.py::random_checkpoints), either with user boxes
(``--regions boxes``: the hand-placed parity GT boxes of each demo image, written to a boxes JSON keyed by the
copies' names) or with the top-k RPN proposals (``--regions rpn --topk 100``). Runs: one process with all
``--threads-total`` intra-op threads; one process with the ranks' thread count ``threads-total // P`` (a rank's
work rate, so it isolates the sharding overhead); ``torchrun`` with P ranks of ``threads-total // P`` threads.
Printed per run: threads per process, wall seconds of the whole command (process start + model load + extraction
+ rank-0 merge), the command's own images/s (as it prints it), and whether the outputs hold the same regions.

On a machine with few cores this measures the *overhead* of sharding (P processes x T/P threads do the same work
as one process x T threads, plus P model loads, the process group and the merge); it is not a speed-up. Sharding
pays where each rank has its own GPU or node (``--device cuda``: one rank per GPU).

    python benchmarks/sharded_extract.py                       # N=8, boxes, 2 ranks
    python benchmarks/sharded_extract.py --images 4 --out benchmarks/results/sharded_cpu.txt
    python benchmarks/sharded_extract.py --regions rpn --topk 100
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, cast

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts (regionclip, torchrun) sit beside its python


def load_line() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} / {b:.2f} / {c:.2f} (1/5/15 min)"


def gt_boxes_by_demo_name(coco_json: Path) -> dict[str, list[list[float]]]:
    """{demo file name: [[x1, y1, x2, y2], ...]} from the parity COCO json (its ``bbox`` is XYWH)."""
    data = json.loads(coco_json.read_text(encoding="utf-8"))
    names = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list[list[float]]] = {n: [] for n in names.values()}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out[names[a["image_id"]]].append([x, y, x + w, y + h])
    return out


def make_inputs(folder: Path, n: int, gt_json: Optional[Path]) -> Optional[Path]:
    """N copies of the demo images in ``folder/images`` (distinct names, cycled); with ``gt_json`` also
    ``folder/boxes.json`` keyed by the copies' names. Returns the boxes file (or None)."""
    from regionclip.assets import demo_image_paths

    demo = [Path(p) for p in demo_image_paths()]
    img_dir = folder / "images"
    img_dir.mkdir(parents=True)
    boxes_by_demo = gt_boxes_by_demo_name(gt_json) if gt_json is not None else None
    boxes: dict[str, list[list[float]]] = {}
    for i in range(n):
        src = demo[i % len(demo)]
        name = f"copy{i:03d}_{src.name}"
        shutil.copyfile(src, img_dir / name)
        if boxes_by_demo is not None:
            if not boxes_by_demo.get(src.name):
                raise ValueError(f"{gt_json} has no boxes for demo image {src.name}")
            boxes[name] = boxes_by_demo[src.name]
    if boxes_by_demo is None:
        return None
    from regionclip.utils import write_json_atomic

    return write_json_atomic(boxes, folder / "boxes.json")


def torch_threads_under(env: dict[str, str]) -> int:
    """What torch.get_num_threads() is in a fresh process with this environment (checks the thread setting)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def run_one(cmd: list[str], threads: int, log: Path) -> dict:
    """Run one extract-regions command with ``threads`` intra-op threads per process; wall time + its summary."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    before = load_line()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
    summary = next((ln for ln in proc.stdout.splitlines() if " images extracted in " in ln), "")
    if proc.returncode != 0 or not summary:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}\n(full log: {log})")
    # "<n> images extracted in <s> s (<x> images/s on cpu, float32); ..."
    cli_ips = float(summary.split("(", 1)[1].split(" images/s", 1)[0])
    return {"wall_s": wall, "cli_images_per_s": cli_ips, "summary": summary, "threads": torch_threads_under(env),
            "load_before": before, "load_after": load_line()}


def same_regions(dir_a: Path, dir_b: Path) -> str:
    """Whether two extraction outputs hold the same images, boxes and features (the sharding contract)."""
    import torch

    from regionclip.engine.extract import load_regions

    Records = dict[str, dict[str, torch.Tensor]]  # {image key: {field: tensor}} (no key given)
    a, b = cast(Records, load_regions(dir_a)), cast(Records, load_regions(dir_b))
    if set(a) != set(b):
        return f"DIFFERENT image sets ({len(a)} vs {len(b)})"
    worst, n = 0.0, 0
    for key, rec in a.items():
        other = b[key]
        if rec["feats"].shape != other["feats"].shape or not torch.equal(rec["boxes"], other["boxes"]):
            return f"DIFFERENT regions for {key}"
        n += len(rec["feats"])
        if len(rec["feats"]):
            worst = max(worst, (rec["feats"].float() - other["feats"].float()).abs().max().item())
    return f"same {len(a)} images, {n} regions; max |feats difference| {worst:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="number of images (copies of the 2 demo images)")
    ap.add_argument("--regions", choices=["boxes", "rpn"], default="boxes")
    ap.add_argument("--topk", type=int, default=100, help="RPN proposals per image with --regions rpn")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (ranks)")
    ap.add_argument("--threads-total", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads of the single process; each rank gets threads-total // nproc")
    ap.add_argument("--num-workers", type=int, default=0, help="decoding workers per process (extract-regions)")
    ap.add_argument("--no-same-threads-baseline", dest="same_threads_baseline", action="store_false",
                    help="skip the third run (1 process with the ranks' thread count)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                    help="the shared folder (parity/gt_boxes.json and the random-checkpoint key lists)")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (images, outputs, logs)")
    args = ap.parse_args()
    if args.images < 1 or args.nproc < 2:
        ap.error("--images must be >= 1 and --nproc >= 2")

    os.environ.setdefault("REGIONCLIP_SHARED", str(args.shared))
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest import random_checkpoints

    from regionclip.inference.hardware import cpu_flags_line

    lines: list[str] = []

    def say(msg: str = "") -> None:
        print(msg, flush=True)
        lines.append(msg)

    ckpts = random_checkpoints("rn50", 0)
    tmp = Path(tempfile.mkdtemp(prefix="regionclip_sharded_"))
    try:
        gt_json = args.shared / "parity" / "gt_boxes.json" if args.regions == "boxes" else None
        boxes_file = make_inputs(tmp, args.images, gt_json)
        common = ["extract-regions", str(tmp / "images"), "--weights", str(ckpts["regionclip"]), "--device", "cpu",
                  "--regions", args.regions, "--num-workers", str(args.num_workers), "--quiet"]
        if args.regions == "boxes":
            common += ["--boxes", str(boxes_file)]
        else:
            common += ["--rpn-weights", str(ckpts["rpn"]), "--topk", str(args.topk)]
        if boxes_file is not None:
            n_boxes = sum(len(b) for b in json.loads(boxes_file.read_text(encoding="utf-8")).values())
            what = f"boxes regions (the parity GT boxes of each demo image, {n_boxes} in all)"
        else:
            what = f"rpn regions (top {args.topk} RPN proposals per image)"
        say(f"# benchmarks/sharded_extract.py: regionclip extract-regions, RN50 random weights, {args.images} images "
            f"(copies of the two 1920x1080 demo images), {what}, {args.num_workers} decode workers/process")
        say(f"# torch {torch.__version__}, {os.cpu_count()} logical CPUs; {cpu_flags_line()}")
        say(f"# NOTE: with {os.cpu_count()} cores, {args.nproc} processes x {args.threads_total // args.nproc} "
            f"thread(s) vs 1 process x {args.threads_total} threads measures the sharding overhead (extra model "
            f"loads, process group, merge), not a speed-up; sharding is for many GPUs / nodes (one rank per GPU).")
        say(f"# start: {load_line()}")
        per_rank = max(1, args.threads_total // args.nproc)
        runs = [(f"1 process x{args.threads_total} thr", 1, args.threads_total, "out1",
                 [str(BIN / "regionclip"), *common, "-o", str(tmp / "out1")])]
        if args.same_threads_baseline and per_rank != args.threads_total:
            runs.append((f"1 process x{per_rank} thr", 1, per_rank, "out1t",
                         [str(BIN / "regionclip"), *common, "-o", str(tmp / "out1t")]))
        runs.append((f"torchrun {args.nproc}x{per_rank} thr", args.nproc, per_rank, "outN",
                     [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(args.nproc), "-m",
                      "regionclip.cli.main", *common, "-o", str(tmp / "outN")]))
        say(f"\n{'run':22} {'procs':>5} {'threads/proc':>12} {'wall s':>8} {'images/s (wall)':>15} "
            f"{'images/s (CLI)':>14}  load before -> after (1 min)")
        results = {}
        for label, procs, threads, out_name, cmd in runs:
            r = run_one(cmd, threads, tmp / f"log_{out_name}.txt")
            results[label] = r
            say(f"{label:22} {procs:5d} {r['threads']:12d} {r['wall_s']:8.1f} {args.images / r['wall_s']:15.3f} "
                f"{r['cli_images_per_s']:14.3f}  {r['load_before'].split()[2]} -> {r['load_after'].split()[2]}")
        say("\n# images/s (wall): N / seconds of the whole command (process start, model load, extraction, merge);")
        say("# images/s (CLI): what extract-regions prints on rank 0 (extraction loop + merge, model load excluded)")
        for label, r in results.items():
            say(f"# {label}: {r['summary']}")
        say("# (threads/proc: torch.get_num_threads() in a process started with the same environment)")
        if (tmp / "out1t").exists():
            say(f"# outputs, torchrun vs 1 process x{per_rank} thr (same threads): "
                f"{same_regions(tmp / 'out1t', tmp / 'outN')}")
        say(f"# outputs, torchrun vs 1 process x{args.threads_total} thr (float sums differ with the thread count): "
            f"{same_regions(tmp / 'out1', tmp / 'outN')}")
        say("# On an oversubscribed machine (load average above the core count) a multi-threaded process loses time "
            "at every OpenMP barrier whose threads are not all running, so P one-thread processes can beat one "
            "P-thread process; the row with the same threads per process isolates the sharding overhead.")
        say(f"# end: {load_line()}")
    finally:
        if args.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.out is not None:
        from regionclip.utils import atomic_path

        with atomic_path(args.out) as p:
            p.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
