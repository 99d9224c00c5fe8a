"""Output formats of ``regionclip detect --format``: JSONL, CSV, YOLO - streaming writers and their parsers.

Every writer has the same interface: ``add(key, det)`` per image, ``close()`` at the end (also as a context
manager; an exception inside the ``with`` block leaves no partial output). Files become visible atomically: the
JSONL / CSV file at ``close()``, each YOLO label file when its image is added and ``classes.txt`` at ``close()``.
The COCO format is the results JSON of :mod:`regionclip.formats.journal`; :func:`export_journal` renders a finished
(possibly resumed or merged) journal in any of the others, so resumable runs work for every format.

Formats (boxes XYXY in original pixels unless said otherwise; ``label`` = contiguous class index):

* ``jsonl``: one image per line ``{"key", "image_id", "file_name", "height", "width", "boxes": [[x1, y1, x2, y2]],
  "scores", "labels", "names"}`` plus ``"masks"`` (COCO RLE per detection) when the detections have masks.
  Floats are the shortest decimal that reads back as the same float32.
* ``csv``: header ``file_name,image_id,x1,y1,x2,y2,score,label,name``, one row per detection (images without
  detections have no row; the image size is not stored). Floats as in ``jsonl``.
* ``yolo``: ``labels/<image stem>.txt`` with ``class cx cy w h`` normalised to [0, 1] (boxes clipped to the image
  first) and, with ``with_scores=True``, the score as a 6th column; ``classes.txt`` (one name per line). An image
  without detections gets an empty file. Two images with the same stem are an error (YOLO cannot tell them apart).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, TextIO, Union

import numpy as np
import torch

from ..structures import Detections
from ..utils import atomic_path
from .coco_json import decode_masks, encode_masks

PathLike = Union[str, os.PathLike]
FORMATS = ("coco", "jsonl", "yolo", "csv")
CSV_HEADER = ["file_name", "image_id", "x1", "y1", "x2", "y2", "score", "label", "name"]
DetsLike = Union[Mapping[str, Detections], Iterable[Union[Detections, tuple[str, Detections]]]]


def f32(values: Any) -> list:
    """float32 values as Python floats with the shortest decimal that reads back as the same float32 (numpy's
    ``str`` of a float32 is that shortest repr), so text formats round-trip exactly and stay short."""
    arr = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, np.float32)
    flat = [float(str(v)) for v in arr.reshape(-1)]
    return np.array(flat, dtype=object).reshape(arr.shape).tolist()


def _json_scalar(x: Any) -> Any:
    """An image id as a JSON value (numpy / 0-d tensor ids unwrapped; anything else exotic as its str)."""
    if isinstance(x, (np.generic, torch.Tensor)) and np.ndim(x) == 0:
        x = x.item()
    return x if x is None or isinstance(x, (int, str, float)) else str(x)


def _pairs(dets: DetsLike) -> Iterable[tuple[str, Detections]]:
    items = dets.items() if isinstance(dets, Mapping) else dets
    for x in items:
        if isinstance(x, Detections):
            key = x.file_name if x.file_name is not None else str(x.image_id)
            yield key, x
        else:
            yield x[0], x[1]


class FormatWriter:
    """Base of the streaming writers: ``add(key, det)`` then ``close()``; an exception in ``with`` aborts."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._closed = False

    def add(self, key: str, det: Detections) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Work done at a successful close, before the atomic renames."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finish()
            self._stack.close()

    def abort(self) -> None:
        """Drop everything not yet made visible (temp files are deleted)."""
        if not self._closed:
            self._closed = True
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "FormatWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type is not None else self.close()


class _TextFileWriter(FormatWriter):
    """One text file written through :func:`regionclip.utils.atomic_path` (renamed into place at close)."""

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._f: TextIO = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))


class JsonlWriter(_TextFileWriter):
    """``detections.jsonl``: one image per line (see the module docstring)."""

    def add(self, key: str, det: Detections) -> None:
        h, w = det.image_size
        line = {"key": str(key), "image_id": _json_scalar(det.image_id), "file_name": det.file_name,
                "height": int(h), "width": int(w), "boxes": f32(det.boxes.reshape(-1, 4)), "scores": f32(det.scores),
                "labels": [int(x) for x in det.labels.tolist()], "names": det.names}
        if det.masks is not None:
            line["masks"] = encode_masks(det.masks) if len(det) else []
        self._f.write(json.dumps(line) + "\n")


