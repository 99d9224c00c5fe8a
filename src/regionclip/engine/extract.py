"""Region feature extraction over many images, batched, into a resumable sharded store (docs/DESIGN.md#region-features, extended).

Region sources (``regions=``):

* ``"rpn"``: the top-k offline-RPN proposals (docs/DESIGN.md#region-features mode A): ``boxes`` [R, 4], ``feats`` [R, D],
  ``objectness`` [R] raw RPN logits, in objectness order.
* ``"detections"``: proposals classified and post-processed as the detector does (docs/DESIGN.md#region-features mode B): ``boxes``
  [M, 4], ``classes`` [M], ``probs`` [M, K+1] (before RPN multiplication, background last), ``scores`` [M], and
  ``feats`` [M, D] of each detection's source proposal (rows repeat when one proposal gives several classes).
* ``"boxes"``: user boxes (GT mode): ``boxes`` [R, 4] as given, ``feats`` [R, D], plus ``probs``/``classes``
  when a vocabulary is given and ``category_ids`` when the boxes came from annotations.

Boxes are XYXY float32 in original-image pixels; ``feats`` are the raw attnpool embeddings (not normalized).

Store layout (``output_dir``)::

    shards/shard-00000.safetensors   rows of many images concatenated; the safetensors header metadata holds the
                                     run fingerprint and the per-image row ranges -> a shard is one atomic file
    index.json                       {meta, fields, shards, images: [{key, file_name, shard, start, count, ...}],
                                     errors}; rebuilt from the shards, rewritten atomically after every shard
    original/<name>.pth              with write_original: the original tool's per-image dicts (docs/DESIGN.md#region-features naming)

Resuming: a shard is written to a temp file and renamed, so it either exists complete or not at all. A re-run
reads the finished image keys from the shards, deletes temp leftovers, and processes only the rest; an image is
never in two shards. A different run fingerprint in the same folder is an error, and a lock file refuses two
concurrent runs on one folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from ..checkpoint.io import save_file_atomic
from ..data.loader import IncompleteRunError, InferenceItem
from ..modeling.recognizer import foreground_probs
from ..ops.boxes import clip_boxes, nonempty, scale_boxes
from ..parallel.distributed import DistInfo, all_gather_object, barrier
from ..parallel.sharding import shard_items
from ..pipeline import ItemError, Pipeline, RunOptions, run_batch
from ..structures import PreparedImage, Proposals
from ..text.vocabulary import Vocabulary
from ..utils import TORCH_DTYPES, lock_dir, write_json_atomic

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

FORMAT = "regionclip-regions/1"
REGION_MODES = ("rpn", "detections", "boxes")
DTYPES = TORCH_DTYPES  # save dtypes of feats/probs: the compute-dtype table (regionclip.utils), defined once
_SHARD_RE = re.compile(r"^shard-(\d{5,})(-r\d+)?\.safetensors$")  # -r<rank>: written by one rank of a sharded run
_TMP_RE = re.compile(r"^\.shard-\d{5,}(-r\d+)?\.safetensors\..*\.tmp$")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extraction run: the pipeline's per-call settings (``run``) plus what only extraction has.

    regions: ``"rpn"`` | ``"detections"`` | ``"boxes"`` (see the module docstring).
    run: the :class:`~regionclip.pipeline.RunOptions` the images run with - ``max_proposals`` (the k best RPN
        proposals per image; proposals come sorted by objectness, so this equals the original's
        ``OFFLINE_RPN_POST_NMS_TOPK_TEST k``), ``dtype`` (autocast of the backbone and RoI head; the RPN always
        runs in float32 because box decoding in 16-bit loses pixels), ``chunk_size``, ``batch_size``,
        ``num_workers``, ``pad_mixed_sizes``, ``max_pixels`` and, for ``"detections"``, ``postprocess``. Every
        default is RunOptions' own. Extraction always keeps every region's features and probabilities
        (:func:`run_options_for`).
    save_dtype: dtype of the stored ``feats``/``probs``.
    shard_mb / shard_images: a shard is written when either is reached (bounds memory and lost work on a kill).
    write_original: also write the original tool's per-image ``.pth`` dicts.
    """

    regions: str = "rpn"
    run: RunOptions = field(default_factory=RunOptions)
    save_dtype: str = "float32"
    shard_mb: float = 256.0
    shard_images: int = 1000
    write_original: bool = False

    def __post_init__(self) -> None:
        if self.regions not in REGION_MODES:
            raise ValueError(f"regions must be one of {REGION_MODES}, got {self.regions!r}")
        if self.save_dtype not in DTYPES:
            raise ValueError(f"save_dtype must be one of {sorted(DTYPES)}, got {self.save_dtype!r}")
        if not isinstance(self.run, RunOptions):
            raise TypeError(f"run must be a RunOptions (RunOptions(max_proposals=100, ...)), got "
                            f"{type(self.run).__name__}")


