"""Streaming, resumable results: a JSONL journal per run, and the final COCO results JSON written from it.

Journal (``predictions.jsonl`` by default), append-only, one JSON object per line:

* line 1: ``{"meta": {"version": 1, "categories": [{"id", "name"}, ...], **settings}}`` - the fingerprint of the
  run's settings; a resumed run with other settings is refused (mixing them would silently corrupt the results);
* one line per finished image: ``{"key", "image_id", "file_name", "height", "width", "instances": [...]}`` with
  ``instances`` exactly the image's COCO results dicts (:func:`~regionclip.formats.coco_json.detections_to_coco`);
* one line per failed image: ``{"key", "file_name", "error"}``.

Each line is flushed and fsynced when written, so a killed run loses at most the image in flight. On resume the
journal is re-read: a partial last line (killed mid-write) is cut off with a warning, a corrupt line elsewhere is
an error. Failed images are *not* done: a resumed run retries them.

Duplicates - one rule everywhere (reading one journal, merging several): a finished result is never replaced by
an error line; among several results for the same key the *last* one wins (journals are append-only, so the last
line is the newest record); among errors the last one wins. :meth:`ResultsWriter.add` refuses a key that is
already done in its own journal, because that is a caller bug (resumed callers skip :attr:`ResultsWriter.done`).

The final files (:func:`write_results`) are written atomically: the results JSON (a list, images in the caller's
order, then score descending) and ``images.json`` (``{"images": [...], "categories": [...]}``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ..structures import Detections
from ..utils import atomic_path, write_json_atomic
from .coco_json import ResultsError, categories, check_labels, coco_to_detections, detections_to_coco

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1
JOURNAL_NAME = "predictions.jsonl"
# how to start over, in every journal error: the flag every command that journals accepts (detect, evaluate,
# extract-regions), and the API's argument
RESTART_HINT = "pass --overwrite (Python: resume=False)"


class JournalError(ResultsError):
    """A journal that cannot be resumed or merged (corrupt line, other settings, not a journal)."""


@dataclass
class ImageEntry:
    """One finished image of a journal; ``instances`` are its COCO results dicts, highest score first."""

    key: str
    image_id: Any
    file_name: Optional[str]
    height: int
    width: int
    instances: list[dict]

    def to_json(self) -> dict:
        return {"key": self.key, "image_id": self.image_id, "file_name": self.file_name, "height": self.height,
                "width": self.width, "instances": self.instances}


@dataclass
class Journal:
    """What a journal (or several merged) holds: ``meta``, finished ``entries`` and ``errors``, both by key in
    first-seen order."""

    meta: dict
    entries: dict[str, ImageEntry] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def categories(self) -> list[dict]:
        return list(self.meta.get("categories", []))

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    def record(self, line: Mapping[str, Any]) -> None:
        """Apply one journal line with the duplicate rule of the module docstring."""
        key = str(line["key"])
        if "error" in line:
            if key not in self.entries:
                self.errors[key] = str(line["error"])
            return
        self.errors.pop(key, None)
        self.entries.pop(key, None)  # re-insert: a newer record moves to the end of first-seen order
        self.entries[key] = ImageEntry(key, line["image_id"], line.get("file_name"), int(line["height"]),
                                       int(line["width"]), list(line["instances"]))

    def ordered_keys(self, order: Optional[Sequence[str]] = None) -> list[str]:
        """Finished keys in ``order`` (those not finished are left out); without ``order``: sorted keys, which is
        deterministic whatever way the images were split over processes."""
        if order is None:
            return sorted(self.entries)
        keys = [str(k) for k in order]
        extra = set(self.entries) - set(keys)
        if extra:
            logger.warning("%d finished image(s) of the journal are not in this run's image list and are left out "
                           "of the results, e.g. %s", len(extra), sorted(extra)[:3])
        return [k for k in keys if k in self.entries]

    def detections(self, order: Optional[Sequence[str]] = None) -> Iterator[tuple[str, Detections]]:
        """(key, Detections) of the finished images, rebuilt from their COCO dicts (masks decoded if present)."""
        names, ids = self.class_names, self.category_ids
        for k in self.ordered_keys(order):
            e = self.entries[k]
            yield k, coco_to_detections(e.instances, (e.height, e.width), names, ids, image_id=e.image_id,
                                        file_name=e.file_name)


def _canonical(obj: Any) -> Any:
    """What ``obj`` reads back as after a JSON round trip (tuples -> lists, ...), for meta comparison."""
    return json.loads(json.dumps(obj))


def make_meta(class_names: Sequence[str], category_ids: Optional[Sequence[int]] = None,
              settings: Optional[Mapping[str, Any]] = None) -> dict:
    """The journal's meta line: version, the vocabulary's categories, and the caller's settings fingerprint."""
    return _canonical({"version": JOURNAL_VERSION, "categories": categories(class_names, category_ids),
                       **dict(settings or {})})


