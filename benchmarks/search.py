"""Region-search benchmark: build time, index size on disk, query latency p50/p99 and recall@k of the faiss
back-end against exact search, on synthetic unit vectors written as a real ``extract-regions`` feature store.

Synthetic data: uniformly random unit vectors have no neighbourhood structure (every top-50 is noise, which is the
worst case for any inverted-file index and unlike CLIP embeddings), so by default the vectors are clustered: a
shared mean direction (CLIP embeddings of one model share one) + one of ``--clusters`` centres + per-vector noise.
Queries are fresh noisy copies of random stored vectors. ``--uniform`` runs the adversarial case.

    python benchmarks/search.py --n 1000000 --out benchmarks/results/search_cpu.txt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_store(folder: Path, n: int, dim: int, *, clusters: int, uniform: bool, seed: int,
                    shard_rows: int = 100_000) -> np.random.Generator:
    """Write ``n`` float16 region embeddings in the extract-regions shard format (``regions`` = rpn)."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    meta = {"format": "regionclip-regions/1", "model": "synthetic", "embed_dim": dim, "synthetic": True}
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    for si, s in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - s)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        if not uniform:
            x = 0.6 * mean + centres[rng.integers(0, clusters, m)] + x * (0.7 / np.sqrt(dim))
        boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (m, 1))
        per_image = 100  # 100 regions per image, as --topk 100
        images = [{"key": f"img{s + i:09d}", "file_name": f"img{s + i:09d}.jpg", "start": i, "count":
                   min(per_image, m - i), "width": 640, "height": 480} for i in range(0, m, per_image)]
        header = {"format": "regionclip-regions/1", "meta": meta, "images": images}
        save_file({"boxes": torch.from_numpy(boxes), "feats": torch.from_numpy(x).half(),
                   "objectness": torch.zeros(m)}, str(folder / "shards" / f"shard-{si:05d}.safetensors"),
                  metadata={"regionclip": json.dumps(header)})
    return rng


def make_queries(index_exact, nq: int, rng: np.random.Generator, uniform: bool) -> np.ndarray:
    vecs = index_exact._load()[0].vectors.vectors
    rows = np.sort(rng.choice(len(vecs), nq, replace=False))
    q = np.asarray(vecs[rows], np.float32)
    if uniform:
        q = rng.standard_normal(q.shape).astype(np.float32)
    else:
        q = q + rng.standard_normal(q.shape).astype(np.float32) * (0.7 / np.sqrt(q.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def latencies(index, queries: np.ndarray, k: int, **kw) -> tuple[np.ndarray, list]:
    """Per-query wall time (one query at a time, as `regionclip search` runs) and the hits."""
    index.search(queries[0], k, **kw)  # warm-up: loads the segment, touches the memmap
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(index.search(q, k, **kw))
        times.append(time.perf_counter() - t0)
    return np.asarray(times) * 1e3, results


def recall(truth: list, got: list) -> float:
    return float(np.mean([len({(h.shard, h.row) for h in t} & {(h.shard, h.row) for h in g}) / max(len(t), 1)
                          for t, g in zip(truth, got)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=50, help="queries timed on the exact back-end (slow)")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--clusters", type=int, default=20_000)
    ap.add_argument("--uniform", action="store_true", help="uniformly random unit vectors (adversarial)")
    ap.add_argument("--nprobe", default="8,16,32,64,128", help="faiss nprobe values to sweep")
    ap.add_argument("--workdir", help="where to write the store and indexes (default: a temp folder, deleted)")
    ap.add_argument("--out", help="append the report to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a line to write under the report's header")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from regionclip.search import RegionIndex
    from regionclip.search.backends import dir_size

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rc-search-bench-"))
    lines = [f"# benchmarks/search.py n={args.n} dim={args.dim} top_k={args.top_k} "
             f"data={'uniform' if args.uniform else f'clustered({args.clusters})'} queries={args.queries} | "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}, load average at start {os.getloadavg()[0]:.1f} "
             "(shared machine: latencies include contention)"]

    if args.note:
        lines.append(f"# {args.note}")

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        t0 = time.perf_counter()
        rng = synthetic_store(work / "feats", args.n, args.dim, clusters=args.clusters, uniform=args.uniform,
                              seed=args.seed)
        say(f"synthetic store: {time.perf_counter() - t0:.1f} s, {dir_size(work / 'feats') / 1e9:.2f} GB (float16)")
        built = {}
        for backend in ("exact", "faiss"):
            t0 = time.perf_counter()
            idx = RegionIndex.build(work / "feats", work / f"index-{backend}", backend=backend)
            secs = time.perf_counter() - t0
            size = dir_size(work / f"index-{backend}")
            say(f"{backend:>5} build: {secs:7.1f} s ({args.n / secs / 1e3:.0f}k regions/s); on disk "
                f"{size / 1e9:.3f} GB = {size / args.n * 1e6 / 1e9:.3f} GB per million regions; "
                f"segment {idx.manifest['segments'][0]['backend']}")
            built[backend] = RegionIndex.open(work / f"index-{backend}")
        queries = make_queries(built["exact"], args.queries, rng, args.uniform)
        t_ex, truth = latencies(built["exact"], queries[:args.exact_queries], args.top_k)
        say(f"exact search: p50 {np.percentile(t_ex, 50):.1f} ms, p99 {np.percentile(t_ex, 99):.1f} ms "
            f"({args.exact_queries} queries; recall 1 by definition)")
        # ground truth for all queries in one batched pass (same exact scores, faster than one at a time)
        truth = built["exact"].search_batch(queries, args.top_k)
        default_nprobe = built["faiss"].manifest["segments"][0]["backend"].get("nprobe")
        for npb in [int(v) for v in args.nprobe.split(",")]:
            t_f, got = latencies(built["faiss"], queries, args.top_k, nprobe=npb)
            mark = " (default)" if npb == default_nprobe else ""
            say(f"faiss nprobe {npb:>4}{mark}: p50 {np.percentile(t_f, 50):.2f} ms, p99 {np.percentile(t_f, 99):.2f} "
                f"ms, recall@{args.top_k} {recall(truth, got):.4f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
