"""User boxes: one reader for every boxes-file format, one matching rule, one validation.

Boxes files (XYXY in original pixels unless said otherwise):

* COCO json (``images`` + ``annotations``, ``bbox`` XYWH): keyed by each image's ``file_name``; crowd annotations
  are skipped; an image without annotations gets an empty [0, 4] array;
* JSON ``{file_name: [[x1, y1, x2, y2], ...]}`` (an empty list = an image without boxes);
* CSV rows ``file_name,x1,y1,x2,y2`` (a first row naming these columns, or xmin,ymin,xmax,ymax, is a header; any other
  row with a field that is not a number is an error naming the line and column).

Dtype rule (why: the original's dataset mapper scales boxes inside a numpy array, so a box written with whole
numbers - an *integer* array - is truncated after scaling, a float box is not; see
``ops.boxes.scale_boxes_like_d2``): an image's boxes are int64 when every coordinate of every box is
written as an integer (``10``, not ``10.0``), else float32.

Matching rule (:func:`match_boxes`), per image, first hit wins:

1. an entry named exactly the image's key (the output key: path relative to the input folder, the path as given,
   or the dataset image id);
2. an entry named exactly the image's file path as given;
3. an entry with the same base name (``a/b/img.jpg`` -> ``img.jpg``), only when it is unambiguous: exactly one
   entry of the file has that base name and exactly one image of the run has it. Otherwise -> error.

An image with no entry is an error (naming the image and the file); write an empty list for an image without boxes.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]


class BadBoxesError(ValueError):
    """Invalid user boxes of one image; names the image, the first bad box and the boxes file."""

    def __init__(self, message: str, *, image_name: str = "", index: Optional[int] = None, source: str = "") -> None:
        super().__init__(message)
        self.image_name, self.index, self.source = image_name, index, source


class BoxesFileError(ValueError):
    """A boxes file that cannot be read or matched to the images."""


class _Item(Protocol):
    key: str
    file_name: str


def _box_array(boxes: Any, where: str) -> np.ndarray:
    """[R, 4] array with the dtype rule of the module docstring; anything not a list of 4 numbers is an error."""
    if not isinstance(boxes, (list, tuple)) or not all(
            isinstance(b, (list, tuple)) and len(b) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) for b in boxes):
        raise BoxesFileError(f"{where}: expected a list of [x1, y1, x2, y2] boxes (4 numbers each), got "
                             f"{str(boxes)[:80]}")
    if not boxes:
        return np.zeros((0, 4), np.float32)
    whole = all(isinstance(v, int) for b in boxes for v in b)
    return np.asarray(boxes, np.int64 if whole else np.float32).reshape(-1, 4)


def _number(s: str) -> Union[int, float]:
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        return float(s)


_CSV_COLUMNS = ("file_name", "x1", "y1", "x2", "y2")
# the names a header row may give each column (case-insensitive)
_CSV_HEADER_NAMES = ({"file_name", "filename", "file", "image", "image_name", "image_file", "path", "name", "key",
                      "image_id", "img"},
                     {"x1", "xmin", "x_min", "left", "x0"}, {"y1", "ymin", "y_min", "top", "y0"},
                     {"x2", "xmax", "x_max", "right"}, {"y2", "ymax", "y_max", "bottom"})


def _is_csv_header(row: Sequence[str]) -> bool:
    """A CSV row is a header only when it names the five columns (file_name,x1,y1,x2,y2 or a known synonym)."""
    return len(row) == 5 and all(v.strip().lower() in names for v, names in zip(row, _CSV_HEADER_NAMES))


def read_boxes_file(path: PathLike) -> dict[str, np.ndarray]:
    """Boxes per image, keyed by the image name as written in the file (see the module docstring for formats and
    the int64 / float32 rule). Returns {name: [R, 4] array}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"boxes file not found: {path}")
    raw: dict[str, list] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or not "".join(row).strip():
                    continue
                if not raw and _is_csv_header(row):
                    continue  # only a row of known column names is a header: a typo in data is not one
                if len(row) != 5:
                    raise BoxesFileError(f"{path} line {i + 1}: expected file_name,x1,y1,x2,y2, got {row}")
                nums = []
                for col, v in zip(_CSV_COLUMNS[1:], row[1:]):
                    try:
                        nums.append(_number(v))
                    except ValueError:
                        raise BoxesFileError(f"{path} line {i + 1}, column {col}: {v.strip()!r} is not a number; "
                                             "rows are file_name,x1,y1,x2,y2 (a header row may name the columns)"
                                             ) from None
                raw.setdefault(row[0].strip(), []).append(nums)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BoxesFileError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); expected a COCO json, "
                                 "{file_name: [[x1, y1, x2, y2], ...]} or a CSV file_name,x1,y1,x2,y2") from None
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            id2name = {im["id"]: str(im["file_name"]) for im in data["images"]}
            for name in id2name.values():
                raw.setdefault(name, [])
            for a in data["annotations"]:
                if a.get("iscrowd", 0):
                    continue
                if a["image_id"] not in id2name:
                    raise BoxesFileError(f"{path}: annotation {a.get('id')} refers to image_id {a['image_id']} "
                                         "which is not in \"images\"")
                x, y, w, h = a["bbox"]
                raw[id2name[a["image_id"]]].append([x, y, x + w, y + h])
        elif isinstance(data, dict):
            raw = {str(k): v for k, v in data.items()}
        else:
            raise BoxesFileError(f"{path}: expected a COCO json or {{file_name: [[x1, y1, x2, y2], ...]}}, got a "
                                 f"JSON {type(data).__name__}")
    return {k: _box_array(v, f"{path}, entry {k!r}") for k, v in raw.items()}