class CsvWriter(_TextFileWriter):
    """``detections.csv``: one row per detection (see the module docstring)."""

    def __init__(self, path: PathLike) -> None:
        super().__init__(path)
        self._csv = csv.writer(self._f)
        self._csv.writerow(CSV_HEADER)

    def add(self, key: str, det: Detections) -> None:
        fname = det.file_name if det.file_name is not None else str(key)
        iid = "" if det.image_id is None else _json_scalar(det.image_id)
        for b, s, lab, name in zip(f32(det.boxes.reshape(-1, 4)), f32(det.scores), det.labels.tolist(), det.names):
            self._csv.writerow([fname, iid, *b, s, int(lab), name])


class YoloWriter(FormatWriter):
    """``labels/<stem>.txt`` per image + ``classes.txt`` (see the module docstring)."""

    def __init__(self, out_dir: PathLike, class_names: Sequence[str], *, with_scores: bool = False,
                 decimals: int = 6) -> None:
        super().__init__()
        self.out_dir, self.class_names = Path(out_dir), list(class_names)
        self.with_scores, self.decimals = with_scores, decimals
        self._stems: dict[str, str] = {}

    def add(self, key: str, det: Detections) -> None:
        name = det.file_name if det.file_name is not None else str(key)
        stem = Path(name).stem
        if stem in self._stems:
            raise ValueError(f"YOLO labels are named by image stem, and {self._stems[stem]!r} and {name!r} are both "
                             f"{stem!r}; write the images of different folders in separate runs (or use --format "
                             "jsonl / csv)")
        self._stems[stem] = name
        if len(det) and int(det.labels.max()) >= len(self.class_names):
            raise ValueError(f"image {name}: label {int(det.labels.max())} but only {len(self.class_names)} "
                             "class names were given")
        h, w = det.image_size
        b = det.boxes.detach().cpu().double().reshape(-1, 4)
        b[:, 0::2] = b[:, 0::2].clamp(0, w) / w
        b[:, 1::2] = b[:, 1::2].clamp(0, h) / h
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]],
                             1).tolist()
        d = self.decimals
        lines = []
        for row, lab, s in zip(cxcywh, det.labels.tolist(), det.scores.tolist()):
            cols = [str(int(lab))] + [f"{v:.{d}f}" for v in row] + ([f"{s:.{d}f}"] if self.with_scores else [])
            lines.append(" ".join(cols) + "\n")
        with atomic_path(self.out_dir / "labels" / f"{stem}.txt") as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")

    def _finish(self) -> None:
        with atomic_path(self.out_dir / "classes.txt") as tmp:
            tmp.write_text("".join(n + "\n" for n in self.class_names), encoding="utf-8")


def open_writer(fmt: str, out_dir: PathLike, class_names: Sequence[str], *, with_scores: bool = False
                ) -> FormatWriter:
    """The writer of ``fmt`` in ``out_dir``: ``detections.jsonl``, ``detections.csv`` or ``labels/`` +
    ``classes.txt``. ``coco`` has no writer here: it is :class:`~regionclip.formats.journal.ResultsWriter`."""
    if fmt == "jsonl":
        return JsonlWriter(Path(out_dir) / "detections.jsonl")
    if fmt == "csv":
        return CsvWriter(Path(out_dir) / "detections.csv")
    if fmt == "yolo":
        return YoloWriter(out_dir, class_names, with_scores=with_scores)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(f for f in FORMATS if f != 'coco')} "
                     "(coco is written by ResultsWriter)")


def _write_all(writer: FormatWriter, dets: DetsLike) -> FormatWriter:
    with writer:
        for key, det in _pairs(dets):
            writer.add(key, det)
    return writer


def write_jsonl(dets: DetsLike, path: PathLike) -> Path:
    """All images to one JSONL file (``dets``: Detections, (key, Detections) pairs or a {key: Detections})."""
    return _write_all(JsonlWriter(path), dets).path  # type: ignore[attr-defined]


def write_csv(dets: DetsLike, path: PathLike) -> Path:
    """All detections to one CSV file."""
    return _write_all(CsvWriter(path), dets).path  # type: ignore[attr-defined]


def write_yolo(dets: DetsLike, out_dir: PathLike, class_names: Sequence[str], *, with_scores: bool = False
               ) -> Path:
    """YOLO ``labels/`` + ``classes.txt`` under ``out_dir``; returns the labels folder."""
    _write_all(YoloWriter(out_dir, class_names, with_scores=with_scores), dets)
    return Path(out_dir) / "labels"


