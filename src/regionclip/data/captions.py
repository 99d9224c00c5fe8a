"""Image-caption pairs for region-text pretraining (docs/DESIGN.md#pretraining-input).

Three storage formats, one interface (:class:`CaptionSource`: ``len``, ``key(i)``, ``image_bytes(i)``,
``text(i)``):

* **JSONL + image folder** (:class:`JsonlCaptions`): one JSON object per line, ``{"image": "rel/path.jpg",
  "caption": "..."}`` or ``"captions": [...]`` or ``"tags": [...]`` (optional ``"key"``).
* **webdataset-style tar shards** (:class:`TarShardCaptions`): members ``<key>.jpg|jpeg|png|webp`` plus
  ``<key>.txt`` (the caption) and/or ``<key>.json`` (a text value as below). Read with the stdlib
  :mod:`tarfile`; the ``webdataset`` package is not needed.
* **the original's TSV pairs** (:class:`TsvCaptions`): an image TSV (``key \\t base64(image bytes)``) and a text
  TSV (``key \\t value``) with ``.lineidx`` sidecars (byte offset of each row; :func:`write_lineidx` makes them)
  and an optional ``.linelist`` (rows to use). :func:`find_tsv_pairs` pairs the files of a folder like the
  original (names containing images/image/img -> text/text/caption).

A text value is parsed like the original's ``CLIPImgTxtPairTSVDataset``: JSON when possible, with a top-level
key chosen at random among ``captions`` (a list; its first 5 are candidates) and ``tags`` (shuffled, joined with
spaces, put into one random of the 81 prompt templates); non-JSON text is the caption itself. One candidate
caption is drawn uniformly per image per iteration.

:class:`CaptionDataset` decodes, resizes torchvision-style (shorter side 800, longer side at most 1333, PIL
**bicubic**), flips horizontally with p = 0.5 and tokenizes; every random choice comes from the sample's own seed
(:func:`regionclip.data.train_data.sample_seed`), so a resumed run sees the same samples.
"""
from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..text.prompts import resolve_templates
from ..text.tokenizer import default_tokenizer
from ..utils import atomic_path

__all__ = ["CaptionSource", "JsonlCaptions", "TarShardCaptions", "TsvCaptions", "ConcatCaptions", "CaptionSample",
           "CaptionDataset", "parse_text_value", "choose_caption", "caption_resized_shape", "write_lineidx",
           "find_tsv_pairs", "open_caption_source", "iter_captions", "IMAGE_SUFFIXES"]

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_CAPTIONS = 5  # the original tokenizes the first <= 5 captions of a "captions" list


