"""Decoding + resize for every image size and format (issue 22), and no silent loss of images.

Sizes: smaller than the resize target on one or both axes, equal, 2x, 8x, huge; formats: everything Pillow reads
here. Property tests (hypothesis, derandomized so CI sees the same examples) draw sizes, aspect ratios, targets,
formats and EXIF orientations: decode + resize gives exactly the size of the original's ``ResizeShortestEdge``
(spec 2.1, written out again below), the original size is the upright file's, user boxes come back to the
original frame, and nothing raises. The second half checks that an exception inside per-image code (a
StopIteration included, which a DataLoader or a for loop reads as "end of data") is an error for that image.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from _region_helpers import TINY_POST, tiny_detector, tiny_vocab
from regionclip.config import InputConfig
from regionclip.data.images import (ImageReadError, decode_image, draft_scale_for, load_image, load_resized,
                                    resize_image)
from regionclip.data.loader import (IncompleteRunError, InferenceItem, LoadedItem, PreparedImageDataset, iter_loaded,
                                    prepare_image)
from regionclip.pipeline import Pipeline, RunOptions

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def d2_resize_shortest_edge(h: int, w: int, short: int, longest: int) -> tuple[int, int]:
    """The original's test-time size (spec 2.1): scale the short side to ``short``; if the long side then
    exceeds ``longest``, scale so that it equals ``longest``; round half up."""
    s = short / min(h, w)
    nh, nw = (short, s * w) if h < w else (s * h, short)
    if max(nh, nw) > longest:
        f = longest / max(nh, nw)
        nh, nw = nh * f, nw * f
    return int(nh + 0.5), int(nw + 0.5)


def _photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise, uint8 HxWx3 (JPEG-friendly, like a photo)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    arr = np.stack([255 * x / max(w, 1), 255 * y / max(h, 1), 127 + 90 * np.sin(x / 11.0) * np.cos(y / 7.0)], 2)
    return (arr + rng.normal(0, 6, arr.shape)).clip(0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, fmt: str, orientation: int = 1) -> Path:
    """``arr`` (H, W, 3 uint8) saved in one of the formats / modes below."""
    im = Image.fromarray(arr)
    kw: dict = {}
    if fmt in ("jpeg_L", "png_L"):
        im = im.convert("L")
    elif fmt == "jpeg_CMYK":
        im = im.convert("CMYK")
    elif fmt == "png_P":
        im = im.quantize(32)
    elif fmt == "png_RGBA":
        im = im.convert("RGBA")
        im.putalpha(128)
    elif fmt == "png_I16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    elif fmt == "gif":
        im = im.quantize(64)
    if orientation != 1:
        exif = im.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp", "tiff": "tif", "bmp": "bmp", "gif": "gif",
           "avif": "avif"}[fmt.split("_")[0]]
    if ext == "jpg":
        kw["quality"] = 90
    if ext == "webp":
        kw["quality"] = 90
    path = path.with_suffix("." + ext)
    im.save(path, **kw)
    return path


FORMATS = ["jpeg", "jpeg_L", "jpeg_CMYK", "png", "png_L", "png_P", "png_RGBA", "png_I16", "webp", "tiff", "bmp", "gif"]
if features.check("avif"):  # Pillow >= 11.2 with libavif (it is here in CI; a Pillow without it cannot read .avif)
    FORMATS.append("avif")
JPEGS = [f for f in FORMATS if f.startswith("jpeg")]


# ----------------------------------------------------------------------------------------------- the regression
def test_draft_scale_below_the_target_is_full_decoding():
    """The issue-22 bug: ``ratio = 0`` for an image smaller than the target raised StopIteration."""
    assert draft_scale_for((640, 480), (1067, 800)) == 1  # both axes smaller
    assert draft_scale_for((960, 540), (1333, 750)) == 1
    assert draft_scale_for((200, 1000), (200, 1000)) == 1  # equal
    assert draft_scale_for((2000, 300), (1000, 400)) == 1  # 2x on one axis, smaller on the other
    assert draft_scale_for((1, 1), (5000, 5000)) == 1
    assert draft_scale_for((0, 0), (0, 0)) == 1  # degenerate sizes never raise


@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (1280, 720), (502, 343), (333, 500), (200, 1000),
                                (1066, 800), (2134, 1600), (7000, 400),
                                pytest.param((8536, 6400), marks=pytest.mark.slow)])  # 8x: 55 MP, ~30 s
def test_ordinary_and_huge_jpegs_at_the_default_target(tmp_path, wh):
    """Smaller than 800/1333 on both axes, on one axis, equal, 2x, 8x, huge: exactly the original's size, and a
    full decode whenever the image is under twice the target (then bit-identical to decode + resize)."""
    w, h = wh
    p = _save(tmp_path / "a", _photo_like(w, h), "jpeg")
    got, original = load_resized(p, 800, 1333)
    nh, nw = d2_resize_shortest_edge(h, w, 800, 1333)
    assert original == (h, w) and tuple(got.shape) == (3, nh, nw)
    scale = decode_image(p, target_size=(nh, nw)).draft_scale
    if w < 2 * nw or h < 2 * nh:
        assert scale == 1 and torch.equal(got, resize_image(load_image(p), 800, 1333))
    else:
        assert scale > 1


# (w, h) for target (short 48, longest 80): smaller on both axes, smaller on one, equal, 2x and 8x (reduced JPEG)
SIZE_CLASSES = {"smaller": (30, 20), "one_axis": (100, 40), "equal": (48, 48), "2x": (160, 96), "8x": (640, 384)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", list(SIZE_CLASSES))
def test_every_format_and_size_class(tmp_path, fmt, size):
    w, h = SIZE_CLASSES[size]
    p = _save(tmp_path / f"{size}", _photo_like(w, h), fmt)
    prepared = prepare_image(p, InputConfig(min_size=48, max_size=80))
    nh, nw = d2_resize_shortest_edge(h, w, 48, 80)
    assert prepared.original_hw == (h, w) and prepared.resized_hw == (nh, nw)
    assert prepared.image.dtype == torch.uint8 and tuple(prepared.image.shape) == (3, nh, nw)
    reduced = fmt in JPEGS and size in ("2x", "8x")
    assert (decode_image(p, target_size=(nh, nw)).draft_scale > 1) == reduced
    if not reduced:  # everything else decodes exactly as full decoding + resize
        assert torch.equal(prepared.image, resize_image(load_image(p), 48, 80))


def test_too_elongated_image_is_a_clear_error(tmp_path):
    p = _save(tmp_path / "strip", _photo_like(3000, 1), "png")
    with pytest.raises(ImageReadError, match=r"strip\.png: a 3000x1 image is too elongated"):
        load_resized(p, 800, 1333)
    with pytest.raises(ImageReadError, match="too elongated"):
        resize_image(load_image(p), 800, 1333)


# ------------------------------------------------------------------------------------------------ properties
_sizes = st.integers(1, 160)
_targets = st.integers(4, 64).flatmap(lambda s: st.tuples(st.just(s), st.integers(s, 3 * s)))


@PROPERTY
@given(w=_sizes, h=_sizes, target=_targets, fmt=st.sampled_from(["jpeg", "jpeg_L", "png", "webp"]),
       orientation=st.sampled_from([1, 3, 6, 8]))
def test_property_decode_resize_gives_the_originals_size(w, h, target, fmt, orientation):
    short, longest = target
    with tempfile.TemporaryDirectory() as d:
        p = _save(Path(d) / "x", _photo_like(w, h), fmt, orientation)
        uh, uw = (w, h) if orientation in (6, 8) else (h, w)  # the upright size
        nh, nw = d2_resize_shortest_edge(uh, uw, short, longest)
        cfg = InputConfig(min_size=short, max_size=longest)
        if nh < 1 or nw < 1:  # the original cannot run such an image either: a clear error, never a crash
            with pytest.raises(ImageReadError, match="too elongated"):
                prepare_image(p, cfg)
            return
        prepared = prepare_image(p, cfg)
        assert prepared.original_hw == (uh, uw)
        assert prepared.resized_hw == (nh, nw) and tuple(prepared.image.shape) == (3, nh, nw)
        if decode_image(p, target_size=(nh, nw)).draft_scale == 1:
            assert torch.equal(prepared.image, resize_image(load_image(p), short, longest))


@pytest.fixture(scope="module")
def tiny_det():
    return tiny_detector(0)


@PROPERTY
@given(w=st.integers(24, 300), aspect=st.floats(0.3, 3.0), short=st.integers(32, 72), data=st.data())
def test_property_user_boxes_come_back_to_the_original_frame(tiny_det, w, aspect, short, data):
    """GT-mode detection (boxes classified, not regressed) of random float boxes on a random-size JPEG: every
    detection box is one of the given boxes, in original pixels, inside the image."""
    h = max(1, round(w * aspect))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    boxes = []
    for _ in range(data.draw(st.integers(1, 6))):
        x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
        boxes.append([x0, y0, rng.uniform(x0 + 0.5, w), rng.uniform(y0 + 0.5, h)])
    given_boxes = torch.tensor(boxes, dtype=torch.float32)
    pipe = Pipeline(tiny_det, InputConfig(min_size=short, max_size=2 * short))
    with tempfile.TemporaryDirectory() as d:
        p = _save(Path(d) / "x", _photo_like(w, h), "jpeg")
        opts = RunOptions(postprocess=TINY_POST, chunk_size=64)
        det = pipe.detect([str(p)], tiny_vocab(), opts, boxes=[given_boxes])[0]
    assert det.image_size == (h, w) and len(det.boxes) >= 1
    b = det.boxes
    assert bool(((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all())
    # each detection is one of the user boxes, scaled to the resized frame and back (float round trip)
    err = (b[:, None, :] - given_boxes[None]).abs().amax(-1).amin(1)
    assert float(err.max()) < 1e-3 * max(w, h), (b, given_boxes)


# ------------------------------------------------------------------------------------------ no silent loss
class _ExplodingPath(os.PathLike):
    """A path whose use raises StopIteration, standing for any per-image code that raises it (the issue-22 bug)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __fspath__(self) -> str:
        raise StopIteration

    def __str__(self) -> str:
        return self.name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stopiteration_in_a_worker_is_that_images_error(tmp_path, tiny_det, num_workers):
    """Old code: the DataLoader re-raised the StopIteration of image 2 as the end of the data; images 2-4 were
    lost and the run reported success. Now image 2 is an error naming it and the others are detected."""
    good = [_save(tmp_path / f"g{i}", _photo_like(50 + 10 * i, 40), "jpeg") for i in range(3)]
    box = np.array([[2.0, 3.0, 30.0, 25.0]], np.float32)
    items = [InferenceItem("a", str(good[0]), boxes=box),
             InferenceItem("bad", _ExplodingPath("exploding.jpg"), boxes=box),  # type: ignore[arg-type]
             InferenceItem("b", str(good[1]), boxes=box), InferenceItem("c", str(good[2]), boxes=box)]
    pipe = Pipeline(tiny_det, InputConfig(min_size=32, max_size=64))
    results = list(pipe.run(items, tiny_vocab(), RunOptions(postprocess=TINY_POST, num_workers=num_workers)))
    assert sorted(r.item.key for r in results) == ["a", "b", "bad", "c"]
    bad = next(r for r in results if r.item.key == "bad")
    assert bad.detections is None and "exploding.jpg" in bad.error and "StopIteration" in bad.error
    assert all(r.error is None and r.detections is not None for r in results if r.item.key != "bad")


