"""Dataset readers: COCO / OV-COCO json, LVIS v1 json and plain image folders (docs/DESIGN.md#regions).

Everything here is a pure function from files to a :class:`DetectionDataset`; there is no global registry. The
only table is :data:`REGISTERED_DATASETS`, which maps the original's detectron2 dataset names (docs/DESIGN.md#datasets) to
``(image folder, annotation file, kind)`` relative to a data root, so evaluation presets can say
``coco_2017_ovd_all_test`` and mean exactly what the original meant.

Conventions: boxes are XYXY float32 in original image pixels; ``labels`` are contiguous class indices into
``DetectionDataset.class_names``; ``DetectionDataset.category_ids[label]`` is the dataset's own category id (what
results files must contain, docs/DESIGN.md#results-files).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..ops.boxes import scale_boxes_like_d2
from .folders import folder_images

PathLike = Union[str, os.PathLike]
DatasetKind = Literal["coco", "lvis", "folder"]

# The original keeps at most this many GT boxes per LVIS image (``max_gt_per_img``, docs/DESIGN.md#regions).
LVIS_MAX_BOXES_PER_IMAGE = 500
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """An annotation file or image folder that cannot be read as the requested kind of dataset."""


@dataclass
class ImageRecord:
    """One image and its annotations.

    ``boxes``: [N, 4] XYXY float32, original pixels, *all* annotations including crowd ones; ``labels``: [N] int64
    contiguous indices; ``iscrowd``: [N] bool. Use :meth:`region_boxes` for the boxes the original feeds as regions
    in GT mode (crowd removed, clipped, empty removed).
    """

    image_id: Any
    file_name: str
    height: int
    width: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    # True where the json wrote the bbox as 4 integers: detectron2 then resizes it in an int array (truncating)
    int_boxes: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        self.int_boxes = (np.zeros(len(self.boxes), bool) if self.int_boxes is None
                          else np.asarray(self.int_boxes, dtype=bool).reshape(-1))
        if not (len(self.boxes) == len(self.labels) == len(self.iscrowd) == len(self.int_boxes)):
            raise DatasetError(f"image {self.image_id}: {len(self.boxes)} boxes, {len(self.labels)} labels and "
                               f"{len(self.iscrowd)} iscrowd flags; they must have the same length")

    @property
    def path(self) -> Path:
        return Path(self.file_name)

    @property
    def int_box_flags(self) -> np.ndarray:
        """[N] bool ``int_boxes``: always an array once constructed (``None`` becomes all False in __post_init__)."""
        if self.int_boxes is None:
            raise RuntimeError(f"image {self.image_id}: int_boxes was reset to None after construction; "
                               "set it to an [N] bool array")
        return self.int_boxes

    def region_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """GT-mode regions: ``(boxes [M, 4] XYXY float32, labels [M])`` without crowd boxes, clipped to the image,
        boxes of zero width or height removed (the original's test mapper, docs/DESIGN.md#regions)."""
        keep = ~self.iscrowd
        boxes = self.boxes[keep].copy()
        labels = self.labels[keep]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, self.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, self.height)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[nonempty], labels[nonempty]

    def region_boxes_resized(self, resized_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """GT-mode regions exactly as the original's test mapper produces them in the *resized* frame (docs/DESIGN.md#regions).

        Crowd removed, boxes scaled to ``resized_hw``, clipped, empty ones removed. A bbox written with integers in
        the json stays an integer array in detectron2's ``transform_instance_annotations``, so its scaled
        coordinates are truncated toward zero (e.g. ``gt_boxes.json``; real COCO files use floats). Reproducing
        this keeps GT-mode scores identical to the original's.
        """

        keep = ~self.iscrowd
        sx, sy = resized_hw[1] / self.width, resized_hw[0] / self.height
        boxes = scale_boxes_like_d2(torch.from_numpy(self.boxes[keep].astype(np.float64)), sx, sy,
                                    torch.from_numpy(self.int_box_flags[keep])).double().numpy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, resized_hw[1])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, resized_hw[0])
        nonempty = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)  # d2 nonempty()
        return boxes[nonempty].astype(np.float32), self.labels[keep][nonempty]


@dataclass
class DetectionDataset:
    """A list of :class:`ImageRecord` plus the dataset-level class tables.

    ``class_names``: the text for each contiguous class (COCO ``name``; LVIS prompt name ``name`` with ``_`` ->
    space and parentheses removed, docs/DESIGN.md#datasets). ``display_names``: the label shown by visualisation (detectron2
    ``thing_classes``: LVIS ``synonyms[0]``). ``category_ids[i]``: dataset category id of contiguous class ``i``.
    ``frequencies``: LVIS ``r``/``c``/``f`` per contiguous class (empty otherwise).
    """

    name: str
    kind: DatasetKind
    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    display_names: list[str] = field(default_factory=list)
    frequencies: list[str] = field(default_factory=list)
    annotation_file: Optional[Path] = None
    image_root: Optional[Path] = None

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.category_ids):
            raise DatasetError(f"{self.name}: {len(self.class_names)} class names but {len(self.category_ids)} "
                               "category ids")
        if not self.display_names:
            self.display_names = list(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def id_to_contiguous(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.category_ids)}

    @property
    def has_annotations(self) -> bool:
        return self.annotation_file is not None


