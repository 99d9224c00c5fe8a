"""Image decoding and the test-time resize of the original (spec §2.1)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageReadError(ValueError):
    """An input that cannot be decoded as an image."""


def load_image(image: ImageInput) -> Tensor:
    """Decode to a uint8 RGB tensor [3, H, W].

    Paths and PIL images: EXIF orientation applied, then ``convert("RGB")`` (grayscale is replicated, an alpha
    channel is dropped without compositing — the original's behaviour). Arrays/tensors must already be RGB:
    HWC or CHW uint8 with 3 channels (a 2-D array is treated as grayscale).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageReadError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                pil = im
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageReadError(f"cannot read {path} as an image ({e}); is the file truncated or not an image?") from e
        image = pil
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)  # d2 read_image applies EXIF orientation the same way
        arr = np.asarray(image.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, Tensor):
        t = image
        if t.ndim == 2:
            t = t[None].expand(3, -1, -1)
        if t.ndim != 3:
            raise ImageReadError(f"image tensor must be [3,H,W] or [H,W,3], got shape {tuple(t.shape)}")
        if t.shape[0] != 3 and t.shape[-1] == 3:
            t = t.permute(2, 0, 1)
        if t.shape[0] != 3:
            raise ImageReadError(f"image must have 3 (RGB) channels, got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            raise ImageReadError(f"image tensors must be uint8 RGB 0..255, got {t.dtype}")
        return t.contiguous()
    raise ImageReadError(f"unsupported image input of type {type(image).__name__}")


def resized_shape(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: (new_h, new_w), rounded half up."""
    scale = short_edge * 1.0 / min(h, w)
    if h < w:
        newh, neww = short_edge * 1.0, scale * w
    else:
        newh, neww = scale * h, short_edge * 1.0
    if max(newh, neww) > max_size:
        s = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


def resize_image(image: Tensor, short_edge: int = 800, max_size: int = 1333,
                 interpolation: Image.Resampling = Image.Resampling.BILINEAR) -> Tensor:
    """Resize a uint8 [3, H, W] image with PIL (which antialiases when downscaling), as the original."""
    h, w = image.shape[-2:]
    nh, nw = resized_shape(h, w, short_edge, max_size)
    if (nh, nw) == (h, w):
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = np.asarray(pil.resize((nw, nh), interpolation))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()


def list_images(path: Union[str, os.PathLike]) -> list[Path]:
    """Images of a folder (sorted by name, known extensions) or a single file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
        return files
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"no such image or folder: {p}")
