"""Ordinary photos through every front end that reads images (issue 22).

The corpus (tests/assets/photos, made by its make_photos.py from the project's own demo images) has the sizes
users have - 640x480, 960x540, 502x343, 333x500, 200x1000, a grayscale 480x640, a palette PNG and a phone JPEG
with EXIF rotation - most of them smaller than the 800 / 1333 test-time resize, which once made the first such
JPEG end a run silently. Each front end must process and report every image, with boxes inside their image:
``detect`` (GT boxes and RPN), ``extract-regions``, ``index`` / ``search``, ``evaluate`` on the COCO json, the
:class:`RegionCLIP` API, the predictor, the demo backend and the training data loader. Models are tiny and random;
the CLI runs at the presets' 800 / 1333 resize, the in-memory front ends at 512 / 853 (still upscaling most
photos).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _region_helpers import tiny_model, write_tiny_checkpoint
from regionclip.cli.main import main
from regionclip.data.images import resized_shape

PHOTOS = Path(__file__).resolve().parent / "assets" / "photos"
ANNOTATIONS = PHOTOS / "annotations.json"
COCO = json.loads(ANNOTATIONS.read_text())
SIZES = {im["file_name"]: (im["width"], im["height"]) for im in COCO["images"]}  # upright (w, h)
IDS = {im["file_name"]: im["id"] for im in COCO["images"]}
BOXES = {n: np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in COCO["annotations"] if a["image_id"] == IDS[n]], np.float32) for n in SIZES}
NAMES = [c["name"] for c in COCO["categories"]]
EPS = 1e-3


def _inside_xyxy(boxes, w: float, h: float) -> bool:
    b = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4)
    return bool(((b[:, 0] >= -EPS) & (b[:, 1] >= -EPS) & (b[:, 2] <= w + EPS) & (b[:, 3] <= h + EPS)
                 & (b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])).all())


def _inside_xywh(bbox, w: float, h: float) -> bool:
    x, y, bw, bh = bbox
    return _inside_xyxy([[x, y, x + bw, y + bh]], w, h)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint in the released layout (CLIP RN + offline RPN) and random [4, 16] class embeddings."""
    d = tmp_path_factory.mktemp("photos")
    emb = d / "emb.pth"
    torch.save(torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(22)), emb)
    return {"ckpt": write_tiny_checkpoint(d / "tiny_rpn.pth", rpn=True), "emb": emb, "dir": d}


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=1, rpn=True, min_size=512, max_size=853)
    m.set_vocabulary(NAMES, torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(5)))
    return m


def test_corpus_has_the_sizes_users_have():
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png"))
    assert sorted(p.name for p in files) == sorted(SIZES) and len(files) == 8
    assert sum(p.stat().st_size for p in files) < 1_000_000
    modes = set()
    for p in files:
        with Image.open(p) as im:
            w, h = im.size if im.getexif().get(0x0112, 1) not in (5, 6, 7, 8) else im.size[::-1]
            modes.add((im.format, im.mode))
        assert (w, h) == SIZES[p.name] and 200 <= min(w, h) and max(w, h) <= 1000
        assert len(BOXES[p.name]) == 3 and _inside_xyxy(BOXES[p.name], w, h)
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "P")} <= modes
    # most are smaller than the 800 / 1333 test-time resize (the case that was lost)
    assert sum(resized_shape(h, w, 800, 1333)[0] > h for w, h in SIZES.values()) >= 6


def _check_results(out: Path, results_name: str = "results.json") -> dict[int, int]:
    """Every image in images.json, detections of every image inside it; returns detections per image id."""
    meta = json.loads((out / "images.json").read_text())
    assert sorted(Path(m["file_name"]).name for m in meta["images"]) == sorted(SIZES)
    size_of = {m["id"]: (m["width"], m["height"]) for m in meta["images"]}
    per_image: dict[int, int] = {}
    for r in json.loads((out / results_name).read_text()):
        assert _inside_xywh(r["bbox"], *size_of[r["image_id"]]), r
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert sorted(per_image) == sorted(size_of), "every image has detections"
    for m in meta["images"]:
        assert (m["width"], m["height"]) == SIZES[Path(m["file_name"]).name]
    return per_image