class CaptionSource(Protocol):
    """Random access to image-caption pairs."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def image_bytes(self, index: int) -> bytes: ...

    def text(self, index: int) -> str: ...


# ---------------------------------------------------------------------------------------------- text values
def parse_text_value(value: Union[str, dict, list]) -> dict[str, Any]:
    """Normalise a text value to ``{"captions": [...]}`` and/or ``{"tags": [...]}``.

    JSON strings are decoded; a JSON list is a list of captions; a JSON string is one caption; an object may hold
    ``captions`` (list or str), ``caption`` (str) and/or ``tags`` (list or space-separated str). Anything that is
    not JSON is a single caption.
    """
    if isinstance(value, str):
        stripped = value.strip()
        try:
            value = json.loads(stripped) if stripped[:1] in "[{\"" and stripped else stripped
        except json.JSONDecodeError:
            value = stripped
    if isinstance(value, str):
        return {"captions": [value]}
    if isinstance(value, list):
        return {"captions": [str(v) for v in value]}
    if not isinstance(value, dict):
        raise ValueError(f"a text value must be a caption string, a list of captions or an object with "
                         f"captions/caption/tags, got {type(value).__name__}")
    out: dict[str, Any] = {}
    caps = value.get("captions", value.get("caption"))
    if caps is not None:
        out["captions"] = [caps] if isinstance(caps, str) else [str(c) for c in caps]
    tags = value.get("tags")
    if tags is not None:
        out["tags"] = tags.split() if isinstance(tags, str) else [str(t) for t in tags]
    out = {k: v for k, v in out.items() if v}
    if not out:
        raise ValueError(f"text object has no non-empty 'captions', 'caption' or 'tags' (keys: {sorted(value)})")
    return out


def choose_caption(parsed: dict[str, Any], rng: np.random.Generator, templates: Sequence[str]) -> str:
    """One training caption: a random top-level key, then a random one of the first 5 captions, or the shuffled
    tags filled into a random template (``str.replace`` of ``{}``, as the prompt code)."""
    key = sorted(parsed)[int(rng.integers(len(parsed)))]
    if key == "captions":
        caps = parsed["captions"][:MAX_CAPTIONS]
        return caps[int(rng.integers(len(caps)))]
    tags = list(parsed["tags"])
    rng.shuffle(tags)
    return templates[int(rng.integers(len(templates)))].replace("{}", " ".join(tags))


# ---------------------------------------------------------------------------------------------- JSONL
class JsonlCaptions:
    """``{"image": path relative to image_root, "caption"/"captions"/"tags": ..., "key": optional}`` per line."""

    def __init__(self, path: PathLike, image_root: Optional[PathLike] = None) -> None:
        self.path = Path(path)
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.records: list[tuple[str, Path, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    image = obj["image"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}, line {lineno}: expected a JSON object with an 'image' path "
                                     f"and a caption ({e})") from None
                text = {k: obj[k] for k in ("caption", "captions", "tags") if k in obj}
                parse_text_value(text)  # fail at start-up, not at iteration 10k
                self.records.append((str(obj.get("key", Path(image).stem)), self.root / image, text))
        if not self.records:
            raise ValueError(f"{self.path}: no image-caption records")

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        return self.records[index][0]

    def image_bytes(self, index: int) -> bytes:
        path = self.records[index][1]
        if not path.is_file():
            raise FileNotFoundError(f"{self.path}: image {path} of record {index} not found (image_root={self.root})")
        return path.read_bytes()

    def text(self, index: int) -> str:
        return json.dumps(self.records[index][2])


# ---------------------------------------------------------------------------------------------- tar shards
class TarShardCaptions:
    """webdataset-style shards: files grouped by key (name up to the first dot of the base name).

    The member index is built once (one pass over the tar headers); reads seek to a member. Tar handles are
    opened lazily per process, so the source can be used by data-loader workers.
    """

    def __init__(self, shards: Sequence[PathLike]) -> None:
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise ValueError("no tar shards given")
        self.samples: list[tuple[str, int, dict[str, tarfile.TarInfo]]] = []
        for si, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard, "r:*") as tf:
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    prefix = m.name[: len(m.name) - len(base)]
                    groups.setdefault(prefix + stem, {})[ext.lower()] = m
            for key, members in groups.items():
                has_image = any(e in members for e in IMAGE_SUFFIXES)
                has_text = "txt" in members or "json" in members
                if has_image and has_text:
                    self.samples.append((key, si, members))
        if not self.samples:
            raise ValueError(f"no <key>.jpg + <key>.txt/json pairs in {[str(s) for s in self.shards]}")
        self._handles: dict[int, tarfile.TarFile] = {}
        self._pid = os.getpid()

    def _tar(self, si: int) -> tarfile.TarFile:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        if si not in self._handles:
            self._handles[si] = tarfile.open(self.shards[si], "r:*")
        return self._handles[si]

    def _read(self, si: int, member: tarfile.TarInfo) -> bytes:
        f = self._tar(si).extractfile(member)
        if f is None:
            raise ValueError(f"{self.shards[si]}: cannot read member {member.name}")
        return f.read()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        return self.samples[index][0]

    def image_bytes(self, index: int) -> bytes:
        _, si, members = self.samples[index]
        ext = next(e for e in IMAGE_SUFFIXES if e in members)
        return self._read(si, members[ext])

    def text(self, index: int) -> str:
        _, si, members = self.samples[index]
        if "json" in members:
            return self._read(si, members["json"]).decode("utf-8")
        return json.dumps(self._read(si, members["txt"]).decode("utf-8").strip())


# ---------------------------------------------------------------------------------------------- TSV
def write_lineidx(tsv_path: PathLike, output: Optional[PathLike] = None) -> Path:
    """Write ``<tsv>.lineidx``: the byte offset of every row, one integer per line (atomically)."""
    tsv_path = Path(tsv_path)
    out = Path(output) if output is not None else tsv_path.with_suffix(".lineidx")
    offsets = []
    with open(tsv_path, "rb") as f:
        pos = 0
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(f"{o}\n" for o in offsets), encoding="ascii")
    return out


class _TsvFile:
    """Random row access through the ``.lineidx`` sidecar (and ``.linelist`` when present)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        idx = self.path.with_suffix(".lineidx")
        if not idx.is_file():
            raise FileNotFoundError(f"{idx} not found: make it with `regionclip prepare-tsv "
                                    f"{self.path}` (the original requires it to exist as well)")
        self.offsets = [int(x) for x in idx.read_text(encoding="ascii").split()]
        lst = self.path.with_suffix(".linelist")
        self.rows = [int(x.split()[0]) for x in lst.read_text().splitlines() if x.strip()] if lst.is_file() \
            else list(range(len(self.offsets)))
        self._fh: Optional[Any] = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fh": None}

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> list[str]:
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(self.offsets[self.rows[i]])
        return [x.strip() for x in self._fh.readline().decode("utf-8").split("\t")]