def run_options_for(cfg: ExtractConfig) -> RunOptions:
    """The pipeline settings of an extraction run: ``cfg.run``, keeping every region's features and
    probabilities, and never skipping proposals (extraction encodes every region it is asked for; work skipping
    is a detection-only optimisation)."""
    return cfg.run.override(skip_unreachable=False, keep_probs=True, keep_features=True)


@torch.no_grad()
def extract_batch(pipeline: Pipeline, prepared: Sequence[PreparedImage], cfg: ExtractConfig, *,
                  regions: Optional[Sequence[Proposals]] = None, vocabulary: Optional[Vocabulary] = None
                  ) -> list[dict[str, Tensor]]:
    """Region records of a batch of prepared images (one backbone pass over the batch, chunked region head).

    Args:
        prepared: images from :meth:`Pipeline.prepare` / :meth:`Pipeline.iter_batches`.
        regions: ``regions="boxes"``: per image the user boxes in the resized frame (:meth:`Pipeline.user_regions`).
        vocabulary: required for ``"detections"``, optional for ``"boxes"``.
    Returns:
        per image a dict of CPU tensors (float32; see the module docstring for the keys of each mode).
    """
    options = run_options_for(cfg)
    if cfg.regions == "detections":
        if vocabulary is None:
            raise ValueError("regions='detections' needs a vocabulary (class embeddings)")
        out_d = []
        for d in pipeline.detect_prepared(prepared, vocabulary, options):
            if d.features is None or d.probs is None:  # run_options_for keeps both; never drop an image quietly
                raise RuntimeError("detections without features / probabilities: run with keep_features and "
                                   "keep_probs")
            out_d.append({"boxes": d.boxes.float().cpu(), "feats": d.features.float().cpu(),
                          "classes": d.labels.cpu(), "probs": d.probs.float().cpu(), "scores": d.scores.float().cpu()})
        return out_d
    if cfg.regions == "boxes":
        if regions is None or len(regions) != len(prepared):
            raise ValueError("regions='boxes' needs one [R, 4] box tensor per image")
    else:
        regions = pipeline.proposals(prepared, options)  # float32: boxes must stay exact
    emb = pipeline.encode(pipeline.features(prepared, options), [r.boxes for r in regions], options)
    out, start = [], 0
    for p, r in zip(prepared, regions):
        n = len(r.boxes)
        e = emb[start:start + n]
        start += n
        # back to the original frame; empty boxes are dropped with their features (the original forgot the feats)
        b = clip_boxes(scale_boxes(r.boxes.float(), 1 / p.scale_xy[0], 1 / p.scale_xy[1]), *p.original_hw)
        keep = nonempty(b) if cfg.regions == "rpn" else torch.ones(n, dtype=torch.bool, device=b.device)
        rec = {"boxes": b[keep].cpu(), "feats": e[keep].cpu()}
        if r.objectness_logits is not None:
            rec["objectness"] = r.objectness_logits[keep].float().cpu()
        if vocabulary is not None and cfg.regions == "boxes":
            probs = pipeline.classify(e, vocabulary).float()
            fg = foreground_probs(pipeline.model.has_background, probs)
            rec["probs"] = probs.cpu()
            rec["classes"] = (fg.argmax(dim=1) if len(probs) else torch.zeros(0, dtype=torch.long)).cpu()
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------- the store
class RegionStore:
    """The sharded output folder (see the module docstring). Use as a context manager; ``add`` then ``close``."""

    def __init__(self, output_dir: PathLike, meta: dict[str, Any], *, shard_mb: float = 256.0,
                 shard_images: int = 1000, save_dtype: str = "float32", extra_index: Optional[dict] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        # one rank of a sharded run (docs/DESIGN.md#sharding) writes only its own "-r<rank>" shards and no index;
        # rank 0 rebuilds index.json from every rank's shards at the end
        self.suffix = f"-r{rank}" if world_size > 1 else ""
        self.dir = Path(output_dir)
        self.shard_dir = self.dir / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.meta = json.loads(json.dumps(meta))  # normalised (tuples -> lists) so it compares with the stored one
        self.shard_bytes = int(shard_mb * (1 << 20))
        self.shard_images = shard_images
        self.save_dtype = DTYPES[save_dtype]
        self.extra_index = extra_index or {}
        self._lock = lock_dir(self.dir, f".lock{self.suffix}", what="extraction")
        self.images: dict[str, dict] = {}
        self.shards: list[dict] = []
        self.errors: dict[str, dict] = {}
        self._pending: list[tuple[dict, dict[str, Tensor]]] = []
        self._pending_bytes = 0
        self._next_shard = 0
        try:
            self._scan()
        except BaseException:
            self._lock.close()
            raise

    def _scan(self) -> None:
        for f in self.shard_dir.iterdir():
            t = _TMP_RE.match(f.name)
            if t and (t.group(1) or "") == self.suffix:
                f.unlink()  # one of our shard writes, interrupted before its atomic rename
        for f in sorted(self.shard_dir.iterdir()):
            m = _SHARD_RE.match(f.name)
            if not m:
                continue
            if (m.group(2) or "") == self.suffix:
                self._next_shard = max(self._next_shard, int(m.group(1)) + 1)
            try:
                with safe_open(str(f), framework="pt") as sf:
                    header = json.loads(sf.metadata()["regionclip"])
            except Exception as e:  # not written by us (atomic), but a disk error could still leave one
                logger.warning("removing unreadable shard %s (%s); its images will be extracted again", f, e)
                f.unlink()
                continue
            if header.get("meta") != self.meta:
                raise ValueError(f"{self.dir} holds regions extracted with other settings:\n"
                                 f"  stored {header.get('meta')}"
                                 f"\n  now    {self.meta}\nuse another --output-dir, or --overwrite to start over")
            for im in header["images"]:
                if im["key"] in self.images:
                    raise ValueError(f"image {im['key']!r} is in two shards of {self.dir}; delete one of "
                                     f"{self.images[im['key']]['shard']} and {f.name}")
                self.images[im["key"]] = {**im, "shard": f.name}
            self.shards.append({"file": f.name, "num_images": len(header["images"]),
                                "num_regions": sum(im["count"] for im in header["images"])})
        if self.shards and not self.suffix:
            self.write_index()

    @property
    def done(self) -> set[str]:
        return set(self.images)

    def add(self, info: dict[str, Any], record: dict[str, Tensor]) -> None:
        """Queue one image's record (``info`` needs ``key``); writes a shard when the budget is reached."""
        if info["key"] in self.images or any(i["key"] == info["key"] for i, _ in self._pending):
            raise ValueError(f"image {info['key']!r} was already extracted into {self.dir}")
        self.errors.pop(info["key"], None)
        self._pending.append((info, record))
        self._pending_bytes += sum(t.numel() * t.element_size() for t in record.values())
        if self._pending_bytes >= self.shard_bytes or len(self._pending) >= self.shard_images:
            self.flush()

    def add_error(self, info: dict[str, Any], error: str) -> None:
        self.errors[info["key"]] = {**info, "error": error}

    def flush(self) -> None:
        """Write the queued images as one shard (atomically), then the index."""
        if not self._pending:
            return
        name = f"shard-{self._next_shard:05d}{self.suffix}.safetensors"
        fields = sorted({k for _, rec in self._pending for k in rec})
        tensors, images, start = {}, [], 0
        for f in fields:
            parts = [rec[f] for _, rec in self._pending if f in rec]
            if len(parts) != len(self._pending):
                raise ValueError(f"field {f!r} is missing for some images of the shard; all records of a run "
                                 "must have the same fields")
            t = torch.cat(parts)
            tensors[f] = t.to(self.save_dtype) if t.is_floating_point() and f in ("feats", "probs") else t
        for info, rec in self._pending:
            n = int(rec["boxes"].shape[0])
            images.append({**info, "start": start, "count": n})
            start += n
        header = {"format": FORMAT, "meta": self.meta, "images": images}
        save_file_atomic(tensors, self.shard_dir / name, metadata={"regionclip": json.dumps(header)})
        for im in images:
            self.images[im["key"]] = {**im, "shard": name}
        self.shards.append({"file": name, "num_images": len(images), "num_regions": start})
        self._next_shard += 1
        self._pending, self._pending_bytes = [], 0
        self.write_index()

    def write_index(self) -> Optional[Path]:
        """``index.json``: everything a reader needs, derived from the shards (so it can always be rebuilt). Not
        written by the ranks of a sharded run (rank 0 rebuilds it when every rank is done)."""
        if self.suffix:
            return None
        index = {"format": FORMAT, "meta": self.meta, **self.extra_index,
                 "num_images": len(self.images), "num_regions": sum(s["num_regions"] for s in self.shards),
                 "shards": self.shards, "images": list(self.images.values()), "errors": list(self.errors.values())}
        return write_json_atomic(index, self.dir / "index.json")

    def close(self) -> None:
        self.flush()
        self.write_index()
        self._lock.close()

    def __enter__(self) -> "RegionStore":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # interrupted (Ctrl-C, an error): the queued records are complete images, keep them
            try:
                self.flush()
            finally:
                self.write_index()
                self._lock.close()


# ---------------------------------------------------------------------------------------------------- reading
def load_index(output_dir: PathLike) -> dict[str, Any]:
    with open(Path(output_dir) / "index.json", encoding="utf-8") as f:
        return json.load(f)


def load_regions(output_dir: PathLike, key: Optional[str] = None) -> Union[dict[str, Tensor], dict[str, dict]]:
    """The records of one image (``key``) or of all images (``{key: record}``), read from the shards."""

    out_dir = Path(output_dir)
    index = load_index(out_dir)
    wanted = [im for im in index["images"] if key is None or im["key"] == key]
    if key is not None and not wanted:
        raise KeyError(f"image {key!r} is not in {out_dir}/index.json")
    cache: dict[str, dict[str, Tensor]] = {}
    result = {}
    for im in wanted:
        if im["shard"] not in cache:
            cache[im["shard"]] = load_file(str(out_dir / "shards" / im["shard"]))
        result[im["key"]] = {k: v[im["start"]:im["start"] + im["count"]] for k, v in cache[im["shard"]].items()}
    return result[key] if key is not None else result


def original_name(file_name: str) -> str:
    """The original tool's output name: base name up to the first '.' (``a.b.jpg`` -> ``a.pth``, docs/DESIGN.md#region-features)."""
    return Path(file_name).name.split(".")[0] + ".pth"


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class ExtractSummary:
    num_images: int
    num_done_before: int
    num_errors: int
    num_regions: int
    seconds: float
    output_dir: Path

    @property
    def images_per_s(self) -> float:
        return (self.num_images - self.num_done_before - self.num_errors) / max(self.seconds, 1e-9)


def extract_regions(pipeline: Pipeline, items: Sequence[InferenceItem], output_dir: PathLike,
                    cfg: ExtractConfig = ExtractConfig(), *, vocabulary: Optional[Vocabulary] = None,
                    model_id: str = "", progress: bool = True,
                    boxes_source: str = "", dist: Optional[DistInfo] = None) -> ExtractSummary:
    """Extract region records for ``items`` into ``output_dir`` (resuming a previous run there).

    Args:
        pipeline: the model's :class:`~regionclip.pipeline.Pipeline` (decoding, batching, per-image errors).
        items: the images (with ``boxes`` for ``regions="boxes"``), see :mod:`regionclip.data.loader`.
        vocabulary: the classes for ``"detections"`` (required) / ``"boxes"`` (optional).
        model_id: identifies the weights in the run fingerprint (e.g. checkpoint path + content fingerprint).
        dist: the rank of a ``torchrun`` run (docs/DESIGN.md#sharding): every rank reads the finished images before
            any rank writes, takes its balanced share of the rest, writes its own shards; rank 0 then rebuilds
            ``index.json`` from all of them. The summary counts this rank's images (all of them on rank 0).
    """
    dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))

    if cfg.regions == "boxes" and any(it.boxes is None for it in items):
        raise ValueError("regions='boxes' needs boxes for every image: a COCO json or a --boxes CSV/JSON file")
    if cfg.regions == "detections" and vocabulary is None:
        raise ValueError("regions='detections' needs a vocabulary (class embeddings)")
    if cfg.regions != "boxes" and getattr(pipeline.model, "rpn", None) is None:
        raise ValueError(f"regions={cfg.regions!r} needs RPN proposals but the model has no RPN: load RPN weights, "
                         "or use regions='boxes' with user / COCO boxes")
    emb = None if vocabulary is None else vocabulary.class_embeddings
    # the run fingerprint (stored in every shard, compared on resume): the settings that change what is stored
    run = cfg.run
    meta = {"format": FORMAT, "model": model_id, "embed_dim": pipeline.model.embed_dim,
            "input": asdict(pipeline.input_cfg),
            "extract": {"regions": cfg.regions, "topk": run.max_proposals, "dtype": run.dtype,
                        "save_dtype": cfg.save_dtype, "pad_mixed_sizes": run.pad_mixed_sizes},
            "vocabulary_sha256": None if emb is None else hashlib.sha256(emb.cpu().numpy().tobytes()).hexdigest(),
            "postprocess": asdict(run.postprocess) if cfg.regions == "detections" else None}
    extra = {"class_names": list(vocabulary.names) if vocabulary is not None else None}
    t0 = time.perf_counter()
    with RegionStore(output_dir, meta, shard_mb=cfg.shard_mb, shard_images=cfg.shard_images,
                     save_dtype=cfg.save_dtype, extra_index=extra, rank=dist.rank, world_size=dist.world_size) as store:
        barrier()  # every rank has read the finished images before any rank writes a shard
        done_before = len(store.done)
        todo = shard_items([it for it in items if it.key not in store.done], dist.rank, dist.world_size)
        if cfg.write_original:
            _warn_name_collisions(items)
        bar = tqdm(total=len(items), initial=done_before, unit="img", disable=not progress or not dist.is_main,
                   desc=f"extract {cfg.regions}", dynamic_ncols=True)
        t_run = time.perf_counter()
        n_seen = 0
        for batch in pipeline.iter_batches(todo, run_options_for(cfg), boxes_source=boxes_source):
            if isinstance(batch, ItemError):
                _skip(store, batch)
                n_seen += 1
                bar.update(1)
                continue
            records = run_batch(batch, lambda b: extract_batch(pipeline, b.prepared, cfg, regions=b.regions,
                                                               vocabulary=vocabulary))
            n_seen += len(batch.items)
            for it, p, rec in zip(batch.items, batch.prepared, records):
                if isinstance(rec, ItemError):
                    _skip(store, rec)
                    continue
                if it.category_ids is not None and cfg.regions == "boxes":
                    rec["category_ids"] = torch.as_tensor(it.category_ids, dtype=torch.int64)
                if cfg.regions == "boxes":  # the boxes as given (original frame, float32)
                    rec["boxes"] = torch.as_tensor(it.boxes, dtype=torch.float32).reshape(-1, 4)
                if cfg.write_original:
                    _write_original(Path(output_dir) / "original", it, rec)
                store.add(_info(it, p), rec)
            bar.update(len(batch.items) * dist.world_size)
            done_now = len(store.done) + len(store._pending) - done_before
            bar.set_postfix_str(f"{done_now / max(time.perf_counter() - t_run, 1e-9):.2f} img/s (model)")
        bar.close()
        if n_seen != len(todo):  # iter_batches checks its loader; this guards the loop above
            raise IncompleteRunError(f"extraction handled {n_seen} of {len(todo)} images (a bug in regionclip)")
    errors = store.errors
    if dist.distributed:  # rank 0 rebuilds the one index from every rank's shards and errors
        gathered = all_gather_object(store.errors)
        barrier()
        if dist.is_main:
            errors = {k: v for e in gathered for k, v in e.items()}
            with RegionStore(output_dir, meta, extra_index=extra) as merged:
                merged.errors = {k: v for k, v in errors.items() if k not in merged.images}
                store = merged
        barrier()
    return ExtractSummary(len(items), done_before, len(errors), sum(s["num_regions"] for s in store.shards),
                          time.perf_counter() - t0, Path(output_dir))