def test_cli_detect_gt_boxes(files, tmp_path, capsys):
    out = tmp_path / "gt"
    rc = main(["detect", str(PHOTOS), "--weights", str(files["ckpt"]), "--preset", "coco-gt", "--boxes",
               str(ANNOTATIONS), "--concept-emb", str(files["emb"]), "--vocab", ",".join(NAMES), "-o", str(out),
               "--num-workers", "2", "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "8 images in" in printed.out  # the old code printed "0 images" and exited 0
    per_image = _check_results(out)
    assert all(n <= 3 for n in per_image.values())  # GT mode: at most one detection per given box (per class)
    for name in SIZES:  # annotated images are written for every photo, at the photo's size
        with Image.open(out / f"{Path(name).stem}_vis.jpg") as vis:
            assert vis.size == SIZES[name]


def test_cli_detect_rpn(files, tmp_path, capsys):
    out = tmp_path / "rpn"
    rc = main(["detect", str(PHOTOS), "--weights", str(files["ckpt"]), "--concept-emb", str(files["emb"]),
               "--vocab", ",".join(NAMES), "--score-thresh", "0", "--max-proposals", "10", "-o", str(out),
               "--no-vis", "--num-workers", "0", "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "8 images in" in printed.out
    _check_results(out)


def test_cli_extract_regions_then_index_and_search(files, tmp_path, capsys):
    feats = tmp_path / "feats"
    rc = main(["extract-regions", "--coco-json", str(ANNOTATIONS), "--image-root", str(PHOTOS), "--regions",
               "boxes", "--weights", str(files["ckpt"]), "-o", str(feats), "--num-workers", "2", "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "8 images extracted" in printed.out and "0 failed" in printed.out
    index = json.loads((feats / "index.json").read_text())
    assert index["errors"] == [] and index["num_images"] == 8 and index["num_regions"] == 24
    from regionclip.engine.extract import load_regions

    regions = load_regions(feats)
    by_name = {Path(im["file_name"]).name: im for im in index["images"]}
    assert sorted(by_name) == sorted(SIZES)
    for name, im in by_name.items():
        assert (im["width"], im["height"]) == SIZES[name]
        rec = regions[im["key"]]
        np.testing.assert_allclose(rec["boxes"].numpy(), BOXES[name], atol=1e-3)  # the boxes as given
        assert rec["feats"].shape == (3, 16) and bool(torch.isfinite(rec["feats"]).all())

    assert main(["index", str(feats), "-o", str(tmp_path / "idx"), "--backend", "exact", "--quiet"]) == 0
    assert "24 regions" in capsys.readouterr().out
    query = PHOTOS / "street_640x480.jpg"
    box = ",".join(f"{v:g}" for v in BOXES[query.name][1])
    hits_json = tmp_path / "hits.json"
    assert main(["search", str(tmp_path / "idx"), "--image", str(query), "--box", box, "--top-k", "24", "--json",
                 str(hits_json), "--quiet"]) == 0
    hits = json.loads(hits_json.read_text())["hits"]
    assert len(hits) == 24 and {Path(h["file_name"]).name for h in hits} == set(SIZES)
    for h in hits:
        assert _inside_xyxy([h["box"]], *SIZES[Path(h["file_name"]).name])
    # the query region itself is in the index: one hit has cosine 1 (a tiny random model's embeddings are nearly
    # parallel, so only its presence among the top scores is meaningful)
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_cli_evaluate_scores_every_image(files, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--dataset", str(ANNOTATIONS), "--image-root", str(PHOTOS), "--regions", "gt",
               "--preset", "coco-gt", "--weights", str(files["ckpt"]), "--concept-emb", str(files["emb"]), "-o",
               str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in results} == set(IDS.values())
    size_of = {i: SIZES[n] for n, i in IDS.items()}
    assert all(_inside_xywh(r["bbox"], *size_of[r["image_id"]]) for r in results)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "AP" in json.dumps(metrics)


def _three_photos(tmp_path: Path) -> tuple[Path, int]:
    """The corpus json cut to two photos of equal resized size (a batch of 2) and one other."""
    keep = {IDS["street_640x480.jpg"], IDS["palette_400x300.png"], IDS["tall_200x1000.jpg"]}
    subset = {**COCO, "images": [im for im in COCO["images"] if im["id"] in keep],
              "annotations": [a for a in COCO["annotations"] if a["image_id"] in keep]}
    path = tmp_path / "three_photos.json"
    path.write_text(json.dumps(subset))
    return path, len(keep)


@pytest.mark.parametrize("regions", ["gt", "rpn"])
def test_cli_evaluate_decoding_workers_change_nothing(files, tmp_path, monkeypatch, regions):
    """``evaluate --num-workers`` was accepted and ignored (its loop decoded images itself; issue 25): the images
    now stream through the pipeline's DataLoader, and 0 or 2 decoding workers give the same results and metrics
    files, byte for byte (at batch size 2, where two of the photos share a resized size and run through the model
    together)."""
    from regionclip.pipeline import Pipeline

    seen = []
    orig = Pipeline.iter_batches

    def spy(self, items, options, **kw):
        seen.append((len(items), options.num_workers, options.batch_size))
        return orig(self, items, options, **kw)

    monkeypatch.setattr(Pipeline, "iter_batches", spy)
    subset, num = _three_photos(tmp_path)
    outs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        argv = ["evaluate", "--dataset", str(subset), "--image-root", str(PHOTOS), "--regions", regions,
                "--preset", f"coco-{regions}", "--weights", str(files["ckpt"]), "--concept-emb", str(files["emb"]),
                "--score-thresh", "0", "--num-workers", workers, "--batch-size", "2", "-o", str(out),
                "--no-progress"]
        if regions == "rpn":
            argv += ["--rpn-weights", str(files["ckpt"]), "--max-proposals", "30"]
        assert main(argv) == 0
        outs.append(out)
    assert seen == [(num, 0, 2), (num, 2, 2)]
    results = [(o / "coco_instances_results.json").read_bytes() for o in outs]
    assert results[0] == results[1] and {r["image_id"] for r in json.loads(results[0])} == set(
        im["id"] for im in json.loads(subset.read_text())["images"])
    assert (outs[0] / "metrics.json").read_bytes() == (outs[1] / "metrics.json").read_bytes()


@pytest.mark.parametrize("metric", ["region-accuracy", "proposals"])
def test_cli_evaluate_metrics_decoding_workers_change_nothing(files, tmp_path, monkeypatch, metric):
    """``evaluate --metric region-accuracy | proposals`` decoded in the main process whatever --num-workers said:
    both now decode in the DataLoader's workers and batch equal-size images; 0 workers one image at a time and 2
    workers two at a time give the same metrics."""
    import regionclip.evaluation.proposals as proposals
    from regionclip.pipeline import Pipeline

    seen = []
    orig_batches, orig_loader = Pipeline.iter_batches, proposals.make_loader

    def spy_batches(self, items, options, **kw):
        seen.append((options.num_workers, options.batch_size))
        return orig_batches(self, items, options, **kw)

    def spy_loader(items, input_cfg, *, num_workers, **kw):
        seen.append((num_workers,))
        return orig_loader(items, input_cfg, num_workers=num_workers, **kw)

    monkeypatch.setattr(Pipeline, "iter_batches", spy_batches)
    monkeypatch.setattr(proposals, "make_loader", spy_loader)
    name = metric.replace("-", "_") + ".json"
    subset, num = _three_photos(tmp_path)
    got = []
    for workers, batch in (("0", "1"), ("2", "2")):
        out = tmp_path / f"w{workers}"
        argv = ["evaluate", "--metric", metric, "--dataset", str(subset), "--image-root", str(PHOTOS),
                "--num-workers", workers, "--batch-size", batch, "-o", str(out), "--no-progress"]
        argv += ["--weights", str(files["ckpt"]), "--concept-emb", str(files["emb"])] if metric == "region-accuracy" \
            else ["--rpn-weights", str(files["ckpt"])]
        assert main(argv) == 0
        got.append(json.loads((out / name).read_text()))
    assert seen == ([(0, 1), (2, 2)] if metric == "region-accuracy" else [(0,), (2,)])
    assert got[0] == got[1] and got[0]["num_images"] == num


def test_api_detect_rpn_and_boxes(model):
    paths = [str(PHOTOS / n) for n in sorted(SIZES)]
    dets = model.detect(paths, score_thresh=0.0, max_proposals=10)
    assert len(dets) == len(paths)
    for p, d in zip(paths, dets):
        w, h = SIZES[Path(p).name]
        assert d.image_size == (h, w) and d.file_name == p and len(d) > 0 and _inside_xyxy(d.boxes, w, h)
    given = [BOXES[Path(p).name] for p in paths]
    for p, d, b in zip(paths, model.detect(paths, given, score_thresh=0.0, batch_size=3), given):
        w, h = SIZES[Path(p).name]
        assert len(d) > 0 and _inside_xyxy(d.boxes, w, h)
        err = (d.boxes[:, None] - torch.from_numpy(b)[None]).abs().amax(-1).amin(1)
        assert float(err.max()) < 1e-2  # GT mode: each detection is one of the given boxes, original frame
    small = PHOTOS / "street_640x480.jpg"
    assert len(model.detect([str(small)])) == 1  # the one-liner raised StopIteration()


def test_predictor_on_every_photo(model):
    from regionclip.predictor import RegionPredictor

    pred = RegionPredictor(model)
    for name, (w, h) in SIZES.items():
        pred.set_image(str(PHOTOS / name))
        assert pred.original_size == (h, w) and pred.input_size == resized_shape(h, w, 512, 853)
        emb = pred.encode_boxes(BOXES[name])
        assert emb.shape == (3, 16) and bool(torch.isfinite(emb).all())
        det = pred.detect(boxes=BOXES[name], score_thresh=0.0)
        assert len(det) > 0 and _inside_xyxy(det.boxes, w, h)


def test_demo_backend_on_every_photo(model, tmp_path):
    from regionclip.demo.app import REGIONS_BOXES, REGIONS_RPN, VOCAB_CUSTOM, DemoBackend

    def embed(names):
        return torch.randn(len(names), 16, generator=torch.Generator().manual_seed(len(names)))

    be = DemoBackend(model, embed, output_dir=tmp_path)
    for name, (w, h) in SIZES.items():
        with Image.open(PHOTOS / name) as im:
            im.load()
            runs = [be.run(im, VOCAB_CUSTOM, ", ".join(NAMES), REGIONS_BOXES, BOXES[name].tolist(), 0.0, 10)]
            if name in ("tall_200x1000.jpg", "phone_exif6_300x400.jpg"):  # RPN mode: test_api covers every photo
                runs.append(be.run(im, VOCAB_CUSTOM, ", ".join(NAMES), REGIONS_RPN, None, 0.0, 5))
        for r in runs:
            assert r.detections.image_size == (h, w) and len(r.rows) > 0
            assert r.annotated.size == (w, h)  # drawn upright, like the boxes (the phone photo was drawn rotated)
            assert _inside_xyxy([row[2:] for row in r.rows], w, h)
            assert json.loads(r.json_path.read_text())["annotations"]


def test_training_loader_every_photo(tmp_path):
    from regionclip.data.datasets import load_annotations
    from regionclip.data.train_data import TrainingDataset

    ds = load_annotations(ANNOTATIONS, PHOTOS)
    train = TrainingDataset(ds.records, min_sizes=(640, 800), max_size=1333, flip=True)
    keys = [[(i, 1000 + i)] for i in range(len(train))]
    loader = torch.utils.data.DataLoader(train, batch_sampler=keys, collate_fn=list, num_workers=2)
    samples = [s for batch in loader for s in batch]
    assert sorted(s.image_id for s in samples) == sorted(IDS.values())
    for s, rec in zip(samples, ds.records):
        assert s.image_id == rec.image_id
        nh, nw = s.image.shape[1:]
        short = 640 if (nh, nw) == resized_shape(rec.height, rec.width, 640, 1333) else 800
        assert (nh, nw) == resized_shape(rec.height, rec.width, short, 1333)
        assert len(s.boxes) == 3 and _inside_xyxy(s.boxes, nw, nh)
