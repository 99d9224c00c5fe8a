"""Regenerate the real-photo test corpus (issue 22): ordinary-sized photos, JPEG and PNG, one grayscale, one
EXIF-rotated, one palette PNG, plus ``annotations.json`` (COCO format, a few boxes per image).

Provenance: every photo is a crop / rescale of the project's own demo images (``src/regionclip/assets/images``),
except ``portrait_333x500.png``, drawn here (gradients and shapes). Run from anywhere:
``python tests/assets/photos/make_photos.py``; the output is deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
DEMO = HERE.parents[2] / "src" / "regionclip" / "assets" / "images"
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "building"},
              {"id": 12, "name": "tree"}]


def _crop(name: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
    with Image.open(DEMO / name) as im:
        return im.convert("RGB").crop(box).resize(size, Image.Resampling.LANCZOS)


def _drawn_portrait(w: int = 333, h: int = 500) -> Image.Image:
    """A sky / sun / houses / lawn scene: smooth areas and hard edges (compresses well as PNG)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    sky = np.stack([90 + 80 * y / h, 140 + 60 * y / h, 235 - 30 * y / h], axis=2)
    img = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((230, 40, 300, 110), fill=(250, 220, 90))
    d.rectangle((0, 330, w, h), fill=(70, 140, 60))
    d.rectangle((30, 220, 150, 360), fill=(180, 90, 70))
    d.polygon([(20, 225), (90, 160), (160, 225)], fill=(110, 50, 40))
    d.rectangle((70, 300, 105, 360), fill=(90, 60, 40))
    d.rectangle((200, 260, 300, 370), fill=(200, 200, 190))
    d.ellipse((250, 380, 320, 450), fill=(40, 100, 40))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def _boxes(rng: np.random.Generator, w: int, h: int, n: int) -> list[list[float]]:
    """n COCO [x, y, w, h] boxes inside a w x h image; the first touches the right / bottom border."""
    out = [[round(w * 0.55, 1), round(h * 0.6, 1), round(w * 0.45, 1), round(h * 0.4, 1)]]
    for _ in range(n - 1):
        bw, bh = rng.uniform(0.1, 0.5) * w, rng.uniform(0.1, 0.5) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        out.append([round(float(v), 2) for v in (x0, y0, bw, bh)])
    return out


def main() -> None:
    photos: list[tuple[str, Image.Image, dict]] = [
        ("street_640x480.jpg", _crop("sample_img1.jpg", (300, 80, 1740, 1160), (640, 480)), {"quality": 85}),
        ("wide_960x540.jpg", _crop("sample_img2.jpg", (0, 0, 1920, 1080), (960, 540)), {"quality": 80}),
        ("odd_502x343.jpg", _crop("sample_img1.jpg", (900, 300, 1653, 815), (502, 343)), {"quality": 88}),
        ("portrait_333x500.png", _drawn_portrait(), {"optimize": True}),
        ("tall_200x1000.jpg", _crop("sample_img2.jpg", (1100, 40, 1300, 1040), (200, 1000)), {"quality": 85}),
        ("gray_480x640.jpg", _crop("sample_img2.jpg", (400, 60, 1150, 1060), (480, 640)).convert("L"),
         {"quality": 85}),
        ("palette_400x300.png", _crop("sample_img1.jpg", (0, 400, 800, 1000), (400, 300)).quantize(64),
         {"optimize": True}),
    ]
    # A phone photo: stored 400x300 landscape with EXIF orientation 6 (display rotated 90 degrees: 300x400 upright)
    rotated = _crop("sample_img2.jpg", (200, 100, 1000, 700), (400, 300))
    exif = rotated.getexif()
    exif[0x0112] = 6
    photos.append(("phone_exif6_300x400.jpg", rotated, {"quality": 85, "exif": exif}))

    rng = np.random.default_rng(22)
    images, annotations = [], []
    for i, (name, im, kw) in enumerate(photos, start=1):
        im.save(HERE / name, **kw)
        with Image.open(HERE / name) as check:
            w, h = check.size
            if check.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w  # COCO sizes are of the upright image
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for j, b in enumerate(_boxes(rng, w, h, 3)):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": CATEGORIES[j % 4]["id"],
                                "bbox": b, "area": round(b[2] * b[3], 2), "iscrowd": 0})
    coco = {"info": {"description": "regionclip test photos (issue 22)"}, "images": images,
            "annotations": annotations, "categories": CATEGORIES}
    (HERE / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n")


if __name__ == "__main__":
    main()