def _meta_mismatch(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any],
                   other: str = "now") -> JournalError:
    diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    shown = "; ".join(f"{k}: {str(found.get(k))[:60]} in the journal, {str(expected.get(k))[:60]} {other}"
                      for k in diff[:5])
    return JournalError(f"{path} was written by a run with other settings or input files ({shown}); use another "
                        f"output folder, or start over: {RESTART_HINT}")


def read_journal(path: PathLike, *, expected_meta: Optional[Mapping[str, Any]] = None,
                 repair: bool = False) -> Journal:
    """Read a journal. A partial last line is ignored with a warning (``repair=True`` also cuts it off the file,
    so appending can continue); a corrupt line before the last, or a meta other than ``expected_meta``, raises
    :class:`JournalError`. A journal cut before its meta line was complete reads as empty with ``meta == {}``."""
    path = Path(path)
    raw = path.read_bytes()
    journal = Journal(meta={})
    lines = raw.split(b"\n")  # the last element is b"" for a complete file
    good_end = 0
    have_meta = False
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            good_end += len(line) + (0 if last else 1)
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            if not last:
                raise JournalError(f"{path} line {i + 1} is corrupt (not only the last line, so this is not an "
                                   f"interrupted write); delete the file or start over: {RESTART_HINT}") from None
            logger.warning("%s: dropping a partial last line left by an interrupted run", path)
            break
        if not have_meta:
            if "meta" not in obj:
                raise JournalError(f"{path} does not start with a {{\"meta\": ...}} line: not a regionclip results "
                                   "journal; use another output folder")
            journal.meta, have_meta = obj["meta"], True
            if expected_meta is not None and journal.meta != _canonical(dict(expected_meta)):
                raise _meta_mismatch(path, journal.meta, expected_meta)
        elif "key" not in obj:
            raise JournalError(f"{path} line {i + 1} has no \"key\"; not a regionclip results journal")
        else:
            journal.record(obj)
        good_end += len(line) + (0 if last else 1)
    if repair and good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if repair and good_end and not raw[:good_end].endswith(b"\n"):
        with open(path, "ab") as f:  # a complete last line whose newline was not written yet
            f.write(b"\n")
    return journal


def merge_journals(paths: Sequence[PathLike], *, expected_meta: Optional[Mapping[str, Any]] = None) -> Journal:
    """One :class:`Journal` from several (e.g. one per process of a sharded run), read in the given order with the
    module's duplicate rule. All metas must be equal (and equal to ``expected_meta`` if given). Together with
    :func:`write_results` and an image ``order`` the final files do not depend on how images were sharded."""
    if not paths:
        raise ValueError("merge_journals needs at least one journal path")
    merged: Optional[Journal] = None
    first = Path(paths[0])
    for p in paths:
        j = read_journal(p, expected_meta=expected_meta)
        if merged is None:
            merged = Journal(meta=j.meta)
        elif j.meta and not merged.meta:  # the earlier journals were cut before their meta line: no entries
            merged.meta, first = j.meta, Path(p)
        elif j.meta and j.meta != merged.meta:
            raise _meta_mismatch(Path(p), j.meta, merged.meta, other=f"in {first}")
        for e in j.entries.values():
            merged.record(e.to_json())
        for k, err in j.errors.items():
            merged.record({"key": k, "error": err})
    assert merged is not None
    return merged


def write_results(journal: Journal, out_dir: PathLike, *, order: Optional[Sequence[str]] = None,
                  results_name: str = "results.json", images_name: Optional[str] = "images.json") -> list[dict]:
    """Write ``<out_dir>/<results_name>`` (COCO results list) and ``<out_dir>/<images_name>`` (``{"images",
    "categories"}``; None: not written), both atomically, and return the results list.

    Images come in ``order`` (keys; default sorted keys), each image's instances by score descending (stable).
    Two finished keys with the same ``image_id`` are an error: their detections would merge in COCO tools.
    """
    out_dir = Path(out_dir)
    keys = journal.ordered_keys(order)
    seen: dict[Any, str] = {}
    results: list[dict] = []
    images: list[dict] = []
    for k in keys:
        e = journal.entries[k]
        iid = json.dumps(e.image_id)
        if iid in seen:
            raise ResultsError(f"images {seen[iid]!r} and {k!r} both have image_id {e.image_id}; give every image "
                               "its own id")
        seen[iid] = k
        results += sorted(e.instances, key=lambda r: -r["score"])
        images.append({"id": e.image_id, "file_name": e.file_name if e.file_name is not None else k,
                       "height": e.height, "width": e.width})
    write_json_atomic(results, out_dir / results_name)
    if images_name:
        write_json_atomic({"images": images, "categories": journal.categories}, out_dir / images_name)
    return results


def _json_id(image_id: Any) -> Any:
    if isinstance(image_id, (bool, np.bool_)):
        raise TypeError(f"image_id must be an int or a str, got {image_id!r}")
    if isinstance(image_id, (int, np.integer)):
        return int(image_id)
    if isinstance(image_id, str):
        return image_id
    if hasattr(image_id, "item"):  # 0-d tensor
        return _json_id(image_id.item())
    raise TypeError(f"image_id must be an int or a str, got {type(image_id).__name__} {image_id!r}")


