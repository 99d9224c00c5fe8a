"""Vector back-ends of a search segment: ``exact`` (memory-mapped matrix, brute-force matmul) and ``faiss``.

A *segment* is the unit of an incremental index: the regions of the shards added by one ``index`` run, in one
folder. Every back-end stores L2-normalised embeddings, so inner product = cosine similarity.

* ``exact``: ``vectors.npy`` [N, D] float16 (or float32), memory-mapped; a query is a chunked float32 matmul with a
  running top-k. No approximation; the cost is O(N * D) per query (about 1-2 GB/s of vectors on 2 CPU cores).
* ``faiss`` (pip install faiss-cpu): ``faiss.index``. Segments of < ``ivf_min_rows`` regions use ``IndexFlatIP``
  (exact); larger ones an inverted file ``IVF{nlist},SQfp16`` (k-means coarse quantiser, float16 vectors, inner
  product); ``nprobe`` lists are scanned per query (the recall/speed knob, see docs/SEARCH.md).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..utils import require

BACKENDS = ("exact", "faiss")
VECTORS_FILE = "vectors.npy"
FAISS_FILE = "faiss.index"


@dataclass(frozen=True)
class FaissOptions:
    """IVF settings. ``nlist`` None: ``2 * sqrt(N)`` rounded to a power of two, in [64, 16384] (k-means training
    cost grows with nlist; 2*sqrt(N) keeps lists ~sqrt(N)/2 long). ``nprobe`` None: ``max(16, nlist // 16)``
    (scans ~6% of the lists; recall@50 >= 0.95 on clustered data, see benchmarks/results/search_cpu.txt)."""

    ivf_min_rows: int = 50_000
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    train_points_per_list: int = 40  # k-means sample = nlist * this (faiss warns below 39)
    kmeans_iters: int = 15  # enough for a coarse quantiser; training time is linear in it
    seed: int = 0


def _faiss() -> Any:
    # faiss's loader logs at INFO that it tried a per-ISA module first; the dynamic-dispatch build it then loads
    # has the AVX2 kernels, so that message is only noise in the CLI output
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return require("faiss", "search", "the faiss search back-end (or use --backend exact)")


def default_nlist(n: int) -> int:
    return int(min(16384, max(64, 2 ** round(math.log2(max(2 * math.sqrt(n), 1))))))


def default_nprobe(nlist: int) -> int:
    return int(min(nlist, max(16, nlist // 16)))


def build_faiss(vectors: np.ndarray, out_dir: Path, opts: FaissOptions, chunk: int = 200_000) -> dict[str, Any]:
    """Build ``out_dir/faiss.index`` from normalised ``vectors`` [N, D] (float16/32, may be a memmap).

    Returns the segment's back-end record (``kind`` flat|ivf, ``nlist``, ``nprobe``) for the manifest."""
    faiss = _faiss()
    n, d = vectors.shape
    if n < opts.ivf_min_rows:
        index = faiss.IndexFlatIP(d)
        info: dict[str, Any] = {"kind": "flat"}
    else:
        nlist = opts.nlist or default_nlist(n)
        index = faiss.index_factory(d, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = opts.kmeans_iters
        index.cp.seed = opts.seed
        rng = np.random.default_rng(opts.seed)
        m = min(n, nlist * opts.train_points_per_list)
        sample = np.sort(rng.choice(n, size=m, replace=False))  # sorted: sequential reads of the memmap
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        info = {"kind": "ivf", "nlist": nlist, "nprobe": opts.nprobe or default_nprobe(nlist)}
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(vectors[s:s + chunk], dtype=np.float32))
    faiss.write_index(index, str(out_dir / FAISS_FILE))
    return info


class SegmentVectors:
    """The searchable vectors of one segment (either back-end)."""

    def __init__(self, seg_dir: Path, backend: str, info: dict[str, Any]) -> None:
        self.dir, self.backend, self.info = seg_dir, backend, info
        self._faiss_index: Any = None
        self._vectors: Optional[np.ndarray] = None

    @property
    def vectors(self) -> np.ndarray:
        """[N, D] memory-mapped normalised embeddings (exact back-end)."""
        if self._vectors is None:
            self._vectors = np.load(self.dir / VECTORS_FILE, mmap_mode="r")
        return self._vectors

    @property
    def faiss_index(self) -> Any:
        if self._faiss_index is None:
            self._faiss_index = _faiss().read_index(str(self.dir / FAISS_FILE))
        return self._faiss_index

    def search(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query.

        Args:
            queries: [Q, D] float32, L2-normalised.
        Returns:
            scores [Q, k'] float32 (descending) and rows [Q, k'] int64, k' = min(k, N).
        """
        if self.backend == "exact":
            return exact_topk(self.vectors, queries, k)
        index = self.faiss_index
        k_eff = min(k, index.ntotal)
        if k_eff == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scanned = index.ntotal
        if self.info.get("kind") == "ivf":
            index.nprobe = int(nprobe or self.info["nprobe"])
            scanned = index.ntotal * min(1.0, index.nprobe / self.info["nlist"])
        small = len(queries) * scanned * index.d < SMALL_SCAN
        with _faiss_threads(1 if small else None):
            scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k_eff)
        # an IVF search that visits fewer than k vectors pads with -1: drop those columns per query later
        return scores.astype(np.float32), rows.astype(np.int64)


# searches of fewer multiply-adds than this run faiss single-threaded (see _faiss_threads). Measured on 2 busy
# cores: 20k x 64-d flat, 1 thread 0.6 ms vs 2 threads 50 ms; 31k x 640-d IVF scan, 1 thread 59 ms vs 2 threads 46 ms
SMALL_SCAN = 4_000_000


@contextlib.contextmanager
def _faiss_threads(n: Optional[int]) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads (None: unchanged). For a small scan OpenMP's thread start-up and
    spin-waiting cost far more than the work, on a loaded machine tens of milliseconds."""
    if n is None:
        yield
        return
    faiss = _faiss()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 131_072
               ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k over a (memory-mapped) matrix, chunk by chunk so memory stays O(chunk * D).

    Args:
        vectors: [N, D] float16/float32 normalised rows; queries: [Q, D] float32 normalised.
    Returns:
        scores [Q, k'] float32 descending, rows [Q, k'] int64 (k' = min(k, N)).
    """
    n = vectors.shape[0]
    k_eff = min(k, n)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for s in range(0, n, chunk):
        with warnings.catch_warnings():  # a read-only memmap slice: we never write to it, so no copy needed
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(np.ascontiguousarray(vectors[s:s + chunk]))
        # float16 rows: a float16 matmul (accumulates in float32; |error| < 1e-3) is several times faster on CPU
        # than converting the chunk to float32 first, which dominated the query time
        sc = (q.to(block.dtype) @ block.T).float()  # [Q, c]
        kk = min(k_eff, sc.shape[1])
        top_s, top_i = sc.topk(kk, dim=1)
        cand_s = torch.cat([best_s, top_s], 1)
        cand_i = torch.cat([best_i, top_i + s], 1)
        order = cand_s.topk(min(k_eff, cand_s.shape[1]), dim=1).indices
        best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return best_s.numpy().astype(np.float32), best_i.numpy().astype(np.int64)


def dir_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames of an atomic write) to disk; a no-op where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
