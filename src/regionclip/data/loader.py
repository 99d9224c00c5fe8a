"""Inference input pipeline: which images (and user boxes), decoded + resized in DataLoader workers, batched by size.

* :class:`InferenceItem` names one image of a run by a unique ``key`` (what the output index is keyed by).
* :func:`items_from_inputs` / :func:`items_from_coco` build the work list from folders, files, list files or a
  COCO/LVIS json; :func:`read_boxes_file` reads user boxes (COCO json, ``{file: [[x1,y1,x2,y2], ...]}`` JSON, or a
  ``file_name,x1,y1,x2,y2`` CSV).
* :func:`make_loader` decodes and resizes (docs/DESIGN.md#preprocessing, PIL) in worker processes, so the main process only runs the
  network; :func:`batch_by_size` groups images of *equal* resized size, so no padding is needed and a batch gives
  what the one-image-at-a-time path gives up to float rounding (batched convolutions may sum in another order:
  measured on the photo corpus, scores differ by <= 1e-27, detections and metrics identical). Padding would change
  border features of the smaller images (docs/DESIGN.md#preprocessing); allow it explicitly with
  ``pad_mixed_sizes=True``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import InputConfig
from ..structures import PreparedImage
from .datasets import load_annotations
from .folders import folder_images
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageInput, ImageReadError, load_resized

PathLike = Union[str, os.PathLike]
T = TypeVar("T")


@dataclass
class InferenceItem:
    """One image of a run. ``boxes``: [R, 4] XYXY float32 original pixels (user-box mode) or None;
    ``category_ids``: [R] dataset category id per box when the boxes come from annotations."""

    key: str
    file_name: str
    image_id: Any = None
    boxes: Optional[np.ndarray] = None
    category_ids: Optional[np.ndarray] = None


@dataclass
class LoadedItem:
    """What a worker returns: the item's position, the prepared image, or the reason it could not be read."""

    index: int
    prepared: Optional[PreparedImage] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def items_from_inputs(inputs: Sequence[PathLike]) -> list[InferenceItem]:
    """Folders (images directly inside, sorted; key = path relative to the folder), image files (key = the path
    as given) and ``.txt`` list files (one image path per line, relative to the list's folder)."""
    items: list[InferenceItem] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files = folder_images(p)  # one rule for every folder walk; skipped files are summarised
            if not files:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            items += [InferenceItem(key=f.relative_to(p).as_posix(), file_name=str(f)) for f in files]
        elif p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for ln in lines:
                f = Path(ln) if Path(ln).is_absolute() else p.parent / ln
                items.append(InferenceItem(key=ln, file_name=str(f)))
        elif p.is_file():
            items.append(InferenceItem(key=str(inp), file_name=str(p)))
        else:
            raise FileNotFoundError(f"no such image, folder or list file: {p}")
    _check_unique(items)
    return items


def items_from_coco(json_file: PathLike, image_root: PathLike, *, with_boxes: bool = True) -> list[InferenceItem]:
    """Every image of a COCO / LVIS json (key = image id). ``with_boxes``: the GT-mode regions of the original
    (crowd removed, clipped to the image, empty removed; LVIS ≤ 500 per image, docs/DESIGN.md#regions) as user boxes."""

    ds = load_annotations(json_file, image_root)
    items = []
    for rec in ds:
        boxes = cats = None
        if with_boxes:
            boxes, labels = rec.region_boxes()
            if len(boxes) and bool(rec.int_box_flags[~rec.iscrowd].all()):
                boxes = boxes.astype(np.int64)  # whole-number json boxes: truncated after scaling, as the original
            cats = np.asarray([ds.category_ids[i] for i in labels], np.int64)
        items.append(InferenceItem(key=str(rec.image_id), file_name=rec.file_name, image_id=rec.image_id,
                                   boxes=boxes, category_ids=cats))
    _check_unique(items)
    return items


def prepare_image(image: ImageInput, input_cfg: InputConfig, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
                  ) -> PreparedImage:
    """Decode + the original's test-time resize (shortest edge ``min_size``, longest <= ``max_size``, PIL
    bilinear with antialiasing) -> :class:`PreparedImage` (docs/DESIGN.md#preprocessing). Very large JPEGs are
    decoded reduced (docs/DESIGN.md#image-inputs); the original size is always the file's, never the reduced one.
    ``max_pixels=None``: no pixel limit."""
    try:
        resized, (h, w) = load_resized(image, input_cfg.min_size, input_cfg.max_size, max_pixels=max_pixels)
    except ImageReadError:
        raise
    except Exception as e:
        # Anything else is turned into an error naming the image. A StopIteration (or a bare ValueError / OSError
        # of Pillow or numpy) must never leave here unnamed: a StopIteration escaping a Dataset or a generator is
        # read by its consumer as "end of the data", and the images after it were once lost without a word.
        raise ImageReadError(f"{_input_name(image)}: {type(e).__name__} while decoding / resizing"
                             f"{f' ({e})' if str(e) else ''}") from e
    return PreparedImage(resized, (int(h), int(w)), (int(resized.shape[1]), int(resized.shape[2])))