def test_dataset_never_raises_and_names_the_image():
    ds = PreparedImageDataset([InferenceItem("x", _ExplodingPath("x.jpg"))], InputConfig())  # type: ignore[arg-type]
    got = ds[0]
    assert isinstance(got, LoadedItem) and got.prepared is None and "x.jpg" in (got.error or "")


def test_a_loader_that_stops_early_is_an_error():
    items = [InferenceItem(k, f"{k}.jpg") for k in "abc"]
    with pytest.raises(IncompleteRunError, match=r"2 of 3 images.*b\.jpg"):
        list(iter_loaded([LoadedItem(0), LoadedItem(2)], items))


def test_a_model_failure_is_pinned_to_its_image(tmp_path, tiny_det, monkeypatch):
    """A batch whose model call raises is run image by image: only the image that fails is an error."""
    paths = [_save(tmp_path / f"m{i}", _photo_like(64, 48, seed=i), "png") for i in range(3)]
    items = [InferenceItem(f"k{i}", str(p), boxes=np.array([[1.0, 1.0, 40.0, 30.0]], np.float32))
             for i, p in enumerate(paths)]
    pipe = Pipeline(tiny_det, InputConfig(min_size=32, max_size=64))
    poison = prepare_image(paths[1], pipe.input_cfg).image
    real = Pipeline.detect_prepared

    def flaky(self, prepared, *a, **kw):
        if any(torch.equal(p.image, poison) for p in prepared):
            raise StopIteration  # the worst case: would end any for loop it escaped into
        return real(self, prepared, *a, **kw)

    monkeypatch.setattr(Pipeline, "detect_prepared", flaky)
    results = list(pipe.run(items, tiny_vocab(), RunOptions(postprocess=TINY_POST, batch_size=3)))
    by_key = {r.item.key: r for r in results}
    assert sorted(by_key) == ["k0", "k1", "k2"]
    assert by_key["k1"].error is not None and "m1.png" in by_key["k1"].error and "StopIteration" in by_key["k1"].error
    assert by_key["k0"].detections is not None and by_key["k2"].detections is not None


