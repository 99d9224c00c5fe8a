"""Image decoding and the test-time resize of the original (docs/DESIGN.md#preprocessing).

Decoding rules (every Pillow mode, arrays, tensors) are in :func:`load_image`; reduced JPEG decoding of huge
images is in :func:`decode_image` / :func:`load_resized`; the per-image pixel limit is ``max_pixels``
(:data:`DEFAULT_MAX_PIXELS`). Design notes: docs/DESIGN.md#image-inputs.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

#: Default per-image limit on decoded pixels (width * height, counted after reduced JPEG decoding). 250 MP of RGB
#: is 750 MB before any copy; PIL's own limit (~179 MP, an error) is switched off inside this module in favour of
#: this one, which callers can raise (``max_pixels=``) or disable (``max_pixels=None``).
DEFAULT_MAX_PIXELS = 250_000_000

_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that displays the image upright (what ImageOps.exif_transpose applies).
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SWAPS_AXES = (5, 6, 7, 8)
_JPEG_FORMATS = ("JPEG", "MPO")
_TargetFn = Callable[[int, int], tuple[int, int]]  # upright full-resolution (H, W) -> resize target (h, w)


class ImageReadError(ValueError):
    """An input that cannot be decoded as an image (or is over the pixel limit)."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and the size of the full-resolution image it stands for.

    ``image`` is uint8 RGB [3, h, w]; ``original_size`` is (H, W) of the full-resolution, EXIF-rotated image.
    They differ only when ``draft_scale`` > 1 (a JPEG decoded at 1/2, 1/4 or 1/8 scale): then
    h = ceil(H / draft_scale), w = ceil(W / draft_scale). Boxes must be expressed in ``original_size`` pixels.
    """

    image: Tensor
    original_size: tuple[int, int]
    draft_scale: int = 1


# ----------------------------------------------------------------------------------------------- PIL's own limit
_pil_limit_lock = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: Optional[int] = None


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Switch off PIL's decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) while this module opens and decodes.

    Why: PIL warns above ~89 MP and raises above ~179 MP *of the header size*, before a JPEG can be decoded at a
    reduced scale, and its limit cannot be set per call. We enforce ``max_pixels`` on the size actually decoded
    instead. The global is restored when the last concurrent user leaves (a counter, so overlapping threads do not
    restore it under each other's feet); other code opening images in that window runs without PIL's check.
    """
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    except Image.DecompressionBombError as e:  # only if someone re-enabled PIL's check concurrently
        raise ImageReadError(f"{e} Set regionclip's own limit with max_pixels= instead.") from e
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def _check_pixels(size_wh: tuple[int, int], max_pixels: Optional[int], name: str, note: str = "") -> None:
    w, h = size_wh
    if max_pixels is not None and w * h > max_pixels:
        raise ImageReadError(
            f"{name}: {w}x{h} = {w * h:,} pixels{note} is over the limit of {max_pixels:,} pixels per image; raise it "
            f"with max_pixels= (CLI: --max-pixels N, 0 = no limit) or pass max_pixels=None if you trust this file")


