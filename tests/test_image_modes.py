"""load_image on every Pillow mode, arrays and tensors: small images with known pixel values written to real files
(PNG / TIFF / JPEG), decoded, and compared with hand-made 8-bit RGB expectations (the rules of load_image's
docstring)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionclip.data.images import ImageReadError, load_image

pytestmark = pytest.mark.filterwarnings("error")  # no PIL warning may leak out of decoding


def _rgb(image) -> np.ndarray:
    t = load_image(image)
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


def _gray3(values) -> np.ndarray:
    """Expected RGB of a grayscale image: the gray value replicated on the three channels."""
    g = np.asarray(values, np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _saved(im: Image.Image, path: Path, expect_mode: str | None = None, **kw) -> Path:
    im.save(path, **kw)
    with Image.open(path) as back:
        assert back.mode == (expect_mode or im.mode), f"{path.name} reopened as {back.mode}"
    return path


def _png16(path: Path, arr: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): color_type 0 = gray, 2 = RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------- 8-bit modes
def test_mode_1_bilevel(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    p = _saved(Image.fromarray(bits).convert("1"), tmp_path / "b.png")
    np.testing.assert_array_equal(_rgb(p), _gray3([[0, 255, 255], [255, 0, 0]]))


def test_mode_L(tmp_path):
    p = _saved(Image.fromarray(np.array([[0, 7, 128], [200, 254, 255]], np.uint8)), tmp_path / "l.png")
    np.testing.assert_array_equal(_rgb(p), _gray3([[0, 7, 128], [200, 254, 255]]))


def test_mode_LA_alpha_dropped_without_compositing(tmp_path):
    la = np.array([[[10, 0], [100, 128], [250, 255]]], np.uint8)  # fully transparent pixel keeps its gray value
    p = _saved(Image.fromarray(la, mode="LA"), tmp_path / "la.png")
    np.testing.assert_array_equal(_rgb(p), _gray3([[10, 100, 250]]))


def test_mode_RGB_and_RGBA(tmp_path):
    rgb = np.array([[[1, 2, 3], [250, 128, 0]], [[0, 0, 0], [255, 255, 255]]], np.uint8)
    p = _saved(Image.fromarray(rgb), tmp_path / "rgb.png")
    np.testing.assert_array_equal(_rgb(p), rgb)
    rgba = np.concatenate([rgb, np.array([[[0], [60]], [[255], [0]]], np.uint8)], axis=2)
    p = _saved(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png")
    np.testing.assert_array_equal(_rgb(p), rgb)  # alpha dropped, colours untouched (the original's convert("RGB"))


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (17, 34, 51)]
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([c for rgb in palette for c in rgb] + [0, 0, 0] * (256 - len(palette)))
    return im, np.array(palette, np.uint8)[idx]


def test_mode_P_without_and_with_transparency(tmp_path):
    im, expected = _palette_image()
    np.testing.assert_array_equal(_rgb(_saved(im, tmp_path / "p.png")), expected)
    # one transparent index (tRNS with a single entry): palette colour kept, no compositing
    np.testing.assert_array_equal(_rgb(_saved(im, tmp_path / "p1.png", transparency=1)), expected)
    # per-index alpha bytes (tRNS as a table)
    np.testing.assert_array_equal(_rgb(_saved(im, tmp_path / "pt.png", transparency=bytes([0, 128, 255, 10]))),
                                  expected)
    # GIF: palette with a transparent index
    np.testing.assert_array_equal(_rgb(_saved(im, tmp_path / "p.gif", transparency=2)), expected)


def test_mode_CMYK_tiff_and_jpeg(tmp_path):
    # pixels with either K = 0 or C = M = Y = 0: RGB = 255 - C / 255 - M / 255 - Y, or 255 - K on all channels
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0]],
                     [[0, 0, 0, 255], [0, 0, 0, 100], [40, 80, 120, 0], [255, 255, 255, 0]]], np.uint8)
    expected = np.array([[[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0]],
                         [[0, 0, 0], [155, 155, 155], [215, 175, 135], [0, 0, 0]]], np.uint8)
    p = _saved(Image.fromarray(cmyk, mode="CMYK"), tmp_path / "c.tif")
    np.testing.assert_array_equal(_rgb(p), expected)
    # CMYK JPEG (Adobe inverted CMYK on disk): flat 16x16 blocks so that JPEG loss stays small
    big = np.repeat(np.repeat(cmyk, 16, axis=0), 16, axis=1)
    p = _saved(Image.fromarray(big, mode="CMYK"), tmp_path / "c.jpg", quality=98)
    got = _rgb(p).astype(int)[8::16, 8::16]  # block centres
    assert np.abs(got - expected).max() <= 4


def test_mode_YCbCr(tmp_path):
    # JFIF: R = Y + 1.402 (Cr-128), G = Y - 0.344136 (Cb-128) - 0.714136 (Cr-128), B = Y + 1.772 (Cb-128)
    ycc = np.array([[[0, 128, 128], [128, 128, 128], [255, 128, 128], [100, 150, 90]]], np.uint8)
    expected = np.array([[[0, 0, 0], [128, 128, 128], [255, 255, 255], [47, 119, 139]]], np.uint8)
    got = _rgb(Image.fromarray(ycc, mode="YCbCr"))
    assert np.abs(got.astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(got[0, :3], expected[0, :3])  # neutral pixels are exact
    # a YCbCr image saved as JPEG decodes back to the same colours (within JPEG loss)
    big = np.repeat(np.repeat(ycc, 16, axis=0), 16, axis=1)
    p = _saved(Image.fromarray(big, mode="YCbCr"), tmp_path / "y.jpg", expect_mode="RGB", quality=98)
    assert np.abs(_rgb(p).astype(int)[8::16, 8::16] - expected).max() <= 4


# ------------------------------------------------------------------------------------------- high-bit modes
_V16 = [0, 255, 256, 257, 32767, 32768, 65280, 65535]
_V16_TO_8 = [0, 0, 1, 1, 127, 128, 255, 255]  # v >> 8, by hand


def test_mode_I16_png_is_scaled_not_white(tmp_path):
    arr = np.array([_V16], np.uint16)
    p = _saved(Image.fromarray(arr), tmp_path / "g16.png", expect_mode="I;16")
    np.testing.assert_array_equal(_rgb(p), _gray3([_V16_TO_8]))


def test_16bit_gray_agrees_with_16bit_rgb_png(tmp_path):
    """Pillow decodes 16-bit RGB PNGs to their high byte; 16-bit gray must give the same 8-bit values."""
    arr = np.array([_V16], np.uint16)
    gray = _rgb(_png16(tmp_path / "g.png", arr, 0))
    rgb = _rgb(_png16(tmp_path / "c.png", np.repeat(arr[..., None], 3, axis=2), 2))
    np.testing.assert_array_equal(gray, rgb)
    np.testing.assert_array_equal(gray, _gray3([_V16_TO_8]))


@pytest.mark.parametrize("mode,dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_mode_I16_endianness_tiff(tmp_path, mode, dtype):
    arr = np.array([_V16[:4], _V16[4:]], np.uint16)
    im = Image.frombytes(mode, (4, 2), arr.astype(dtype).tobytes())
    p = _saved(im, tmp_path / "g.tif", expect_mode="I;16" if mode == "I;16L" else mode)
    np.testing.assert_array_equal(_rgb(p), _gray3([_V16_TO_8[:4], _V16_TO_8[4:]]))
    np.testing.assert_array_equal(_rgb(im), _gray3([_V16_TO_8[:4], _V16_TO_8[4:]]))  # in-memory PIL image too


@pytest.mark.parametrize("values,expected", [
    ([0, 3, 128, 255], [0, 3, 128, 255]),                 # max <= 255: already 8-bit
    ([-5, 256, 32768, 65535], [0, 1, 128, 255]),          # max <= 65535: 16-bit, v >> 8; negatives -> 0
    ([0, 1000, 600000, 1000000], [0, 0, 153, 255]),       # beyond: round(v * 255 / max)
])
def test_mode_I_32bit_tiff(tmp_path, values, expected):
    p = _saved(Image.fromarray(np.array([values], np.int32)), tmp_path / "i.tif", expect_mode="I")
    np.testing.assert_array_equal(_rgb(p), _gray3([expected]))


@pytest.mark.parametrize("values,expected", [
    ([0.0, 0.2, 0.5, 1.0], [0, 51, 128, 255]),            # max <= 1: 0..1 scale, round(v * 255)
    ([-1.0, float("nan"), 0.5, 0.25], [0, 0, 128, 64]),   # NaN and negatives -> 0 (63.75 -> 64)
    ([0.0, 1.4, 127.6, 255.0], [0, 1, 128, 255]),         # max <= 255: 8-bit scale, rounded
    ([0.0, 255.9, 32768.5, 65535.0], [0, 0, 128, 255]),   # max <= 65535: 16-bit scale, floor(v) >> 8
    ([0.0, 2e3, 6e5, 1e6], [0, 1, 153, 255]),            # beyond: round(v * 255 / max) (0.51 -> 1)
])
def test_mode_F_float_tiff(tmp_path, values, expected):
    p = _saved(Image.fromarray(np.array([values], np.float32)), tmp_path / "f.tif", expect_mode="F")
    np.testing.assert_array_equal(_rgb(p), _gray3([expected]))


def test_exif_orientation_applied_to_16bit_and_alpha_images(tmp_path):
    arr = np.array([[0, 256, 512], [768, 1024, 65535]], np.uint16)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    p = _saved(im, tmp_path / "r16.png", expect_mode="I;16", exif=exif)
    np.testing.assert_array_equal(_rgb(p), _gray3(np.rot90([[0, 1, 2], [3, 4, 255]], k=-1)))
    rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    im = Image.fromarray(rgba, mode="RGBA")
    exif = im.getexif()
    exif[0x0112] = 3  # rotated 180°
    p = _saved(im, tmp_path / "r.png", exif=exif)
    np.testing.assert_array_equal(_rgb(p), rgba[::-1, ::-1, :3])


# ------------------------------------------------------------------------------------------ arrays, tensors
def test_uint8_arrays_and_tensors_unchanged():
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    np.testing.assert_array_equal(_rgb(rgb), rgb)
    np.testing.assert_array_equal(_rgb(torch.from_numpy(rgb).permute(2, 0, 1)), rgb)  # CHW
    np.testing.assert_array_equal(_rgb(np.array([[9, 200]], np.uint8)), _gray3([[9, 200]]))  # 2-D = gray


def test_uint16_and_bool_arrays():
    np.testing.assert_array_equal(_rgb(np.array([_V16], np.uint16)), _gray3([_V16_TO_8]))
    hwc = np.stack([np.array([_V16], np.uint16)] * 3, axis=2)
    np.testing.assert_array_equal(_rgb(hwc), _gray3([_V16_TO_8]))
    np.testing.assert_array_equal(_rgb(np.array([[True, False]])), _gray3([[255, 0]]))
    if hasattr(torch, "uint16"):
        t = torch.from_numpy(np.array([_V16], np.int32)).to(torch.uint16)
        np.testing.assert_array_equal(_rgb(t), _gray3([_V16_TO_8]))


def test_float_and_int_tensors_follow_the_F_and_I_rules():
    chw = torch.tensor([[[0.0, 0.5]], [[1.0, 0.2]], [[0.25, 0.0]]])  # [3, 1, 2] in 0..1
    np.testing.assert_array_equal(_rgb(chw), np.array([[[0, 255, 64], [128, 51, 0]]], np.uint8))
    np.testing.assert_array_equal(_rgb(chw.half()), _rgb(chw))
    np.testing.assert_array_equal(_rgb(chw * 255.0), np.array([[[0, 255, 64], [128, 51, 0]]], np.uint8))
    # the maximum is taken over all channels: one channel reaching 200 puts the whole image on the 8-bit scale
    mixed = torch.tensor([[[0.5]], [[1.0]], [[200.0]]], dtype=torch.float64)
    np.testing.assert_array_equal(_rgb(mixed), np.array([[[1, 1, 200]]], np.uint8))
    ints = torch.tensor([[0, 100, 255]], dtype=torch.int64)  # int64 (torch's default) in 0..255
    np.testing.assert_array_equal(_rgb(ints), _gray3([[0, 100, 255]]))


def test_unsupported_inputs_name_the_problem():
    with pytest.raises(ImageReadError, match="complex"):
        load_image(np.zeros((2, 2, 3), np.complex64))
    with pytest.raises(ImageReadError, match="3 \\(RGB\\) channels"):
        load_image(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ImageReadError, match="unsupported image input"):
        load_image(3.0)