class TsvCaptions:
    """An image TSV (``key \\t base64``) + its text TSV (``key \\t value``), row i of one = row i of the other."""

    def __init__(self, image_tsv: PathLike, text_tsv: PathLike) -> None:
        self.images, self.texts = _TsvFile(image_tsv), _TsvFile(text_tsv)
        if len(self.images) != len(self.texts):
            raise ValueError(f"{image_tsv} has {len(self.images)} rows but {text_tsv} has {len(self.texts)}")

    def __len__(self) -> int:
        return len(self.images)

    def _pair(self, index: int) -> tuple[list[str], list[str]]:
        img, txt = self.images.row(index), self.texts.row(index)
        if img[0] != txt[0]:  # the original asserts this too
            raise ValueError(f"row {index}: image key {img[0]!r} != text key {txt[0]!r} "
                             f"({self.images.path}, {self.texts.path})")
        return img, txt

    def key(self, index: int) -> str:
        return self.images.row(index)[0]

    def image_bytes(self, index: int) -> bytes:
        return base64.b64decode(self._pair(index)[0][1])

    def text(self, index: int) -> str:
        return self._pair(index)[1][1]


def find_tsv_pairs(folder: PathLike, max_files: int = 20) -> list[tuple[Path, Path]]:
    """The original's folder convention: image TSVs are ``*.tsv`` whose name contains images/image/img (sorted,
    at most ``max_files``); the text TSV replaces images->text, image->text or img->caption."""
    folder = Path(folder)
    pairs = []
    for p in sorted(folder.glob("*.tsv"))[:]:
        name = p.name
        for old, new in (("images", "text"), ("image", "text"), ("img", "caption")):
            if old in name:
                text = p.with_name(name.replace(old, new))
                if not text.is_file():
                    raise FileNotFoundError(f"{p} has no paired text TSV {text.name}")
                pairs.append((p, text))
                break
    if not pairs:
        raise FileNotFoundError(f"no image TSVs (*images*.tsv / *image*.tsv / *img*.tsv) in {folder}")
    return pairs[:max_files]


class ConcatCaptions:
    """Several sources as one index space."""

    def __init__(self, sources: Sequence[CaptionSource]) -> None:
        self.sources = list(sources)
        self.ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.ends else 0

    def _locate(self, index: int) -> tuple[CaptionSource, int]:
        si = int(np.searchsorted(self.ends, index, side="right"))
        return self.sources[si], index - (self.ends[si - 1] if si else 0)

    def key(self, index: int) -> str:
        s, i = self._locate(index)
        return s.key(i)

    def image_bytes(self, index: int) -> bytes:
        s, i = self._locate(index)
        return s.image_bytes(i)

    def text(self, index: int) -> str:
        s, i = self._locate(index)
        return s.text(i)