def export_journal(journal: Any, fmt: str, out_dir: PathLike, *, order: Optional[Sequence[str]] = None,
                   with_scores: bool = False) -> Optional[Path]:
    """Render a finished :class:`~regionclip.formats.journal.Journal` (finished images in ``order``) in ``fmt``.
    Returns the written file / folder, or None for ``coco`` (already written by the results writer)."""
    if fmt == "coco":
        return None
    with open_writer(fmt, out_dir, journal.class_names, with_scores=with_scores) as w:
        for key, det in journal.detections(order):
            w.add(key, det)
    return Path(out_dir) / "labels" if fmt == "yolo" else w.path  # type: ignore[attr-defined]


# ---- parsers (the inverse of each writer) ------------------------------------------------------------------------

def _names_from_pairs(pairs: Iterable[tuple[int, str]]) -> list[str]:
    """Class names rebuilt from (label, name) pairs; labels never seen become ``str(label)``."""
    table = dict(pairs)
    return [table.get(i, str(i)) for i in range(max(table) + 1)] if table else []


def _dets(boxes: Any, scores: Any, labels: Any, hw: tuple[int, int], names: Sequence[str], **kw: Any) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64),
                      (int(hw[0]), int(hw[1])), list(names), **kw)


def read_jsonl(path: PathLike, class_names: Optional[Sequence[str]] = None) -> list[tuple[str, Detections]]:
    """Parse :class:`JsonlWriter` output. ``class_names`` default: rebuilt from the files' label/name pairs."""
    rows = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    names = list(class_names) if class_names is not None else _names_from_pairs(
        (lab, n) for r in rows for lab, n in zip(r["labels"], r["names"]))
    out = []
    for r in rows:
        hw = (r["height"], r["width"])
        masks = decode_masks(r["masks"], hw) if "masks" in r else None
        out.append((r["key"], _dets(r["boxes"], r["scores"], r["labels"], hw, names, masks=masks,
                                    image_id=r.get("image_id"), file_name=r.get("file_name"))))
    return out


def read_csv(path: PathLike, class_names: Optional[Sequence[str]] = None,
             image_sizes: Optional[Mapping[str, tuple[int, int]]] = None) -> list[tuple[str, Detections]]:
    """Parse :class:`CsvWriter` output into (file_name, Detections), images in first-seen order. The CSV has no
    image size: it is taken from ``image_sizes[file_name]`` when given, else (0, 0) (unknown)."""
    groups: dict[str, list[dict]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["file_name"], []).append(row)
    names = list(class_names) if class_names is not None else _names_from_pairs(
        (int(r["label"]), r["name"]) for rows in groups.values() for r in rows)
    out = []
    for fname, rows in groups.items():
        iid: Any = rows[0]["image_id"]
        iid = int(iid) if iid.lstrip("-").isdigit() else (iid or None)
        out.append((fname, _dets([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows],
                                 [float(r["score"]) for r in rows], [int(r["label"]) for r in rows],
                                 (image_sizes or {}).get(fname, (0, 0)), names, image_id=iid, file_name=fname)))
    return out


def read_yolo(out_dir: PathLike, image_sizes: Mapping[str, tuple[int, int]],
              class_names: Optional[Sequence[str]] = None) -> dict[str, Detections]:
    """Parse :class:`YoloWriter` output: {stem: Detections} in original pixels. ``image_sizes``: (H, W) by image
    stem or file name (YOLO files are normalised, so the size is needed). Without a score column scores are 1.
    ``class_names`` default: ``<out_dir>/classes.txt``."""
    out_dir = Path(out_dir)
    if class_names is None:
        class_names = (out_dir / "classes.txt").read_text(encoding="utf-8").splitlines()
    sizes = {Path(k).stem: v for k, v in image_sizes.items()}
    out = {}
    for p in sorted((out_dir / "labels").glob("*.txt")):
        if p.stem not in sizes:
            raise KeyError(f"{p}: no image size given for {p.stem!r} (pass image_sizes={{stem: (H, W)}})")
        h, w = sizes[p.stem]
        rows = [ln.split() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        boxes, scores, labels = [], [], []
        for r in rows:
            cx, cy, bw, bh = (float(v) for v in r[1:5])
            boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            scores.append(float(r[5]) if len(r) > 5 else 1.0)
            labels.append(int(r[0]))
        out[p.stem] = _dets(boxes, scores, labels, (h, w), class_names, file_name=p.stem)
    return out
