"""An incremental, crash-safe vector index over the regions of a feature store (docs/SEARCH.md).

Layout of an index folder::

    manifest.json            {format, backend, dtype, embed_dim, source: {features_dir, meta, class_names},
                             segments: [{name, shards: [{name, fingerprint, num_regions}], num_regions, backend}]}
    segments/seg-00000/      one per `index` run that found new shards:
        vectors.npy          [N, D] normalised float16/32 (exact back-end) | faiss.index (faiss back-end)
        image.npy [N] int32 (row of images.json), row.npy [N] int32 (row in its shard), boxes.npy [N, 4] float32,
        objectness.npy / det_score.npy [N] float32 (NaN: absent), cls.npy [N] int32 (-1: absent)
        images.json          {shards: [names], images: [{key, file_name, path, shard, width, height}]}

Crash safety: a segment is built in a hidden temp folder and renamed into place, then ``manifest.json`` is
replaced atomically; readers only follow the manifest. A kill at any point leaves the previous index intact; the
next writer deletes temp folders and segments the manifest does not list (their shards are indexed again). Writers
hold a lock on ``.lock`` (released by the OS if the process dies).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from ..utils import write_json_atomic
from .backends import BACKENDS, VECTORS_FILE, FaissOptions, SegmentVectors, build_faiss, fsync_dir
from .features import ShardInfo, feats_dim, list_shards, load_store_index, read_shard, weights_of

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

FORMAT = "regionclip-search/1"
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Hit:
    """One search result. ``box`` XYXY in original-image pixels; ``score`` cosine similarity to the query."""

    rank: int
    score: float
    key: str
    file_name: str
    box: tuple[float, float, float, float]
    shard: str
    row: int
    path: Optional[str] = None  # absolute image path when it existed at index time
    objectness: Optional[float] = None
    det_score: Optional[float] = None
    class_name: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Segment:
    """A loaded segment: vectors + per-row metadata (memory-mapped) + its image table."""

    name: str
    vectors: SegmentVectors
    arrays: dict[str, np.ndarray]
    shards: list[str]
    images: list[dict[str, Any]] = field(default_factory=list)


class RegionIndex:
    """Open with :meth:`open`, create or extend with :meth:`build` / :meth:`add_shards`, query with :meth:`search`."""

    def __init__(self, index_dir: PathLike, manifest: dict[str, Any]) -> None:
        self.dir = Path(index_dir)
        self.manifest = manifest
        self._segments: Optional[list[_Segment]] = None

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        return str(self.manifest["backend"])

    @property
    def embed_dim(self) -> Optional[int]:
        """D of the indexed vectors; None for an index of an empty store."""
        d = self.manifest["embed_dim"]
        return None if d is None else int(d)

    @property
    def num_regions(self) -> int:
        return sum(int(s["num_regions"]) for s in self.manifest["segments"])

    @property
    def source_meta(self) -> dict[str, Any]:
        return self.manifest["source"]["meta"]

    @property
    def weights(self) -> Optional[str]:
        """The checkpoint the features were extracted with (as recorded by extract-regions), or None."""
        return weights_of(self.source_meta)

    @property
    def indexed_shards(self) -> list[str]:
        return [sh["name"] for s in self.manifest["segments"] for sh in s["shards"]]

    # ------------------------------------------------------------------ open / build
    @classmethod
    def open(cls, index_dir: PathLike) -> "RegionIndex":
        """Open an index folder written by :meth:`build` (reads only the manifest; segments load on first search)."""
        p = Path(index_dir) / MANIFEST
        if not p.is_file():
            raise FileNotFoundError(f"{index_dir} is not a region index (no {MANIFEST}); build one with "
                                    "`regionclip index FEATURES_DIR -o INDEX_DIR`")
        with open(p, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{p} is in format {manifest.get('format')!r}; this version reads {FORMAT!r} "
                             "(rebuild it with `regionclip index --rebuild`)")
        return cls(index_dir, manifest)

    @classmethod
    def build(cls, features_dir: PathLike, index_dir: PathLike, backend: str = "faiss", *, dtype: str = "float16",
              faiss_options: Optional[FaissOptions] = None, rebuild: bool = False,
              progress: bool = False) -> "RegionIndex":
        """Index the regions of ``features_dir`` into ``index_dir``; an existing index gets only the new shards.

        Args:
            backend: ``"faiss"`` (approximate for large segments, needs faiss-cpu) or ``"exact"``.
            dtype: storage dtype of the exact back-end's vectors (float16 halves disk and memory traffic; cosine
                error < 1e-3).
            rebuild: start over (the old index stays readable until the new manifest replaces it).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        index_dir = Path(index_dir)
        with _writer_lock(index_dir):
            existing = (index_dir / MANIFEST).is_file() and not rebuild
            if existing:
                idx = cls.open(index_dir)
                if idx.backend != backend:
                    raise ValueError(f"{index_dir} is an index of back-end {idx.backend!r}; pass --backend "
                                     f"{idx.backend} to add to it, or --rebuild to rebuild it as {backend!r}")
            else:
                old = cls.open(index_dir).manifest if (index_dir / MANIFEST).is_file() else None
                manifest: dict[str, Any] = {"format": FORMAT, "backend": backend, "dtype": dtype, "embed_dim": None,
                            "faiss": asdict(faiss_options or FaissOptions()), "source": None, "segments": [],
                            "next_segment": old["next_segment"] if old else 0}
                idx = cls(index_dir, manifest)
            idx._add_locked(Path(features_dir), progress=progress)
        return idx

    def add_shards(self, features_dir: Optional[PathLike] = None, *, progress: bool = False) -> int:
        """Index the shards of the feature store that are not indexed yet; returns the number of regions added."""
        src = Path(features_dir) if features_dir is not None else Path(self.manifest["source"]["features_dir"])
        with _writer_lock(self.dir):
            fresh = RegionIndex.open(self.dir)  # another process may have added segments since we opened
            self.manifest, self._segments = fresh.manifest, None
            before = self.num_regions
            self._add_locked(src, progress=progress)
        return self.num_regions - before

    def _add_locked(self, features_dir: Path, *, progress: bool) -> None:
        seg_root = self.dir / "segments"
        seg_root.mkdir(parents=True, exist_ok=True)
        # temp folders of a killed run and segments a killed run never listed; the segments of the manifest on disk
        # stay (a --rebuild replaces them only once its own manifest is written)
        listed = {s["name"] for s in self.manifest["segments"]}
        if (self.dir / MANIFEST).is_file():
            listed |= {s["name"] for s in RegionIndex.open(self.dir).manifest["segments"]}
        for d in seg_root.iterdir():
            if d.name not in listed:
                shutil.rmtree(d, ignore_errors=True)
        shards = list_shards(features_dir)
        new = self._new_shards(features_dir, shards)
        if not new:
            if not self.manifest["segments"]:  # a new (or rebuilt) index of an empty store: still a valid index
                write_json_atomic(self.manifest, self.dir / MANIFEST, indent=1)
            logger.info("index %s is up to date (%d shards)", self.dir, len(shards))
            return
        name = f"seg-{int(self.manifest['next_segment']):05d}"
        tmp = seg_root / f".{name}.tmp-{os.getpid()}"
        try:
            record = _write_segment(tmp, new, self.manifest, progress=progress)
            os.replace(tmp, seg_root / name)
            fsync_dir(seg_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest["segments"].append({"name": name, **record})
        self.manifest["next_segment"] = int(self.manifest["next_segment"]) + 1
        write_json_atomic(self.manifest, self.dir / MANIFEST, indent=1)
        listed = {s["name"] for s in self.manifest["segments"]}
        for d in seg_root.iterdir():  # segments of the index this rebuild replaced
            if d.name not in listed:
                shutil.rmtree(d, ignore_errors=True)
        self._segments = None

    def _set_source(self, features_dir: Path, first: Optional[ShardInfo]) -> None:
        meta = first.meta if first is not None else {}
        store_index = load_store_index(features_dir) or {}
        self.manifest["source"] = {"features_dir": str(features_dir.resolve()), "meta": meta,
                                   "class_names": store_index.get("class_names")}
        dim = meta.get("embed_dim")
        if dim is None and first is not None:
            dim = feats_dim(first)
        self.manifest["embed_dim"] = None if dim is None else int(dim)

    def _new_shards(self, features_dir: Path, shards: list[ShardInfo]) -> list[ShardInfo]:
        """Shards not indexed yet, after checking the store is the one (same model, unchanged shards) indexed."""
        if self.manifest["source"] is None:
            self._set_source(features_dir, shards[0] if shards else None)
        src = self.manifest["source"]
        done = {sh["name"]: sh["fingerprint"] for s in self.manifest["segments"] for sh in s["shards"]}
        by_name = {s.name: s for s in shards}
        for s in shards:
            if s.meta != src["meta"]:
                raise ValueError(f"{s.path} was extracted with other settings or another checkpoint than the "
                                 f"regions in {self.dir}:\n  index: {src['meta']}\n  shard: {s.meta}\n"
                                 "index it into another folder, or pass --rebuild")
            if s.name in done and done[s.name] != s.fingerprint:
                raise ValueError(f"{s.path} changed since it was indexed (extract-regions --overwrite?); the index "
                                 f"{self.dir} is stale: pass --rebuild")
        gone = sorted(set(done) - set(by_name))
        if gone:
            logger.warning("%d indexed shards are no longer in %s (%s...); their regions stay searchable",
                           len(gone), features_dir, gone[0])
        return [s for s in shards if s.name not in done]

    # ------------------------------------------------------------------ search
    def load(self) -> "RegionIndex":
        """Load every segment now (faiss files are read into memory, vectors memory-mapped) instead of on the first
        search; returns self."""
        for seg in self._load():
            if self.backend == "faiss":
                seg.vectors.faiss_index  # noqa: B018 - the property reads the file
        return self

    def _load(self) -> list[_Segment]:
        if self._segments is None:
            segs = []
            for rec in self.manifest["segments"]:
                d = self.dir / "segments" / rec["name"]
                with open(d / "images.json", encoding="utf-8") as f:
                    table = json.load(f)
                arrays = {k: np.load(d / f"{k}.npy", mmap_mode="r")
                          for k in ("image", "row", "boxes", "objectness", "det_score", "cls")}
                segs.append(_Segment(rec["name"], SegmentVectors(d, self.backend, rec["backend"]), arrays,
                                     table["shards"], table["images"]))
            self._segments = segs
        return self._segments

    def check_queries(self, queries: Any) -> np.ndarray:
        """[D] or [Q, D] (tensor/array) -> [Q, D] float32 L2-normalised; a width other than the index's raises."""
        q = queries.detach().cpu().float().numpy() if hasattr(queries, "detach") else np.asarray(queries, np.float32)
        q = q.reshape(1, -1) if q.ndim == 1 else q
        if q.ndim != 2:
            raise ValueError(f"query embedding must be [D] or [Q, D], got shape {tuple(q.shape)}")
        if self.manifest["embed_dim"] is None:
            raise ValueError(f"{self.dir} holds no regions yet: extract some, then run `regionclip index` again")
        if q.shape[1] != self.embed_dim:
            raise ValueError(
                f"query embedding has width {q.shape[1]} but the regions in {self.dir} are {self.embed_dim}-d "
                f"(extracted with {self.weights or 'an unrecorded checkpoint'}); embed the query with that "
                "checkpoint (--weights) or search an index built from features of your checkpoint")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.all(np.isfinite(q)) or np.any(norms == 0):
            raise ValueError("query embedding is zero or not finite")
        return (q / norms).astype(np.float32)

    def search(self, query: Any, top_k: int = 50, *, nprobe: Optional[int] = None) -> list[Hit]:
        """The ``top_k`` regions most similar (cosine) to ``query`` ([D] raw or normalised embedding)."""
        return self.search_batch(query, top_k, nprobe=nprobe)[0]

    def search_batch(self, queries: Any, top_k: int = 50, *, nprobe: Optional[int] = None) -> list[list[Hit]]:
        """:meth:`search` for [Q, D] queries at once (one pass over each segment)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        q = self.check_queries(queries)
        segs = self._load()
        per_seg = [s.vectors.search(q, top_k, nprobe) for s in segs]
        out = []
        for qi in range(len(q)):
            cands = [(float(sc), si, int(r)) for si, (scores, rows) in enumerate(per_seg)
                     for sc, r in zip(scores[qi].tolist(), rows[qi].tolist()) if r >= 0]
            cands.sort(key=lambda c: (-c[0], c[1], c[2]))
            out.append(self._hits(segs, cands[:top_k]))
        return out

    def _hits(self, segs: list[_Segment], cands: list[tuple[float, int, int]]) -> list[Hit]:
        """Hits of (score, segment, row) candidates; the metadata of each segment is gathered in one fancy-index
        read (element-wise memmap reads cost ~50 us each)."""
        names = self.manifest["source"].get("class_names")
        meta: dict[int, dict[str, list]] = {}
        for si in {c[1] for c in cands}:
            rows = np.asarray([c[2] for c in cands if c[1] == si])
            meta[si] = {k: v[rows].tolist() for k, v in segs[si].arrays.items()}
        seen: dict[int, int] = {}
        out = []
        for rank, (score, si, _row) in enumerate(cands, 1):
            j = seen[si] = seen.get(si, -1) + 1  # position of this row in meta[si] (same order as cands)
            a = {k: v[j] for k, v in meta[si].items()}
            seg, cls = segs[si], int(a["cls"])
            im = seg.images[int(a["image"])]
            out.append(Hit(rank=rank, score=score, key=im["key"], file_name=im["file_name"],
                           box=_box4(a["boxes"]), shard=seg.shards[im["shard"]], row=int(a["row"]),
                           path=im.get("path"), objectness=_opt(a["objectness"]), det_score=_opt(a["det_score"]),
                           class_name=(names[cls] if names and 0 <= cls < len(names) else
                                       (str(cls) if cls >= 0 else None)),
                           width=im.get("width"), height=im.get("height")))
        return out

    def iter_regions(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """(segment name, row, [D] vector) of every region (exact back-end only; for tests and debugging)."""
        for seg in self._load():
            for r in range(len(seg.arrays["image"])):
                yield seg.name, r, np.asarray(seg.vectors.vectors[r], np.float32)


def _box4(b: Sequence[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in b)
    return x1, y1, x2, y2


def _opt(v: Any) -> Optional[float]:
    v = float(v)
    return None if math.isnan(v) else v


def _write_segment(tmp: Path, shards: Sequence[ShardInfo], manifest: dict[str, Any], *, progress: bool
                   ) -> dict[str, Any]:
    """Normalise and write the regions of ``shards`` into the new segment folder ``tmp``; build the back-end."""
    tmp.mkdir(parents=True)
    n = sum(s.num_regions for s in shards)
    d = manifest["embed_dim"]
    dtype = np.float16 if manifest["dtype"] == "float16" or manifest["backend"] == "faiss" else np.float32
    vec = open_memmap(tmp / VECTORS_FILE, mode="w+", dtype=dtype, shape=(n, int(d or 0)))
    meta = {"image": np.zeros(n, np.int32), "row": np.zeros(n, np.int32), "boxes": np.zeros((n, 4), np.float32),
            "objectness": np.full(n, np.nan, np.float32), "det_score": np.full(n, np.nan, np.float32),
            "cls": np.full(n, -1, np.int32)}
    images: list[dict[str, Any]] = []
    pos = 0
    for si, sh in enumerate(tqdm(shards, desc="index shards", unit="shard", disable=not progress)):
        t = read_shard(sh)
        feats = np.asarray(t["feats"], np.float32)
        if feats.shape[1] != d:
            raise ValueError(f"{sh.path}: feats are {feats.shape[1]}-d but the store's meta says {d}")
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        m = len(feats)
        vec[pos:pos + m] = feats / np.where(norms > 0, norms, 1.0)  # a zero row stays zero (never matches)
        meta["boxes"][pos:pos + m] = t["boxes"]
        meta["row"][pos:pos + m] = np.arange(m)
        for src, dst in (("objectness", "objectness"), ("scores", "det_score"), ("classes", "cls")):
            if src in t:
                meta[dst][pos:pos + m] = t[src]
        for im in sh.images:
            s, c = int(im["start"]), int(im["count"])
            meta["image"][pos + s:pos + s + c] = len(images)
            images.append({"key": im["key"], "file_name": im["file_name"], "path": _existing(im["file_name"]),
                           "shard": si, "width": im.get("width"), "height": im.get("height")})
        pos += m
    vec.flush()
    del vec
    for k, v in meta.items():
        np.save(tmp / f"{k}.npy", v)
    write_json_atomic({"shards": [s.name for s in shards], "images": images}, tmp / "images.json")
    info: dict[str, Any] = {"kind": "matrix", "dtype": np.dtype(dtype).name}
    if manifest["backend"] == "faiss":
        vectors = np.load(tmp / VECTORS_FILE, mmap_mode="r")
        info = build_faiss(vectors, tmp, FaissOptions(**manifest["faiss"]))
        del vectors
        (tmp / VECTORS_FILE).unlink()  # faiss keeps its own (float16) copy
    return {"shards": [{"name": s.name, "fingerprint": s.fingerprint, "num_regions": s.num_regions}
                       for s in shards], "num_regions": n, "backend": info}


def _existing(file_name: str) -> Optional[str]:
    p = Path(file_name)
    return str(p.resolve()) if p.is_file() else None


class _writer_lock:
    """Exclusive writer lock on ``index_dir/.lock`` (POSIX record lock: released when the process dies)."""

    def __init__(self, index_dir: Path) -> None:
        self.dir = index_dir

    def __enter__(self) -> "_writer_lock":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._f = open(self.dir / ".lock", "w")
        try:
            import fcntl

            fcntl.lockf(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: concurrent writers are the user's responsibility
            pass
        except OSError:
            self._f.close()
            raise RuntimeError(f"another `regionclip index` is writing {self.dir}; wait for it to finish") from None
        return self

    def __exit__(self, *_: Any) -> None:
        self._f.close()