def _input_name(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"in-memory {type(image).__name__}"


class PreparedImageDataset(Dataset):
    """Decode + resize ``items[i]`` (runs inside DataLoader workers). A file that cannot be read is returned as
    an error instead of raising, so one bad image does not end a long run."""

    def __init__(self, items: Sequence[InferenceItem], input_cfg: InputConfig,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
        self.items = list(items)
        self.input_cfg = input_cfg
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LoadedItem:
        # Every exception becomes this item's error, never an exception out of the Dataset: the DataLoader re-raises
        # a worker's exception in the main process, and a StopIteration re-raised there ends the iteration (the
        # rest of the run silently lost). KeyboardInterrupt / SystemExit are not Exceptions and still stop the run.
        try:
            return LoadedItem(i, prepare_image(self.items[i].file_name, self.input_cfg, max_pixels=self.max_pixels))
        except Exception as e:  # unreadable, truncated, too large, or a bug: reported per image
            msg = str(e) or type(e).__name__
            name = str(self.items[i].file_name)
            return LoadedItem(i, error=msg if name in msg else f"{name}: {msg}")


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    # decoding is PIL work; torch intra-op threads in workers would only compete with the model for cores
    torch.set_num_threads(1)


def make_loader(items: Sequence[InferenceItem], input_cfg: InputConfig, *, num_workers: int = 2,
                prefetch_factor: int = 4, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> DataLoader:
    """A DataLoader yielding one :class:`LoadedItem` per image, in ``items`` order, decoded by ``num_workers``
    processes (0 = in the main process). Iterate it through :func:`iter_loaded`, which checks that it did."""
    kw: dict[str, Any] = {"prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init,
                          "persistent_workers": False} if num_workers > 0 else {}
    return DataLoader(PreparedImageDataset(items, input_cfg, max_pixels), batch_size=None, shuffle=False,
                      num_workers=num_workers, collate_fn=_identity, **kw)


class IncompleteRunError(RuntimeError):
    """A stream of per-image results ended before every input had one (a bug: reported, never silent)."""


def iter_loaded(loader: Iterable[LoadedItem], items: Sequence[InferenceItem]) -> Iterator[LoadedItem]:
    """The loader's items, then a check that exactly one came for each of ``items``.

    The dataset never raises (:class:`PreparedImageDataset`), but whatever ends the loader early - a
    StopIteration re-raised from a worker, a sampler bug - would otherwise look like the end of the data: then
    :class:`IncompleteRunError` names the first images that got no result.
    """
    seen: set[int] = set()
    for loaded in loader:
        seen.add(loaded.index)
        yield loaded
    if len(seen) != len(items):
        missing = [str(items[i].file_name) for i in range(len(items)) if i not in seen]
        raise IncompleteRunError(
            f"image decoding stopped after {len(seen)} of {len(items)} images; no result for "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (a bug in regionclip: please report it)")


def batch_by_size(stream: Iterable[T], batch_size: int, size_of: Callable[[T], Hashable], *,
                  pad_mixed_sizes: bool = False, max_pending: Optional[int] = None) -> Iterator[list[T]]:
    """Group a stream into batches of at most ``batch_size`` elements with equal ``size_of``.

    A group is emitted when full; when more than ``max_pending`` (default ``4 * batch_size``) elements wait,
    the oldest group is emitted partly filled, so memory stays bounded with many different sizes. With
    ``pad_mixed_sizes`` the stream is simply cut into consecutive batches (sizes then get padded, docs/DESIGN.md#preprocessing).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_mixed_sizes or batch_size == 1:
        batch: list[T] = []
        for x in stream:
            batch.append(x)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    limit = max_pending or 4 * batch_size
    groups: dict[Hashable, list[T]] = {}
    pending = 0
    for x in stream:
        key = size_of(x)
        group = groups.setdefault(key, [])
        group.append(x)
        pending += 1
        if len(group) == batch_size:
            pending -= len(groups.pop(key))
            yield group
        elif pending > limit:
            oldest = next(iter(groups))
            flushed = groups.pop(oldest)
            pending -= len(flushed)
            yield flushed
    yield from groups.values()


def _check_unique(items: Sequence[InferenceItem]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise ValueError(f"two inputs map to the same output key {it.key!r} ({seen[it.key]} and {it.file_name}); "
                             "pass each image once, or the folders separately in different runs")
        seen[it.key] = it.file_name