def test_training_sample_error_names_the_image(tmp_path, monkeypatch):
    from regionclip.data import train_data
    from regionclip.data.datasets import ImageRecord

    p = _save(tmp_path / "t", _photo_like(64, 48), "jpeg")
    rec = ImageRecord(image_id=7, file_name=str(p), height=48, width=64, boxes=np.array([[1, 1, 20, 20]], np.float32),
                      labels=np.array([0]), iscrowd=np.array([False]))
    ds = train_data.TrainingDataset([rec], min_sizes=(32,), max_size=64)
    assert tuple(ds[(0, 1)].image.shape[1:]) == (32, 43)

    def boom(*_a, **_k) -> Optional[torch.Tensor]:
        raise StopIteration

    monkeypatch.setattr(train_data, "load_image", boom)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    with pytest.raises(train_data.TrainingSampleError, match=r"t\.jpg \(id 7\): StopIteration"):
        list(loader)  # old code: an empty epoch, no error


def test_evaluation_predictor_stopiteration_is_an_error(tmp_path):
    import json

    from regionclip.data.datasets import load_annotations
    from regionclip.evaluation import run_inference

    p = _save(tmp_path / "e", _photo_like(64, 48), "jpeg")
    gt = {"images": [{"id": 1, "file_name": p.name, "width": 64, "height": 48}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100,
                           "iscrowd": 0}], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ds = load_annotations(tmp_path / "gt.json", tmp_path)

    def predict(records):
        raise StopIteration

    with pytest.raises(RuntimeError, match=r"StopIteration on .*e\.jpg"):
        run_inference(ds, predict, tmp_path / "out", progress=False)