def _key_and_path(item: Union[tuple[str, str], _Item]) -> tuple[str, str]:
    if isinstance(item, tuple):
        return str(item[0]), str(item[1])
    return str(item.key), str(item.file_name)


def match_boxes(items: Sequence[Union[tuple[str, str], _Item]], boxes: dict[str, np.ndarray],
                source: str = "boxes file") -> list[np.ndarray]:
    """The boxes of each image, in ``items`` order, by the matching rule of the module docstring.

    Args:
        items: (key, file path) pairs, or objects with ``.key`` and ``.file_name`` (``InferenceItem``).
        boxes: {name: [R, 4]} from :func:`read_boxes_file`.
        source: the boxes file, for messages.
    """
    pairs = [_key_and_path(it) for it in items]
    by_base: dict[str, list[str]] = {}
    for entry in boxes:
        by_base.setdefault(Path(entry).name, []).append(entry)
    images_by_base: dict[str, list[str]] = {}
    for _, p in pairs:
        images_by_base.setdefault(Path(p).name, []).append(p)
    out = []
    for key, file_path in pairs:
        k = key if key in boxes else file_path if file_path in boxes else None
        if k is None:
            base = Path(file_path).name
            cands = by_base.get(base, [])
            if len(cands) > 1:
                raise BoxesFileError(f"{source}: image {file_path} matches several entries by base name "
                                     f"({', '.join(cands[:3])}); name the entries by the image key or path "
                                     f"(e.g. {key!r}) so they are unique")
            if cands and len(images_by_base[base]) > 1:
                raise BoxesFileError(f"{source}: entry {cands[0]!r} matches several images by base name "
                                     f"({', '.join(images_by_base[base][:3])}); name the entries by the image key "
                                     "or path so they are unique")
            k = cands[0] if cands else None
        if k is None:
            raise BoxesFileError(f"{source} has no boxes for image {file_path} (key {key!r}); add an entry for it "
                                 "(an empty list [] means the image has no boxes)")
        out.append(boxes[k])
    return out


def box_problem(boxes: Any, image_hw: tuple[int, int]) -> Optional[tuple[Optional[int], str]]:
    """The first problem of XYXY ``boxes`` [R, 4] on an image of (H, W) pixels, as (box index or None, reason),
    or None when all are valid. Same rules as ``ops.boxes.validate_boxes``: finite, x2 > x1 and y2 > y1 (zero
    width/height is rejected: such a region has no pixels to pool), not entirely outside the image (touching an
    edge from outside counts as outside). Boxes sticking out of the image are valid (they are clipped later)."""
    b = np.asarray(boxes.detach().cpu().numpy() if hasattr(boxes, "detach") else boxes, dtype=np.float64)
    if b.size == 0:
        return None
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        return None, f"boxes must have shape [R, 4] (x1, y1, x2, y2), got {tuple(b.shape)}"
    h, w = image_hw
    for i, (x1, y1, x2, y2) in enumerate(b.tolist()):
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return i, "contains NaN/inf"
        if x2 <= x1 or y2 <= y1:
            return i, ("has zero or negative width/height; boxes are XYXY (x1, y1, x2, y2) with x2 > x1 and y2 > y1 "
                       "- XYWH boxes must be converted (x2 = x + w, y2 = y + h)")
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            return i, f"lies entirely outside the {w}x{h} image"
    return None


def validate_user_boxes(boxes: Any, image_hw: tuple[int, int], *, source: str = "", image_name: str = "") -> None:
    """Raise :class:`BadBoxesError` naming the image, the first bad box and the boxes file when ``boxes`` [R, 4]
    (XYXY original pixels, array / tensor / nested list) are not valid on an image of ``image_hw`` (H, W); see
    :func:`box_problem`. Callers skip that image and continue."""
    problem = box_problem(boxes, image_hw)
    if problem is None:
        return
    i, reason = problem
    where = f" (from {source})" if source else ""
    img = image_name or "the image"
    if i is None:
        raise BadBoxesError(f"boxes of {img}{where}: {reason}", image_name=image_name, source=source)
    box = np.asarray(boxes.detach().cpu().numpy() if hasattr(boxes, "detach") else boxes).reshape(-1, 4)[i]
    raise BadBoxesError(f"box {i} {box.tolist()} of {img}{where} {reason}", image_name=image_name, index=i,
                        source=source)