# ------------------------------------------------------------------------------------------- mode -> 8-bit RGB
def _scale_to_uint8(arr: np.ndarray, *, declared_16bit: bool = False) -> np.ndarray:
    """Map a numeric array to uint8 0..255 (same shape). The rule (documented in :func:`load_image`):

    - uint8: unchanged; bool: 0 / 255.
    - ``declared_16bit`` (PIL ``I;16*``, numpy/torch uint16): ``v >> 8`` (the high byte), which is what Pillow
      itself does to 16-bit RGB/RGBA PNGs and TIFFs, and the exact inverse of 8 -> 16 bit replication (v * 257).
    - Other integers and floats (depth not declared): NaN/inf -> 0, negatives -> 0; the full scale is inferred from
      the maximum m: floats with m <= 1.0 are 0..1 (round(v * 255)); m <= 255 is 8-bit (round(v)); m <= 65535 is
      16-bit (floor(v) >> 8, as above); beyond, the image is scaled by its maximum (round(v * 255 / m)).
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if declared_16bit or arr.dtype == np.uint16:
        return (arr.astype(np.uint16, copy=False) >> 8).astype(np.uint8)
    if arr.dtype.kind in "iu":
        a = np.clip(arr, 0, None) if arr.dtype.kind == "i" else arr
        m = int(a.max()) if a.size else 0
        if m <= 255:
            return a.astype(np.uint8)
        if m <= 65535:
            return (a >> 8).astype(np.uint8)
        return np.floor(a.astype(np.float64) * (255.0 / m) + 0.5).astype(np.uint8)
    if arr.dtype.kind == "f":
        a = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        a = np.clip(a, 0.0, None)
        fm = float(a.max()) if a.size else 0.0
        if fm <= 1.0:
            a = a * 255.0
        elif fm <= 255.0:
            pass
        elif fm <= 65535.0:
            return (np.floor(a).astype(np.uint16) >> 8).astype(np.uint8)
        else:
            a = a.astype(np.float64) * (255.0 / fm)
        return np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {arr.dtype}; use uint8 (0..255), uint16 or float arrays")


def _to_rgb(im: Image.Image) -> Image.Image:
    """A mode-"RGB" version of a loaded PIL image (``im`` itself if already RGB).

    8-bit modes go through ``convert("RGB")`` exactly as the original (alpha and palette transparency dropped
    without compositing, grayscale replicated, CMYK / YCbCr converted by PIL's formulas). High-bit modes (``I;16*``,
    ``I``, ``F``), which ``convert`` would clip to 255 (a white image), are scaled by :func:`_scale_to_uint8`.
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        gray = _scale_to_uint8(arr, declared_16bit=im.mode.startswith("I;16"))
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
        # per-index alpha: convert("RGB") gives the same palette colours but warns; through RGBA it does not
        return im.convert("RGBA").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        try:  # e.g. "La" / "RGBa" (premultiplied alpha) only convert through RGBA
            return im.convert("RGBA").convert("RGB")
        except ValueError as e:
            raise ImageReadError(f"cannot convert an image of PIL mode {im.mode!r} to RGB ({e})") from e