def test_settings_errors_still_stop_the_run(tmp_path, tiny_det):
    """Only image-dependent failures become per-image errors: RPN mode on a model without an RPN is one error for
    the run, not one per image."""
    p = _save(tmp_path / "s", _photo_like(64, 48), "jpeg")
    pipe = Pipeline(tiny_det, InputConfig(min_size=32, max_size=64))
    with pytest.raises(RuntimeError, match="no region proposal network"):
        list(pipe.run([InferenceItem("s", str(p))], tiny_vocab(), RunOptions(postprocess=TINY_POST)))


def test_api_detect_never_leaks_stopiteration(tmp_path, tiny_det, monkeypatch):
    """``RegionCLIP.detect(["small.jpg"])`` raised a bare StopIteration(); any left in the model is now named."""
    p = _save(tmp_path / "small", _photo_like(64, 48), "jpeg")
    pipe = Pipeline(tiny_det, InputConfig(min_size=800, max_size=1333))  # the image is smaller than the target
    box = [np.array([[2.0, 2.0, 40.0, 30.0]], np.float32)]
    assert len(pipe.detect([str(p)], tiny_vocab(), RunOptions(postprocess=TINY_POST), boxes=box)) == 1

    def stop(*_a, **_k):
        raise StopIteration

    monkeypatch.setattr(Pipeline, "detect_prepared", stop)
    with pytest.raises(RuntimeError, match=r"StopIteration while running the model on .*small\.jpg"):
        pipe.detect([str(p)], tiny_vocab(), RunOptions(postprocess=TINY_POST), boxes=box)