def _read_json(path: PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); the file is probably truncated - download it again"
                           ) from None
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise DatasetError(f"{path} is not a COCO/LVIS-format {what}: it needs top-level 'images' and 'categories'")
    return data


def lvis_prompt_name(name: str) -> str:
    """``bat_(animal)`` -> ``bat animal``: the string the original fills into the prompt templates."""
    return name.replace("_", " ").replace("(", "").replace(")", "").strip()


def _xywh_to_xyxy(bbox: Sequence[float], where: str) -> list[float]:
    if len(bbox) != 4:
        raise DatasetError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _group_annotations(anns: list[dict], id_to_contiguous: dict[int, int], path: Path,
                       ) -> dict[Any, list[dict]]:
    by_image: dict[Any, list[dict]] = {}
    for a in anns:
        if a["category_id"] not in id_to_contiguous:
            raise DatasetError(f"{path}: annotation {a.get('id')} has category_id {a['category_id']}, which is not "
                               "in the file's 'categories'")
        by_image.setdefault(a["image_id"], []).append(a)
    return by_image


def _record(img: dict, file_name: str, anns: list[dict], id_to_contiguous: dict[int, int], path: Path,
            ) -> ImageRecord:
    where = f"{path}: image {img['id']}"
    boxes = [_xywh_to_xyxy(a["bbox"], where) for a in anns]
    return ImageRecord(image_id=img["id"], file_name=file_name, height=int(img["height"]), width=int(img["width"]),
                       boxes=np.array(boxes, np.float32).reshape(-1, 4),
                       labels=np.array([id_to_contiguous[a["category_id"]] for a in anns], np.int64),
                       iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
                       int_boxes=np.array([all(type(v) is int for v in a["bbox"]) for a in anns], bool))


def load_coco_json(json_file: PathLike, image_root: PathLike, *, name: Optional[str] = None) -> DetectionDataset:
    """Read a COCO-format detection json (incl. the OVR-CNN ``ovd_ins_{train,val}2017_{all,b,t}.json`` files).

    Contiguous class indices follow the category ids sorted ascending, as the original's loader does (hence the
    ``index_65/48/17`` orders of docs/DESIGN.md#datasets, whatever id space the file uses). Every image of the json is kept,
    also those without annotations (the OVD jsons only list annotated images anyway).
    """
    path = Path(json_file)
    data = _read_json(path, "COCO annotation file")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in cats]
    id_to_contiguous = {cid: i for i, cid in enumerate(category_ids)}
    by_image = _group_annotations(data.get("annotations", []), id_to_contiguous, path)
    root = Path(image_root)
    records = [_record(img, str(root / img["file_name"]), by_image.get(img["id"], []), id_to_contiguous, path)
               for img in data["images"]]
    return DetectionDataset(name=name or path.stem, kind="coco", records=records,
                            class_names=[c["name"] for c in cats], category_ids=category_ids,
                            annotation_file=path, image_root=root)


def load_lvis_json(json_file: PathLike, image_root: PathLike, *, name: Optional[str] = None,
                   remove_rare: bool = False, max_boxes_per_image: int = LVIS_MAX_BOXES_PER_IMAGE,
                   ) -> DetectionDataset:
    """Read an LVIS v1 json the way every ``lvis_v1_*`` loader of the original does (docs/DESIGN.md#regions).

    - the image path is ``image_root / <split folder>/<file>`` taken from ``coco_url`` (``image_root`` is the COCO
      folder holding ``train2017/`` and ``val2017/``), or ``image_root / file_name`` when there is no ``coco_url``;
    - images without annotations are dropped (only if the file has annotations at all: test-dev image-info files
      keep all images) and at most ``max_boxes_per_image`` annotations per image are kept, in file order;
    - contiguous index = ``id - 1`` for the full 1203-way set; with ``remove_rare=True`` (the original's open-set
      *training* splits) rare annotations are dropped and the remaining categories are re-indexed 0..865 in id
      order. The original also re-sorts images by annotation count; that only changes iteration order and is not
      reproduced.
    """
    path = Path(json_file)
    data = _read_json(path, "LVIS annotation file")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    missing = [c["id"] for c in cats if "frequency" not in c]
    if missing:
        raise DatasetError(f"{path}: categories {missing[:5]} have no 'frequency' field; is this an LVIS v1 json?")
    if remove_rare:
        cats = [c for c in cats if c["frequency"] != "r"]
    category_ids = [int(c["id"]) for c in cats]
    id_to_contiguous = {cid: i for i, cid in enumerate(category_ids)}
    anns = data.get("annotations")
    all_ids = {int(c["id"]) for c in data["categories"]}
    if anns is not None:
        unknown = [a for a in anns if a["category_id"] not in all_ids]
        if unknown:
            raise DatasetError(f"{path}: annotation {unknown[0].get('id')} has category_id "
                               f"{unknown[0]['category_id']}, which is not in the file's 'categories'")
        anns = [a for a in anns if a["category_id"] in id_to_contiguous]  # drops rare when remove_rare
    by_image = _group_annotations(anns or [], id_to_contiguous, path)
    root = Path(image_root)
    records = []
    for img in data["images"]:
        img_anns = by_image.get(img["id"], [])
        if anns is not None and not img_anns:
            continue
        if "coco_url" in img:
            file_name = str(root.joinpath(*img["coco_url"].split("/")[-2:]))
        else:
            file_name = str(root / img["file_name"])
        records.append(_record(img, file_name, img_anns[:max_boxes_per_image], id_to_contiguous, path))
    return DetectionDataset(
        name=name or path.stem, kind="lvis", records=records,
        class_names=[lvis_prompt_name(c["name"]) for c in cats], category_ids=category_ids,
        display_names=[(c.get("synonyms") or [c["name"]])[0] for c in cats],
        frequencies=[c["frequency"] for c in cats], annotation_file=path, image_root=root)


