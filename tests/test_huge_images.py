"""Huge images: reduced JPEG decoding (only >= 2x the resize target, never for normal images), the per-image
pixel limit, PIL's decompression-bomb check kept out of sight, header-only sizes, and bounded drawn outputs."""
from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionclip.assets import demo_image_paths
from regionclip.data.images import (ImageReadError, decode_image, draft_scale_for, image_size, load_image,
                                    load_resized, resize_image, resized_shape)
from regionclip.evaluation.visualize import MAX_SIDE, bounded_size, class_color, draw_boxes, draw_results


def _smooth_jpeg(path: Path, w: int, h: int, orientation: int = 1) -> Path:
    """A smooth colour gradient (so reduced decoding stays close to full decoding) saved as JPEG."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)], axis=2)
    im = Image.fromarray(arr.astype(np.uint8))
    kw = {}
    if orientation != 1:
        exif = im.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    im.save(path, quality=92, **kw)
    return path


def test_draft_scale_rule():
    assert draft_scale_for((1920, 1080), (1333, 750)) == 1  # the demo images: never reduced
    assert draft_scale_for((2665, 1500), (1333, 750)) == 1  # just under 2x on one axis
    assert draft_scale_for((2666, 1500), (1333, 750)) == 2
    assert draft_scale_for((12000, 9000), (1067, 800)) == 8
    assert draft_scale_for((100000, 100000), (10, 10)) == 8  # libjpeg reduces by 8 at most


@pytest.mark.parametrize("path", demo_image_paths())
def test_normal_images_decode_bit_identically(path):
    """The parity tests need the resized 1920x1080 demo images exactly as full decoding + resize gives them."""
    ref = resize_image(load_image(path), 800, 1333)
    got, original = load_resized(path, 800, 1333)
    assert original == (1080, 1920) and got.shape == (3, 750, 1333)
    assert torch.equal(got, ref)
    assert decode_image(path, target_size=(750, 1333)).draft_scale == 1


def test_under_twice_the_target_is_not_reduced(tmp_path):
    p = _smooth_jpeg(tmp_path / "a.jpg", 330, 200)  # target (100, 165): 330 // 165 = 2 but 200 // 100 = 2 ...
    q = _smooth_jpeg(tmp_path / "b.jpg", 329, 199)  # ... one pixel less on each axis is < 2x: full decode
    for path, scale in [(p, 2), (q, 1)]:
        d = decode_image(path, target_size=resized_shape(*load_image(path).shape[1:], 100, 200))
        assert d.draft_scale == scale
    got, _ = load_resized(q, 100, 200)
    assert torch.equal(got, resize_image(load_image(q), 100, 200))


def test_large_jpeg_is_decoded_reduced_and_close_to_full_decoding(tmp_path):
    p = _smooth_jpeg(tmp_path / "big.jpg", 1000, 600)
    target = resized_shape(600, 1000, 100, 200)  # (100, 167): 1000 // 167 = 5, 600 // 100 = 6 -> 1/4
    d = decode_image(p, target_size=target)
    assert d.draft_scale == 4 and d.original_size == (600, 1000) and d.image.shape == (3, 150, 250)
    got, original = load_resized(p, 100, 200)
    ref = resize_image(load_image(p), 100, 200)
    assert original == (600, 1000) and got.shape == ref.shape == (3, *target)
    diff = (got.int() - ref.int()).abs()
    assert diff.float().mean() < 1.5 and diff.max() <= 16, (diff.float().mean(), diff.max())
    assert not torch.equal(got, ref)  # it really took the reduced path


def test_exif_rotated_large_jpeg(tmp_path):
    """Orientation 6 swaps the axes: the target is mapped to stored orientation before reducing."""
    p = _smooth_jpeg(tmp_path / "rot.jpg", 1000, 600, orientation=6)  # stored 1000x600, displayed 600 wide
    assert image_size(p) == (1000, 600)
    d = decode_image(p, target_size=resized_shape(1000, 600, 100, 200))  # (167, 100)
    assert d.draft_scale == 4 and d.original_size == (1000, 600) and d.image.shape == (3, 250, 150)
    got, original = load_resized(p, 100, 200)
    ref = resize_image(load_image(p), 100, 200)
    assert original == (1000, 600) and got.shape == ref.shape == (3, 167, 100)
    assert (got.int() - ref.int()).abs().float().mean() < 1.5


def test_pixel_limit_names_file_size_limit_and_the_fix(tmp_path):
    p = _smooth_jpeg(tmp_path / "big.jpg", 400, 300)
    with pytest.raises(ImageReadError) as e:
        load_image(p, max_pixels=100_000)
    msg = str(e.value)
    assert "big.jpg" in msg and "400x300" in msg and "120,000" in msg and "max_pixels" in msg
    assert load_image(p, max_pixels=None).shape == (3, 300, 400)
    assert load_image(p, max_pixels=120_000).shape == (3, 300, 400)
    # the limit counts the decoded pixels: reduced to 1/2 (200x150 = 30000 px) the same file passes
    got, original = load_resized(p, 100, 200, max_pixels=50_000)
    assert original == (300, 400) and got.shape == (3, 100, 133)
    with pytest.raises(ImageReadError, match="decoded at 1/2 of 400x300"):
        load_resized(p, 100, 200, max_pixels=20_000)
    with pytest.raises(ImageReadError, match="over the limit"):  # PIL images and PNGs too
        load_image(Image.new("RGB", (400, 300)), max_pixels=1000)
    Image.new("L", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="big.png"):
        load_image(tmp_path / "big.png", max_pixels=1000)


def test_pil_decompression_bomb_check_never_escapes(tmp_path, monkeypatch):
    p = _smooth_jpeg(tmp_path / "a.jpg", 200, 100)  # 20000 px
    png = tmp_path / "a.png"
    Image.new("RGB", (200, 100), (1, 2, 3)).save(png)
    for pil_limit in (5_000, 15_000):  # 20000 px: over 2x the limit = PIL error; over 1x = PIL warning
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any DecompressionBombWarning would raise here
            assert load_image(p).shape == (3, 100, 200)
            assert load_image(png).shape == (3, 100, 200)
            assert load_resized(p, 20, 40)[0].shape == (3, 20, 40)
            assert image_size(p) == (100, 200)
            with pytest.raises(ImageReadError, match="over the limit"):  # our limit still applies
                load_image(p, max_pixels=10_000)
        assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's setting restored


def test_pil_limit_restored_after_concurrent_loads(tmp_path, monkeypatch):
    p = _smooth_jpeg(tmp_path / "a.jpg", 200, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                assert load_image(p).shape == (3, 100, 200)
        except BaseException as e:  # collected: an exception in a thread would not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_image_size_reads_only_the_header(tmp_path):
    p = _smooth_jpeg(tmp_path / "a.jpg", 300, 200)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(p.read_bytes()[:2000])  # header intact, pixel data cut off
    assert image_size(truncated) == (200, 300)
    with pytest.raises(ImageReadError, match="cut.jpg"):
        load_image(truncated)
    with pytest.raises(ImageReadError, match="not found"):
        image_size(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="junk.jpg"):
        image_size(tmp_path / "junk.jpg")


# --------------------------------------------------------------------------------------- bounded drawn output
def test_bounded_size():
    assert bounded_size((1920, 1080), 2048) == (1920, 1080)
    assert bounded_size((12000, 9000), 2048) == (2048, 1536)
    assert bounded_size((100, 5000), 1000) == (20, 1000)
    assert bounded_size((12000, 9000), None) == (12000, 9000)
    assert MAX_SIDE == 2048


def test_large_images_are_drawn_downscaled_with_scaled_boxes():
    gray = (90, 90, 90)
    img = Image.new("RGB", (4000, 2000), gray)
    out = draw_boxes(img, [[1000, 400, 2000, 1200]], [""], [(255, 0, 0)], max_side=1000, line_width=2)
    assert out.size == (1000, 500)
    a = np.asarray(out)
    # box scaled by 1/4: x 250..500, y 100..300
    for x, y in [(250, 200), (500, 200), (375, 100), (375, 300)]:
        assert tuple(a[y, x]) == (255, 0, 0), (x, y)
    assert tuple(a[200, 375]) == gray and tuple(a[50, 50]) == gray
    assert img.size == (4000, 2000)  # input untouched


def test_draw_results_default_bound_and_opt_out():
    img = Image.new("RGB", (3000, 1500), (0, 0, 0))
    preds = [{"image_id": 1, "category_id": 3, "bbox": [300, 150, 600, 300], "score": 0.9}]
    out = draw_results(img, preds, {3: "cat"})
    assert out.size == (MAX_SIDE, 1024)
    s = MAX_SIDE / 3000
    assert tuple(np.asarray(out)[round(300 * s), round(300 * s)]) == class_color(3)  # left edge, scaled
    full = draw_results(img, preds, {3: "cat"}, max_side=None)
    assert full.size == (3000, 1500) and tuple(np.asarray(full)[300, 300]) == class_color(3)
    small = Image.new("RGB", (640, 480), (0, 0, 0))
    assert draw_results(small, preds, {3: "cat"}).size == (640, 480)  # normal images keep their size


def test_drawing_on_a_reduced_decode_with_source_size(tmp_path):
    """The CLI path for huge inputs: decode reduced to about the drawn size, boxes stay in original pixels."""
    p = _smooth_jpeg(tmp_path / "big.jpg", 1600, 800)
    h, w = image_size(p)
    bw, bh = bounded_size((w, h), 400)
    d = decode_image(p, target_size=(bh, bw))
    assert d.draft_scale == 4 and d.image.shape == (3, 200, 400)
    img = Image.fromarray(d.image.permute(1, 2, 0).numpy())
    preds = [{"image_id": 1, "category_id": 5, "bbox": [400, 200, 400, 200], "score": 0.9}]  # original pixels
    out = np.asarray(draw_results(img, preds, {5: "x"}, max_side=400, source_size=(w, h)))
    assert out.shape == (200, 400, 3)
    for x, y in [(100, 75), (200, 75), (150, 100)]:  # left / right / bottom edges at 1/4
        assert tuple(out[y, x]) == class_color(5), (x, y)
