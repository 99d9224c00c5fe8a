"""Exported graphs (regionclip.export) reproduce the eager model through the unchanged pipeline.

Tiny random models (seconds): ONNX Runtime, OpenVINO and torch.export backends against float32 eager (region
embeddings within 1e-5 relative, final detections with the same classes, source regions and order), RoiAlign's
aligned=True semantics, the manifest and its weights check, int8. One full-size RN50 check through the CLI is
marked slow.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _region_helpers import random_boxes, tiny_detector, tiny_options, tiny_vocab, write_images, write_tiny_checkpoint

from regionclip.config import InputConfig
from regionclip.export import export_model, make_backend, read_manifest
from regionclip.export.graphs import RegionHeadGraph
from regionclip.pipeline import Pipeline
from regionclip.structures import Detections

pytest.importorskip("onnx", reason="the export tests need pip install 'regionclip[onnx]'")
pytest.importorskip("onnxruntime", reason="the export tests need pip install 'regionclip[onnx]'")

INPUT = InputConfig(min_size=96, max_size=128)
EMB_RTOL = 1e-5  # max |fast - eager| / max |eager| of the raw region embeddings
TIE = 1e-5  # detections whose scores are this close may swap places (float summation order differs)


def assert_same_detections(fast: Detections, eager: Detections) -> None:
    """Same number, classes, source regions and order; only near-tied detections (scores within TIE) may swap."""
    assert len(fast.labels) == len(eager.labels), f"{len(fast.labels)} detections vs {len(eager.labels)} eager"
    for i, (a, b) in enumerate(zip(zip(fast.labels.tolist(), fast.region_index.tolist()),
                                   zip(eager.labels.tolist(), eager.region_index.tolist()))):
        if a != b:
            gap = abs(float(fast.scores[i]) - float(eager.scores[i]))
            assert gap <= TIE, f"detection {i}: (class, region) {a} vs eager {b}, scores {gap:.2e} apart"
    torch.testing.assert_close(fast.scores, eager.scores, atol=1e-5, rtol=1e-4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def tiny_rpn() -> torch.nn.Module:
    return tiny_detector(0, rpn=True)


@pytest.fixture(scope="module")
def onnx_dir(tiny_rpn: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    export_model(tiny_rpn, out, fmt="onnx")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # two equal sizes (batched together: dynamic batch) and one other (dynamic H/W)
    return write_images(tmp_path_factory.mktemp("img"), [(100, 130), (100, 130), (90, 70)], seed=1)


def test_roi_align_exports_with_half_pixel_semantics(tmp_path: Path) -> None:
    """torchvision roi_align(aligned=True) -> ONNX RoiAlign half_pixel: same values, incl. sub-pixel/edge boxes."""
    import onnx

    det = tiny_detector(1)
    export_model(det, tmp_path, fmt="onnx", include_rpn=False)
    nodes = [n for n in onnx.load(str(tmp_path / "region_head.onnx")).graph.node if n.op_type == "RoiAlign"]
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["coordinate_transformation_mode"] == b"half_pixel"
    assert attrs["spatial_scale"] == pytest.approx(1 / 16)
    res4 = torch.randn(2, det.backbone.layer3[-1].conv3.out_channels, 7, 9)
    rois = torch.tensor([[0, 0.0, 0.0, 143.0, 111.0], [1, 3.3, 4.7, 5.1, 6.2], [1, 100.5, 80.25, 144.0, 112.0],
                         [0, 17.0, 9.0, 17.0, 9.0]])  # whole map, sub-pixel, touching the border, zero-size
    model = make_backend(det, "onnxruntime", tmp_path)
    fast, _ = model.encode_regions(res4, [rois[rois[:, 0] == 0, 1:], rois[rois[:, 0] == 1, 1:]], chunk_size=256)
    with torch.no_grad():
        ref = RegionHeadGraph(det)(res4, torch.cat([rois[rois[:, 0] == 0], rois[rois[:, 0] == 1]]))
    assert rel_err(fast, ref) < EMB_RTOL


def test_onnxruntime_pipeline_matches_eager(tiny_rpn: torch.nn.Module, onnx_dir: Path, images: list[Path]) -> None:
    eager = Pipeline(tiny_rpn, INPUT)
    fast = Pipeline(make_backend(tiny_rpn, "onnxruntime", onnx_dir), INPUT)
    opts, vocab = tiny_options(chunk=7), tiny_vocab()
    for batch in ([images[0], images[1]], [images[2]]):
        prep = [eager.prepare(p) for p in batch]
        props_e, props_f = eager.proposals(prep, opts), fast.proposals(prep, opts)  # RPN graph + torch selection
        for pe, pf in zip(props_e, props_f):
            torch.testing.assert_close(pf.boxes, pe.boxes, atol=1e-3, rtol=0)
            torch.testing.assert_close(pf.objectness_logits, pe.objectness_logits, atol=1e-4, rtol=0)
        feats = eager.features(prep, opts)
        assert rel_err(fast.features(prep, opts), feats) < EMB_RTOL
        boxes = [p.boxes for p in props_e]
        assert rel_err(fast.encode(feats, boxes, opts), eager.encode(feats, boxes, opts)) < EMB_RTOL
        for df, de in zip(fast.detect_prepared(prep, vocab, opts), eager.detect_prepared(prep, vocab, opts)):
            assert len(de.labels) > 0
            assert_same_detections(df, de)
    # user-box (GT) mode and an image without boxes
    prep = [eager.prepare(images[2])]
    regions = [eager.user_regions(random_boxes(13, 90, 70, seed=2), prep[0])]
    assert_same_detections(fast.detect_prepared(prep, vocab, opts, regions=regions)[0],
                           eager.detect_prepared(prep, vocab, opts, regions=regions)[0])
    empty = fast.encode(fast.features(prep, opts), [torch.zeros(0, 4)], opts)
    assert empty.shape == (0, tiny_rpn.embed_dim)


def test_manifest_and_weights_check(tiny_rpn: torch.nn.Module, onnx_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(onnx_dir)
    assert set(manifest["graphs"]) == {"trunk", "region_head", "rpn"}
    assert manifest["graphs"]["region_head"]["inputs"] == {"res4": ["batch", "res4_channels", "res4_height",
                                                                    "res4_width"], "rois": ["regions", 5]}
    assert manifest["model"]["embed_dim"] == tiny_rpn.embed_dim and manifest["opset"] >= 16
    for name, g in manifest["graphs"].items():
        assert (onnx_dir / g["file"]).is_file(), name
    with pytest.raises(ValueError, match="other weights"):
        make_backend(tiny_detector(5, rpn=True), "onnxruntime", onnx_dir)
    with pytest.raises(FileNotFoundError, match="regionclip export"):
        make_backend(tiny_rpn, "onnxruntime", tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend(tiny_rpn, "tensorrt", onnx_dir)
    with pytest.raises(ValueError, match="no int8 region head"):
        make_backend(tiny_rpn, "onnxruntime", onnx_dir, int8=True)
    assert make_backend(tiny_rpn, "torch") is tiny_rpn


@pytest.mark.parametrize("fmt,backend", [("onnx", "openvino"), ("openvino", "openvino"),
                                         ("torch-export", "torch-export")])
def test_other_backends_match_eager(fmt: str, backend: str, tiny_rpn: torch.nn.Module, onnx_dir: Path,
                                    images: list[Path], tmp_path: Path) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino", reason="pip install 'regionclip[openvino]'")
    out = onnx_dir if fmt == "onnx" else tmp_path
    if fmt != "onnx":  # the RPN graph is covered by the ONNX export (slow to convert): these use the torch RPN
        export_model(tiny_rpn, out, fmt=fmt, include_rpn=False)
    eager = Pipeline(tiny_rpn, INPUT)
    fast = Pipeline(make_backend(tiny_rpn, backend, out), INPUT)
    opts, vocab = tiny_options(chunk=5), tiny_vocab()
    prep = [eager.prepare(images[0]), eager.prepare(images[1])]
    feats = eager.features(prep, opts)
    boxes = [p.boxes for p in eager.proposals(prep, opts)]
    assert rel_err(fast.encode(feats, boxes, opts), eager.encode(feats, boxes, opts)) < EMB_RTOL
    for df, de in zip(fast.detect_prepared(prep, vocab, opts), eager.detect_prepared(prep, vocab, opts)):
        assert_same_detections(df, de)


def test_int8_region_head_is_quantised_and_close(tiny_rpn: torch.nn.Module, images: list[Path],
                                                 tmp_path: Path) -> None:
    import onnx

    from regionclip.export import calibration_pairs

    eager = Pipeline(tiny_rpn, INPUT)
    opts = tiny_options()
    prep = [eager.prepare(p) for p in images[1:]]
    res4 = [eager.features([p], opts) for p in prep]
    props = [eager.proposals([p], opts)[0].boxes for p in prep]
    manifest = export_model(tiny_rpn, tmp_path, fmt="onnx", int8=True,
                            calibration=calibration_pairs(res4, props, regions_per_call=16, max_calls=4))
    assert manifest["graphs"]["region_head_int8"]["quantization"] == "static-qdq-conv-percentile"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "region_head.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    q8 = make_backend(tiny_rpn, "onnxruntime", tmp_path, int8=True)
    fp = make_backend(tiny_rpn, "onnxruntime", tmp_path)
    emb_q, _ = q8.encode_regions(res4[0], [props[0]], chunk_size=256)
    emb_f, _ = fp.encode_regions(res4[0], [props[0]], chunk_size=256)
    assert not torch.equal(emb_q, emb_f)  # it really runs the quantised graph
    cos = torch.nn.functional.cosine_similarity(emb_q, emb_f)
    assert float(cos.min()) > 0.9, f"int8 embeddings too far from float32: min cosine {float(cos.min()):.3f}"


def test_region_clip_with_backend(tiny_rpn: torch.nn.Module, onnx_dir: Path, images: list[Path]) -> None:
    from _region_helpers import tiny_model

    model = tiny_model(0, rpn=True)
    model.set_vocabulary(["a", "b", "c"], torch.randn(3, 16, generator=torch.Generator().manual_seed(0)))
    fast = model.with_backend("onnxruntime", onnx_dir)
    assert fast.pipeline.model is not model.detector and fast.vocabulary is model.vocabulary
    for df, de in zip(fast.detect(images[:2]), model.detect(images[:2])):
        assert_same_detections(df, de)


@pytest.mark.slow
def test_rn50_cli_export_matches_eager(rn50_ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Full-size RN50 + R50-FPN RPN through `regionclip export` and the pipeline (100 proposals: CPU time)."""
    from regionclip.api import RegionCLIP
    from regionclip.assets import demo_image_paths
    from regionclip.cli.export import register, run
    from regionclip.config import PostprocessConfig
    from regionclip.pipeline import RunOptions
    from regionclip.text.vocabulary import Vocabulary

    import argparse
    parser = argparse.ArgumentParser()
    p = register(parser.add_subparsers())
    args = p.parse_args(["--weights", str(rn50_ckpts["regionclip"]), "--rpn-weights", str(rn50_ckpts["rpn"]),
                         "-o", str(tmp_path / "exp")])
    assert run(args) == 0
    model = RegionCLIP.from_pretrained(rn50_ckpts["regionclip"], rn50_ckpts["rpn"], regions="rpn")
    emb = torch.load(rn50_ckpts["concept_emb"], weights_only=True).float()
    vocab = Vocabulary.create(emb, embed_dim=model.detector.embed_dim)
    fast = model.with_backend("onnxruntime", tmp_path / "exp")
    opts = RunOptions(postprocess=PostprocessConfig(score_thresh=0.001, nms_thresh=0.5, detections_per_image=100,
                                                    rpn_score="raw"), max_proposals=100)
    prep = [model.pipeline.prepare(demo_image_paths()[0])]
    feats = model.pipeline.features(prep, opts)
    assert rel_err(fast.pipeline.features(prep, opts), feats) < EMB_RTOL
    regions = model.pipeline.proposals(prep, opts)
    fast_regions = fast.pipeline.proposals(prep, opts)
    torch.testing.assert_close(fast_regions[0].boxes, regions[0].boxes, atol=2e-2, rtol=0)
    boxes = [r.boxes for r in regions]
    assert rel_err(fast.pipeline.encode(feats, boxes, opts), model.pipeline.encode(feats, boxes, opts)) < EMB_RTOL
    assert_same_detections(fast.pipeline.detect_prepared(prep, vocab, opts, regions=regions)[0],
                           model.pipeline.detect_prepared(prep, vocab, opts, regions=regions)[0])


