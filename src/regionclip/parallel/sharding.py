"""Sharded inference on many processes (``torchrun``), for ``detect``, ``evaluate`` and ``extract-regions``.

``torchrun --nproc-per-node N [--nnodes M ...] -m regionclip.cli.main detect ...`` runs N×M copies of the command;
each reads the torchrun environment (:func:`regionclip.parallel.distributed.init_distributed`: one process per GPU on
``--device cuda``, gloo on CPU). The work is split so that the outputs equal a one-process run
(docs/DESIGN.md#sharding):

1. rank 0 reads every journal of the output folder (all ranks', from earlier runs of any size) and broadcasts the
   set of finished images, so every rank agrees on what is left and no image is done twice;
2. :func:`shard_items` splits what is left deterministically, balanced by cost (user boxes or image pixels), not by
   position;
3. each rank journals its images into its own file (``predictions.rank<r>.jsonl``), atomically per line;
4. after a barrier rank 0 merges every journal (:func:`regionclip.formats.merge_journals`) and writes the single
   final files in the input order, so they do not depend on the number of processes.

A rank killed half-way loses only its image in flight; re-running the same command redoes only missing images.
"""
from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from ..data.images import image_size
from ..data.loader import InferenceItem
from ..formats import JOURNAL_NAME, Journal, ResultsWriter, make_meta, merge_journals, read_journal, write_results
from ..utils import DirLock, lock_dir
from .distributed import DistInfo, barrier, broadcast_object

T = TypeVar("T")
LOCK_NAME = ".results.lock"  # held by rank 0 of the run writing the folder's journals


def item_cost(item: InferenceItem) -> float:
    """Relative cost of one image: its number of user boxes (the region head dominates), else its pixels in
    megapixels from the file header (RPN mode: the backbone and RPN scale with the image; the 1000 proposals are
    the same for every image). Unreadable files cost 1 (they fail fast)."""
    if item.boxes is not None:
        return 1.0 + float(len(item.boxes))
    try:
        h, w = image_size(item.file_name)
        return 1.0 + h * w / 1e6
    except (OSError, ValueError):
        return 1.0


def shard_items(items: Sequence[T], rank: int, world_size: int, cost: Optional[Callable[[T], float]] = None,
                key: Optional[Callable[[T], str]] = None) -> list[T]:
    """The items of ``rank`` out of ``world_size``: greedy longest-processing-time assignment (each item, costliest
    first, to the least loaded rank; ties by key and rank), returned in input order. Deterministic: every rank
    computes the same split from the same list."""
    if world_size <= 1:
        return list(items)
    # the default cost reads InferenceItem fields (boxes, file_name), hence Callable[[Any], float]
    cost_of: Callable[[Any], float] = cost if cost is not None else item_cost
    key_of: Callable[[T], str] = key if key is not None else (lambda it: str(getattr(it, "key", it)))
    order = sorted(range(len(items)), key=lambda i: (-cost_of(items[i]), key_of(items[i])))
    loads = [(0.0, r) for r in range(world_size)]
    heapq.heapify(loads)
    mine = []
    for i in order:
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(i)
        heapq.heappush(loads, (load + cost_of(items[i]), r))
    return [items[i] for i in sorted(mine)]


def journal_name(dist: DistInfo, base: str = JOURNAL_NAME) -> str:
    """``predictions.jsonl`` for one process, ``predictions.rank<r>.jsonl`` for rank r of a sharded run."""
    if not dist.distributed:
        return base
    stem, dot, ext = base.rpartition(".")
    return f"{stem}.rank{dist.rank}.{ext}" if dot else f"{base}.rank{dist.rank}"


def journals(out_dir: Path, base: str = JOURNAL_NAME) -> list[Path]:
    """Every journal of ``out_dir`` (the single-process one first, then ranks in order)."""
    stem, _, ext = base.rpartition(".")
    ranked = sorted(out_dir.glob(f"{stem}.rank*.{ext}"), key=lambda p: (len(p.name), p.name))
    return ([out_dir / base] if (out_dir / base).exists() else []) + ranked


class ShardedResults:
    """The results journal of one rank plus the cross-rank bookkeeping of a sharded run (see the module docstring).

    Usage::

        with ShardedResults(out, names, ids, settings=meta, dist=dist, resume=True) as res:
            mine = shard_items([it for it in items if it.key not in res.done], dist.rank, dist.world_size)
            for ...: res.writer.add(...)
            results = res.finalize(order=[it.key for it in items])   # the merged results on rank 0, else None
    """

    def __init__(self, out_dir: Path, class_names: Sequence[str], category_ids: Optional[Sequence[int]], *,
                 settings: Mapping[str, Any], dist: DistInfo, resume: bool = True, results_name: str = "results.json",
                 images_name: Optional[str] = "images.json", fsync: bool = True, what: str = "run") -> None:
        self.out_dir, self.dist = Path(out_dir), dist
        self.results_name, self.images_name = results_name, images_name
        self.meta = make_meta(class_names, category_ids, settings)
        self._lock: Optional[DirLock] = None
        done: set[str] = set()
        failed: Optional[BaseException] = None
        if dist.is_main:
            try:
                # one run per output folder (the lock of extract-regions): a second run on the same folder would
                # redo every image into the same journal. Rank 0 holds it for the whole run, for every rank.
                self._lock = lock_dir(self.out_dir, LOCK_NAME, what=what)
                for p in journals(self.out_dir):
                    if not resume:
                        p.unlink()
                        continue
                    done |= set(read_journal(p, expected_meta=self.meta, repair=True).entries)
            except (RuntimeError, ValueError, OSError) as e:
                failed = e
        # every rank learns of rank 0's failure (a lone raise would leave the other ranks waiting here)
        state = broadcast_object((done, None if failed is None else (type(failed).__name__, str(failed))))
        if failed is not None:
            self._release()
            raise failed
        if state[1] is not None:
            raise RuntimeError(f"rank 0 could not open {self.out_dir}: {state[1][0]}: {state[1][1]}")
        self.done: set[str] = state[0]  # before any rank writes: every rank sees the same set
        barrier()
        try:
            self.writer = ResultsWriter(self.out_dir, class_names, category_ids, settings=settings, resume=resume,
                                        journal_name=journal_name(dist), results_name=results_name,
                                        images_name=images_name, fsync=fsync)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def finalize(self, order: Optional[Sequence[str]] = None) -> Optional[list[dict]]:
        """Close this rank's journal, wait for every rank, and (rank 0) write the merged final files."""
        self.writer.close()
        barrier()
        out = None
        if self.dist.is_main:
            out = write_results(self.merged(), self.out_dir, order=order, results_name=self.results_name,
                                images_name=self.images_name)
        barrier()
        return out  # the lock is held until the context exits (the caller may still write exports)

    def merged(self) -> Journal:
        """Every rank's journal merged (duplicate rule of :mod:`regionclip.formats.journal`)."""
        return merge_journals(journals(self.out_dir), expected_meta=self.meta)

    def __enter__(self) -> "ShardedResults":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.writer.close()
        finally:
            self._release()


def rank_device(device: str, dist: DistInfo) -> str:
    """``cuda`` -> this rank's ``cuda:<LOCAL_RANK>`` in a sharded run; anything else unchanged."""
    if dist.distributed and device == "cuda":
        return f"cuda:{dist.local_rank}"
    if dist.distributed and device.startswith("cuda:"):
        raise ValueError(f"--device {device} under torchrun would put every rank on the same GPU; pass --device cuda "
                         "(each rank then takes cuda:LOCAL_RANK) or restrict GPUs with CUDA_VISIBLE_DEVICES")
    return device


def is_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