def _skip(store: RegionStore, err: ItemError) -> None:
    logger.warning("skipping %s: %s", err.item.file_name, err.error)
    store.add_error({"key": err.item.key, "file_name": err.item.file_name}, err.error)


def _info(it: InferenceItem, p: PreparedImage) -> dict[str, Any]:
    image_id = it.image_id if isinstance(it.image_id, (int, str)) or it.image_id is None else str(it.image_id)
    return {"key": it.key, "file_name": it.file_name, "image_id": image_id, "height": p.original_hw[0],
            "width": p.original_hw[1], "input_height": p.resized_hw[0], "input_width": p.resized_hw[1]}


def _write_original(folder: Path, it: InferenceItem, rec: dict[str, Tensor]) -> None:
    keys = ("boxes", "feats", "classes", "probs")  # exactly the original's dict (docs/DESIGN.md#region-features modes A and B)
    save_file_atomic({k: rec[k] for k in keys if k in rec}, folder / original_name(it.file_name))


def _warn_name_collisions(items: Sequence[InferenceItem]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        name = original_name(it.file_name)
        if name in seen:
            logger.warning("original-format files collide: %s and %s both become %s (the later one overwrites it, "
                           "as in the original tool); the sharded output keeps both", seen[name], it.file_name, name)
        seen[name] = it.file_name