def _pil_to_tensor(im: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 [3, H, W] with one full-size copy beyond PIL's (``np.asarray`` is read-only)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not make the image unreadable; treat it as upright
        return 1


def _upright(im: Image.Image, orientation: int) -> Image.Image:
    method = _EXIF_TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


# ------------------------------------------------------------------------------------------------- decoding
def draft_scale_for(size_wh: tuple[int, int], target_wh: tuple[int, int]) -> int:
    """JPEG reduced-decoding factor (1, 2, 4 or 8) for a stored ``size_wh`` that will be resized to
    ``target_wh``: the largest factor s with ``size // target >= s`` on both axes, i.e. the smallest decode still
    at least as large as the target. 1 (full decode) unless the image is at least twice the target on both axes,
    so images that the model only mildly downscales (e.g. 1920x1080 -> 1333x750) and images smaller than the
    target on either axis (upscaled: ``size // target`` is 0) decode exactly as before. This is the rule of PIL's
    ``JpegImageFile.draft``, whose loop also falls through to 1.

    The decode is never smaller than the target (ceil(size / s) >= target), and the resize target is always
    computed from the full-resolution size, so the factor cannot change the size an image is resized to."""
    ratio = min(size_wh[0] // max(1, target_wh[0]), size_wh[1] // max(1, target_wh[1]))
    # an explicit loop, not next(<generator>): a StopIteration escaping here once ended whole DataLoader runs
    # silently (an image smaller than the target has ratio 0)
    for s in (8, 4, 2):
        if ratio >= s:
            return s
    return 1


def _decode_pil(image: Union[str, os.PathLike, Image.Image], target: Optional[_TargetFn],
                max_pixels: Optional[int]) -> tuple[Image.Image, tuple[int, int], int]:
    """Path / PIL image -> (upright RGB PIL image, original (H, W), draft scale). ``target`` maps the upright
    full-resolution (H, W) to the (h, w) the caller resizes to (JPEG files only; see :func:`decode_image`)."""
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "PIL image"
        with _own_pixel_limit():
            _check_pixels(image.size, max_pixels, name)
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageReadError(f"cannot decode {name} ({e})") from e
            o = _orientation(image)
            upright = _upright(image, o)
            return _to_rgb(upright), (upright.size[1], upright.size[0]), 1
    path = Path(image)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with _own_pixel_limit(), Image.open(path) as im:
            stored_wh = im.size
            scale = 1
            if target is not None and im.format in _JPEG_FORMATS:
                # JPEG EXIF sits before the image data: reading it here does not decode pixels
                swap = _orientation(im) in _SWAPS_AXES
                th, tw = target(*(stored_wh if swap else stored_wh[::-1]))
                req = (th, tw) if swap else (tw, th)  # the target in stored orientation, PIL's (w, h)
                # a target with a 0-pixel side (absurd aspect ratios) is refused after decoding, with the reason;
                # PIL's draft would divide by it
                scale = draft_scale_for(stored_wh, req) if min(req) >= 1 else 1
                if scale > 1:
                    im.draft("RGB", req)  # same rule as draft_scale_for; "RGB" keeps L / CMYK JPEGs' modes
                    if im.size == stored_wh:  # not reducible (e.g. several tiles): decoded at full size
                        scale = 1
            note = f", decoded at 1/{scale} of {stored_wh[0]}x{stored_wh[1]}" if scale > 1 else ""
            _check_pixels(im.size, max_pixels, str(path), note)
            im.load()
            o = _orientation(im)
            rgb = _to_rgb(_upright(im, o))  # loaded pixels stay valid after the file is closed
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read {path} as an image ({e}); is the file truncated or not an image?") from e
    full_w, full_h = stored_wh if o not in _SWAPS_AXES else stored_wh[::-1]
    return rgb, (full_h, full_w), scale


def decode_image(image: ImageInput, *, target_size: Optional[tuple[int, int]] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode like :func:`load_image`, optionally decoding a large JPEG file at a reduced scale.

    Args:
        image: a path, PIL image, array or tensor (see :func:`load_image`).
        target_size: (h, w) the caller will resize the (upright) image to. A JPEG *file* at least twice that size
            on both axes is decoded with ``Image.draft`` at 1/2, 1/4 or 1/8 scale — the smallest decode still
            >= ``target_size`` (:func:`draft_scale_for`). Decoding is then several times faster and smaller, and
            the resized result differs slightly from full decoding + resize (measured in
            docs/DESIGN.md#image-inputs). Other images, and every image less than twice the target, decode exactly as without it.
        max_pixels: limit on decoded width * height (after the reduction), ``None`` for no limit.
    Returns:
        :class:`DecodedImage` (uint8 [3, h, w] plus the full-resolution (H, W)).
    """
    if isinstance(image, (str, os.PathLike, Image.Image)):
        fixed = target_size
        rgb, original, scale = _decode_pil(image, None if fixed is None else (lambda h, w: fixed), max_pixels)
        return DecodedImage(_pil_to_tensor(rgb), original, scale)
    t = load_image(image, max_pixels=max_pixels)
    return DecodedImage(t, (int(t.shape[1]), int(t.shape[2])), 1)


def load_image(image: ImageInput, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Tensor:
    """Decode to a uint8 RGB tensor [3, H, W] at full resolution.

    Paths and PIL images: EXIF orientation applied, then converted to 8-bit RGB:

    - ``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``PA``, ``CMYK``, ``YCbCr`` …: ``convert("RGB")``, the
      original's behaviour — grayscale replicated, an alpha channel or palette transparency dropped *without*
      compositing, CMYK / YCbCr by PIL's formulas (no ICC colour management).
    - ``I;16`` / ``I;16L`` / ``I;16B`` (16-bit grayscale PNG/TIFF): ``v >> 8``, the high byte — the same as Pillow
      does when it decodes 16-bit RGB(A) PNG/TIFF files, so 16-bit gray and colour files agree.
    - ``I`` (32-bit int) and ``F`` (32-bit float), whose depth is not declared: the full scale is inferred from the
      image maximum m (after NaN/inf and negatives -> 0): floats with m <= 1.0 are 0..1 (``round(v * 255)``);
      m <= 255 is 8-bit (kept); m <= 65535 is 16-bit (``v >> 8``); larger images are scaled by their maximum
      (``round(v * 255 / m)``). So an ``I``/``F`` image whose values all lie in 0..255 is read as 8-bit.

    Arrays / tensors: HWC or CHW with 3 channels, or 2-D grayscale (replicated). uint8 is taken as is; uint16
    ``>> 8``; bool 0/255; other integer and float dtypes by the ``I``/``F`` rule above (so a float tensor in
    0..1 works). The maximum is taken over all channels together, never per channel.

    ``max_pixels`` bounds width * height of paths and PIL images (not of arrays, already in memory): over it
    :class:`ImageReadError` is raised naming the file, its size and the limit. ``None`` disables it.
    """
    if isinstance(image, (str, os.PathLike, Image.Image)):
        rgb, _, _ = _decode_pil(image, None, max_pixels)
        return _pil_to_tensor(rgb)
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "biuf":
            raise ImageReadError(f"unsupported image array dtype {image.dtype}; use uint8 (0..255), uint16 or float")
        image = torch.from_numpy(np.ascontiguousarray(_scale_to_uint8(image)))
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
            if t.is_complex():
                raise ImageReadError(f"unsupported image tensor dtype {t.dtype}; use uint8, uint16 or float")
            src = t.detach().cpu()
            if src.dtype in (torch.bfloat16, torch.float16):
                src = src.float()
            # torch.uint16 has limited numpy interop on older versions: go through int32, flagged as 16-bit
            declared = src.dtype == getattr(torch, "uint16", None)
            arr = src.to(torch.int32).numpy() if declared else src.numpy()
            t = torch.from_numpy(np.ascontiguousarray(_scale_to_uint8(arr, declared_16bit=declared)))
        return t.contiguous()
    raise ImageReadError(f"unsupported image input of type {type(image).__name__}")


def load_resized(image: ImageInput, short_edge: int = 800, max_size: int = 1333, *,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 interpolation: Image.Resampling = Image.Resampling.BILINEAR) -> tuple[Tensor, tuple[int, int]]:
    """Decode + test-time resize in one step: (uint8 [3, nh, nw], original (H, W)).

    The target (nh, nw) is :func:`resized_shape` of the full-resolution size. A JPEG file at least twice the
    target on both axes is decoded reduced (:func:`decode_image`), and PIL resizes the decoded image straight to
    (nh, nw) without a full-size tensor. Any other image gives exactly ``resize_image(load_image(image))``
    bit for bit (the demo / parity images included).
    """
    if isinstance(image, (str, os.PathLike, Image.Image)):
        rgb, original, _ = _decode_pil(image, lambda h, w: resized_shape(h, w, short_edge, max_size), max_pixels)
        name = (getattr(image, "filename", "") or "PIL image") if isinstance(image, Image.Image) else str(image)
        nh, nw = _checked_target(original[0], original[1], short_edge, max_size, name)
        if (rgb.size[1], rgb.size[0]) != (nh, nw):
            rgb = rgb.resize((nw, nh), interpolation)
        return _pil_to_tensor(rgb), original
    img = load_image(image, max_pixels=max_pixels)
    return resize_image(img, short_edge, max_size, interpolation), (int(img.shape[1]), int(img.shape[2]))


def image_size(path: Union[str, os.PathLike]) -> tuple[int, int]:
    """(H, W) of an image file as :func:`load_image` returns it (EXIF rotation applied), read from the header
    only — cheap enough to balance shards by image size. PNGs whose EXIF follows the pixel data (rare) are
    reported unrotated rather than decoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with _own_pixel_limit(), Image.open(path) as im:
            w, h = im.size
            # PngImageFile.getexif decodes the whole image when the EXIF chunk is not in the header
            o = _orientation(im) if (im.format != "PNG" or "exif" in im.info) else 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read {path} as an image ({e}); is the file truncated or not an image?") from e
    return (w, h) if o in _SWAPS_AXES else (h, w)


# --------------------------------------------------------------------------------------------------- resize
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


def _checked_target(h: int, w: int, short_edge: int, max_size: int, name: str = "image") -> tuple[int, int]:
    """:func:`resized_shape`, refusing a result with a 0-pixel side (an aspect ratio above ~2 * max_size, e.g.
    3000x1 at longest 1333: the original would crash inside PIL or the network)."""
    nh, nw = resized_shape(h, w, short_edge, max_size)
    if nh < 1 or nw < 1:
        raise ImageReadError(
            f"{name}: a {w}x{h} image is too elongated for the test-time resize (shortest edge {short_edge}, longest "
            f"<= {max_size}) - it would become {nw}x{nh} pixels; crop it or split it into tiles")
    return nh, nw


def resize_image(image: Tensor, short_edge: int = 800, max_size: int = 1333,
                 interpolation: Image.Resampling = Image.Resampling.BILINEAR) -> Tensor:
    """Resize a uint8 [3, H, W] image with PIL (which antialiases when downscaling), as the original."""
    h, w = image.shape[-2:]
    nh, nw = _checked_target(int(h), int(w), short_edge, max_size)
    if (nh, nw) == (h, w):
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = np.asarray(pil.resize((nw, nh), interpolation))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()