def open_caption_source(path: PathLike, image_root: Optional[PathLike] = None) -> CaptionSource:
    """A source from one path: ``*.jsonl``, ``*.tar`` (or a folder of shards), an image ``*.tsv`` (its text TSV
    found by the naming rule) or a folder of TSV pairs."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"caption data not found: {p}")
    if p.is_dir():
        shards = sorted(p.glob("*.tar")) + sorted(p.glob("*.tar.gz"))
        if shards:
            return TarShardCaptions(shards)
        return ConcatCaptions([TsvCaptions(i, t) for i, t in find_tsv_pairs(p)])
    name = p.name.lower()
    if name.endswith(".jsonl"):
        return JsonlCaptions(p, image_root)
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return TarShardCaptions([p])
    if name.endswith(".tsv"):
        pairs = [pair for pair in find_tsv_pairs(p.parent, max_files=10 ** 6) if pair[0] == p]
        if not pairs:
            raise ValueError(f"{p}: give the *image* TSV (name containing images/image/img)")
        return TsvCaptions(*pairs[0])
    raise ValueError(f"{p}: unknown caption format; use .jsonl (+ image_root), .tar shards or image/text .tsv pairs")


def iter_captions(path: PathLike) -> Iterator[str]:
    """Every caption (all captions of a list, tags joined by spaces) of a caption source or a ``.txt`` file with
    one caption per line; used to build concept pools."""
    p = Path(path)
    if p.suffix.lower() == ".txt":
        with open(p, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
        return
    if p.suffix.lower() == ".tsv" and not any(s in p.name for s in ("images", "image", "img")):
        with open(p, encoding="utf-8") as f:  # a text TSV on its own: key \t value
            for line in f:
                if "\t" in line:
                    yield from _texts_of(line.split("\t", 1)[1])
        return
    source = open_caption_source(p)
    for i in range(len(source)):
        yield from _texts_of(source.text(i))


def _texts_of(value: str) -> list[str]:
    parsed = parse_text_value(value)
    return list(parsed.get("captions", [])) + ([" ".join(parsed["tags"])] if "tags" in parsed else [])


# ---------------------------------------------------------------------------------------------- dataset
def caption_resized_shape(h: int, w: int, size: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """torchvision ``Resize(size, max_size=...)`` output (h, w): shorter side -> ``size`` (longer side truncated
    to int), then if the longer side exceeds ``max_size`` it becomes ``max_size`` and the shorter one is scaled."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


@dataclass
class CaptionSample:
    """One pretraining sample: ``image`` uint8 RGB [3, h, w] (resized, maybe flipped), ``tokens`` [L] CLIP ids."""

    image: Tensor
    tokens: Tensor
    caption: str
    key: str


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises several types for corrupt data
        raise ValueError(f"cannot decode {what} ({len(data)} bytes): {e}") from e
    return ImageOps.exif_transpose(img).convert("RGB")


class CaptionDataset(torch.utils.data.Dataset):
    """Pretraining samples from a :class:`CaptionSource`, indexed by ``(index, seed)`` keys (see
    :class:`regionclip.data.train_data.GroupedBatchSampler`)."""

    def __init__(self, source: CaptionSource, min_size: int = 800, max_size: int = 1333, flip: bool = True,
                 context_length: int = 77, templates: Optional[Sequence[str]] = None) -> None:

        if len(source) == 0:
            raise ValueError("the caption dataset is empty")
        self.source, self.min_size, self.max_size, self.flip = source, int(min_size), int(max_size), flip
        self.context_length = int(context_length)
        self.templates = resolve_templates(templates)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Any) -> CaptionSample:

        index, seed = key if isinstance(key, tuple) else (int(key), 0)
        rng = np.random.default_rng(seed)
        flip = self.flip and rng.random() < 0.5  # drawn first: the flip must not depend on the caption count
        name = self.source.key(index)
        pil = decode_image(self.source.image_bytes(index), f"image {name!r}")
        caption = choose_caption(parse_text_value(self.source.text(index)), rng, self.templates)
        h, w = pil.height, pil.width
        nh, nw = caption_resized_shape(h, w, self.min_size, self.max_size)
        if (nh, nw) != (h, w):
            pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
        img = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
        if flip:
            img = img.flip(-1).contiguous()
        tokens = default_tokenizer()([caption], context_length=self.context_length)[0]
        return CaptionSample(img, tokens, caption, name)