class ResultsWriter:
    """Append finished images to ``<out_dir>/<journal_name>`` and write the final results from it.

    Usage (``regionclip detect`` / ``evaluate`` / the demo)::

        with ResultsWriter(out, class_names, category_ids, settings=meta, resume=True) as w:
            todo = [it for it in items if it.key not in w.done]
            for it, det in predict(todo):
                w.add(it.key, det, image_id=it.image_id, file_name=it.file_name)   # or w.add_error(key, msg)
            results = w.finalize(order=[it.key for it in items])

    ``resume=False`` starts the journal over (atomically replacing an old one). ``fsync=False`` only flushes per
    image; then call :meth:`sync` per batch. For a sharded run give each process its own ``journal_name`` and merge
    with :func:`merge_journals` + :func:`write_results`.
    """

    def __init__(self, out_dir: PathLike, class_names: Sequence[str], category_ids: Optional[Sequence[int]] = None,
                 *, settings: Optional[Mapping[str, Any]] = None, resume: bool = True,
                 journal_name: str = JOURNAL_NAME, results_name: str = "results.json",
                 images_name: Optional[str] = "images.json", fsync: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / journal_name
        self.class_names = list(class_names)
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.results_name, self.images_name, self.fsync = results_name, images_name, fsync
        self.meta = make_meta(self.class_names, self.category_ids, settings)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        journal = read_journal(self.path, expected_meta=self.meta, repair=True) \
            if resume and self.path.exists() else Journal(meta={})
        if not journal.meta:  # new, overwritten, or cut before its meta line was complete
            journal = Journal(meta=self.meta)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"meta": self.meta}) + "\n", encoding="utf-8")
        elif journal.entries or journal.errors:
            logger.info("%s: resuming, %d image(s) done, %d failed earlier (retried)", self.path,
                        len(journal.entries), len(journal.errors))
        self.journal = journal
        self._image_ids = {json.dumps(e.image_id): k for k, e in journal.entries.items()}
        # unbuffered: each line goes to the OS in os.write calls, so a failed write can be cut back exactly
        self._f: Optional[Any] = open(self.path, "ab", buffering=0)

    # ---- state
    @property
    def done(self) -> set[str]:
        """Keys of the finished images (skip them); failed images are not in it, so they are retried."""
        return set(self.journal.entries)

    @property
    def errors(self) -> dict[str, str]:
        return dict(self.journal.errors)

    # ---- writing
    def _write(self, obj: dict) -> None:
        if self._f is None:
            raise ResultsError(f"{self.path}: the writer is closed")
        data = (json.dumps(obj) + "\n").encode("utf-8")
        fd = self._f.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (a full disk writes what fits, then fails)
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except OSError as e:
            # disk full, quota, I/O error: cut the half-written line off, so the journal stays a list of complete
            # records (the image is redone on resume), and name the file
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the reader drops a partial last line anyway
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def add(self, key: str, det: Detections, *, image_id: Any = None, file_name: Optional[str] = None
            ) -> list[dict]:
        """Record one finished image; returns its COCO results dicts. ``image_id`` / ``file_name`` default to
        ``det.image_id`` / ``det.file_name``."""
        key = str(key)
        if key in self.journal.entries:
            raise ResultsError(f"image {key!r} is already recorded in {self.path}; skip the keys in `done`")
        iid = image_id if image_id is not None else det.image_id
        if iid is None:
            raise ValueError(f"image {key!r}: no image_id (pass image_id=... or set Detections.image_id)")
        iid = _json_id(iid)
        check_labels(det, len(self.class_names), f"image {key!r}")
        if json.dumps(iid) in self._image_ids:
            raise ResultsError(f"images {self._image_ids[json.dumps(iid)]!r} and {key!r} both have image_id {iid}")
        instances = detections_to_coco(det, iid, self.category_ids)
        h, w = det.image_size
        entry = {"key": key, "image_id": iid, "file_name": file_name if file_name is not None else det.file_name,
                 "height": int(h), "width": int(w), "instances": instances}
        self._write(entry)
        self.journal.record(entry)
        self._image_ids[json.dumps(iid)] = key
        return instances

    def add_error(self, key: str, error: str, *, file_name: Optional[str] = None) -> None:
        """Record a failed image (it stays out of the results and is retried on resume)."""
        entry = {"key": str(key), "file_name": file_name, "error": str(error)}
        self._write(entry)
        self.journal.record(entry)

    def sync(self) -> None:
        """fsync the journal (with ``fsync=False``, call once per batch)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            try:
                self.sync()
            finally:
                self._f.close()
                self._f = None

    def finalize(self, order: Optional[Sequence[str]] = None) -> list[dict]:
        """Close the journal and write the results JSON and images.json (see :func:`write_results`)."""
        self.close()
        return write_results(self.journal, self.out_dir, order=order, results_name=self.results_name,
                             images_name=self.images_name)

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