def load_image_folder(folder: PathLike, vocabulary: Sequence[str], *, name: Optional[str] = None,
                      category_ids: Optional[Sequence[int]] = None) -> DetectionDataset:
    """Every image file directly inside ``folder`` (sorted by name), with no annotations.

    ``image_id`` is the position in that order (the original uses unsorted ``os.listdir`` order, which is not
    reproducible). ``category_ids`` default to ``index + 1`` (the LVIS convention the original uses for its
    custom-image dataset). Height and width are read from the file headers only.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = folder_images(folder)  # the one folder rule (regionclip.data.folders)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    if not vocabulary:
        raise DatasetError("an image folder needs a vocabulary (class names) to detect; got an empty list")
    records = []
    for i, p in enumerate(files):
        with Image.open(p) as im:
            w, h = im.size
        records.append(ImageRecord(image_id=i, file_name=str(p), height=h, width=w))
    ids = list(category_ids) if category_ids is not None else list(range(1, len(vocabulary) + 1))
    return DetectionDataset(name=name or folder.name, kind="folder", records=records, class_names=list(vocabulary),
                            category_ids=ids, image_root=folder)


# name -> (image folder, annotation file, kind, remove_rare), relative to the data root (docs/DESIGN.md#datasets).
REGISTERED_DATASETS: dict[str, tuple[str, str, DatasetKind, bool]] = {
    **{f"coco_2017_ovd_{s}_{sp}": (f"coco/{img}2017", f"coco/annotations/ovd_ins_{img}2017_{s}.json", "coco", False)
       for s in ("all", "b", "t") for sp, img in (("train", "train"), ("test", "val"))},
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json", "coco", False),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json", "coco", False),
    "lvis_v1_train": ("coco", "lvis/lvis_v1_train.json", "lvis", True),
    "lvis_v1_val": ("coco", "lvis/lvis_v1_val.json", "lvis", False),
    "lvis_v1_train_fullysup": ("coco", "lvis/lvis_v1_train.json", "lvis", False),
    "lvis_v1_val_fullysup": ("coco", "lvis/lvis_v1_val.json", "lvis", False),
}


def load_registered(name: str, root: PathLike = "datasets") -> DetectionDataset:
    """Load one of the original's named datasets from ``root`` (its ``$DETECTRON2_DATASETS``, default
    ``./datasets``)."""
    if name not in REGISTERED_DATASETS:
        raise KeyError(f"unknown dataset name {name!r}; known: {', '.join(sorted(REGISTERED_DATASETS))}. For other "
                       "data pass the annotation json and image folder explicitly")
    images, ann, kind, remove_rare = REGISTERED_DATASETS[name]
    root = Path(root)
    if not (root / ann).is_file():
        raise FileNotFoundError(f"dataset {name!r} expects its annotations at {root / ann}; download them there or "
                                "pass --data-root pointing at the folder that holds coco/ and lvis/")
    if kind == "lvis":
        return load_lvis_json(root / ann, root / images, name=name, remove_rare=remove_rare)
    return load_coco_json(root / ann, root / images, name=name)


def load_annotations(json_file: PathLike, image_root: PathLike, *, name: Optional[str] = None) -> DetectionDataset:
    """COCO or LVIS json, decided by the content (LVIS categories carry a ``frequency`` field)."""
    data = _read_json(json_file, "annotation file")
    is_lvis = bool(data["categories"]) and all("frequency" in c for c in data["categories"])
    loader = load_lvis_json if is_lvis else load_coco_json
    return loader(json_file, image_root, name=name)