def test_detect_cli_with_onnxruntime_backend_equals_torch(tmp_path, demo_images):
    """`regionclip export` then `regionclip detect --backend onnxruntime --export-dir ...` gives the torch results
    (GT boxes; the same classes in the same order, scores within float rounding)."""
    import json

    from regionclip.cli.main import main
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pth")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({demo_images[0].name: [[100, 100, 900, 700], [1000, 200, 1500, 900]]}))
    emb = tmp_path / "emb.pth"
    torch.save(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), emb)
    assert main(["export", "--weights", str(ckpt), "--format", "onnx", "-o", str(tmp_path / "exp")]) == 0
    common = [str(demo_images[0]), "--weights", str(ckpt), "--boxes", str(boxes), "--preset", "coco-gt",
              "--concept-emb", str(emb), "--vocab", "a,b,c", "--score-thresh", "0", "--num-workers", "0", "--no-vis",
              "--quiet"]
    assert main(["detect", *common, "-o", str(tmp_path / "t")]) == 0
    assert main(["detect", *common, "--backend", "onnxruntime", "--export-dir", str(tmp_path / "exp"),
                 "-o", str(tmp_path / "o")]) == 0
    a = json.loads((tmp_path / "t" / "results.json").read_text())
    b = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(a) == len(b) > 0
    assert [r["category_id"] for r in a] == [r["category_id"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["bbox"] == pytest.approx(rb["bbox"], abs=1e-3) and ra["score"] == pytest.approx(rb["score"], abs=1e-5)
