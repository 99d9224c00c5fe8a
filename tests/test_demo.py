"""Web demo: input parsing, the request backend (cache, lock, errors), the CLI, and 8 concurrent HTTP requests.

The model is a tiny random detector (width-8 CLIP ResNet, tiny FPN RPN, 64-px inputs) with random per-name
embeddings, so every request takes well under a second on 2 CPU cores. The helpers here are also used by
``test_demo_browser.py``.
"""
from __future__ import annotations

import hashlib
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from _region_helpers import as_regionclip
from regionclip.api import RegionCLIP
from regionclip.config import ClipResNetConfig, DetectorConfig, InputConfig, RPNConfig
from regionclip.demo.app import (REGIONS_BOXES, REGIONS_RPN, VOCAB_COCO, VOCAB_CUSTOM, VOCAB_LVIS, DemoBackend,
                                 DemoInputError, boxes_from_strokes, editor_image_and_layers, parse_typed_boxes,
                                 resolve_vocabulary)
from regionclip.factory import build_detector

EMBED_DIM = 16


def tiny_model(with_rpn: bool = True) -> RegionCLIP:
    """A RegionCLIP around a tiny random detector (optionally with a tiny FPN RPN)."""
    torch.manual_seed(0)
    rpn = RPNConfig.fpn(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
                        fpn_out_channels=16, pre_nms_topk=100, post_nms_topk=50) if with_rpn else None
    cfg = DetectorConfig(
        clip=ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=EMBED_DIM, heads=2, image_resolution=64),
        rpn=rpn, input=InputConfig(min_size=64, max_size=128))
    return as_regionclip(build_detector(cfg).eval(), cfg.input, cfg=cfg)


def name_embeddings(names: Sequence[str]) -> torch.Tensor:
    """Random embeddings, one per name, seeded by the name (the same name always gets the same row)."""
    rows = []
    for n in names:
        g = torch.Generator().manual_seed(int(hashlib.sha256(n.encode("utf-8")).hexdigest()[:12], 16))
        rows.append(torch.randn(EMBED_DIM, generator=g))
    return torch.stack(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_image() -> Path:
    from regionclip.assets import demo_image_paths

    return demo_image_paths()[0]


@pytest.fixture(scope="module")
def model() -> RegionCLIP:
    return tiny_model()


# ---------------------------------------------------------------------------------------------- parsing
def test_resolve_vocabulary_custom_builtin_and_empty() -> None:
    names, ids, label = resolve_vocabulary(VOCAB_CUSTOM, " car, dog ,car\ntraffic cone,, ")
    assert names == ["car", "dog", "traffic cone"]  # stripped, de-duplicated, newline also separates
    assert ids == [1, 2, 3] and "3" in label
    coco, coco_ids, _ = resolve_vocabulary(VOCAB_COCO, "")
    assert len(coco) == 65 and coco_ids[0] == 1 and len(set(coco_ids)) == 65
    lvis, lvis_ids, _ = resolve_vocabulary(VOCAB_LVIS, "ignored")
    assert len(lvis) == 1203 and lvis_ids[:2] == [1, 2]
    with pytest.raises(DemoInputError, match="vocabulary is empty"):
        resolve_vocabulary(VOCAB_CUSTOM, " , \n ")


def test_parse_typed_boxes() -> None:
    assert parse_typed_boxes("10,20,30,40; [5 5 50 60]\n", 100, 50) == [[10, 20, 30, 40], [5, 5, 50, 50]]
    assert parse_typed_boxes("  ", 100, 100) == []
    with pytest.raises(DemoInputError, match="Box 2"):
        parse_typed_boxes("1,2,3,4\n1,2,3", 100, 100)
    with pytest.raises(DemoInputError, match="no area"):
        parse_typed_boxes("50,50,40,60", 100, 100)
    with pytest.raises(DemoInputError, match="not 4 numbers"):
        parse_typed_boxes("a,b,c,d", 100, 100)


def test_boxes_from_strokes_one_box_per_stroke_scaled_to_image() -> None:
    layer = np.zeros((100, 200, 4), dtype=np.uint8)
    layer[10:12, 20:80, 3] = 255  # outline of a rectangle: 4 thin strokes that touch -> one component
    layer[40:42, 20:80, 3] = 255
    layer[10:42, 20:22, 3] = 255
    layer[10:42, 78:80, 3] = 255
    layer[70:90, 150:190, 3] = 255  # a filled scribble elsewhere
    boxes = boxes_from_strokes([layer], 400, 200)  # image twice the canvas size
    assert len(boxes) == 2
    assert np.allclose(sorted(boxes), [[40, 20, 160, 84], [300, 140, 380, 180]], atol=2)
    assert boxes_from_strokes([np.zeros((10, 10, 4), np.uint8)], 10, 10) == []
    assert boxes_from_strokes([], 10, 10) == []


def test_editor_value_and_bad_image(tmp_path: Path) -> None:
    img, layers = editor_image_and_layers({"background": str(demo_image()), "layers": [], "composite": None})
    assert img is not None and img.mode == "RGB" and img.size == (1920, 1080) and layers == []
    assert editor_image_and_layers(None) == (None, [])
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DemoInputError, match="Could not read the image"):
        editor_image_and_layers({"background": str(bad), "layers": []})


# ---------------------------------------------------------------------------------------------- backend
def test_backend_box_mode_results_json_and_cache(model: RegionCLIP, tmp_path: Path) -> None:
    calls: list[tuple[str, ...]] = []

    def embed(names: Sequence[str]) -> torch.Tensor:
        calls.append(tuple(names))
        return name_embeddings(names)

    be = DemoBackend(model, embed, output_dir=tmp_path)
    img = Image.open(demo_image()).convert("RGB")
    boxes = [[100.0, 80.0, 700.0, 500.0], [900.0, 100.0, 1300.0, 600.0]]
    res = be.run(img, VOCAB_CUSTOM, "plant, sink, bottle", REGIONS_BOXES, boxes, 0.0, 10)
    assert res.annotated.size == img.size
    assert 1 <= len(res.rows) <= 10 and all(r[0] in {"plant", "sink", "bottle"} for r in res.rows)
    # every detection is one of the user's boxes (GT mode never moves boxes)
    assert all(any(np.allclose(r[2:], b, atol=0.1) for b in boxes) for r in res.rows)
    data = json.loads(res.json_path.read_text())
    assert [c["name"] for c in data["categories"]] == ["plant", "sink", "bottle"]
    assert len(data["annotations"]) == len(res.rows)
    a = data["annotations"][0]
    assert a["category_name"] == res.rows[0][0] and len(a["bbox"]) == 4 and len(a["bbox_xyxy"]) == 4
    assert "computed" in res.status
    res2 = be.run(img, VOCAB_CUSTOM, "plant, sink, bottle", REGIONS_BOXES, boxes, 0.0, 1)
    assert calls == [("plant", "sink", "bottle")], "second request with the same vocabulary must hit the cache"
    assert "cached" in res2.status and len(res2.rows) == 1
    # the per-request threshold really filters: nothing scores above 1
    assert be.run(img, VOCAB_CUSTOM, "plant, sink, bottle", REGIONS_BOXES, boxes, 1.0, 10).rows == []


def test_backend_rpn_mode_and_user_errors(model: RegionCLIP, tmp_path: Path) -> None:
    be = DemoBackend(model, name_embeddings, output_dir=tmp_path)
    img = Image.open(demo_image()).convert("RGB")
    res = be.run(img, VOCAB_COCO, "", REGIONS_RPN, None, 0.0, 7)
    assert 0 < len(res.rows) <= 7 and "RPN" in res.status
    with pytest.raises(DemoInputError, match="No boxes"):
        be.run(img, VOCAB_CUSTOM, "cat", REGIONS_BOXES, [], 0.0, 7)
    with pytest.raises(DemoInputError, match="at least 8"):
        be.run(Image.new("RGB", (4, 4)), VOCAB_CUSTOM, "cat", REGIONS_RPN, None, 0.0, 7)
    no_rpn = DemoBackend(tiny_model(with_rpn=False), name_embeddings, output_dir=tmp_path)
    with pytest.raises(DemoInputError, match="no region proposal network"):
        no_rpn.run(img, VOCAB_CUSTOM, "cat", REGIONS_RPN, None, 0.0, 7)


def test_backend_needs_embed_fn_without_checkpoint(model: RegionCLIP) -> None:
    with pytest.raises(ValueError, match="embed_fn"):
        DemoBackend(model)


def test_backend_concurrent_requests_never_mix_vocabularies(model: RegionCLIP, tmp_path: Path) -> None:
    """8 threads, 4 vocabularies: each result must be labelled with its own request's classes only."""
    be = DemoBackend(model, name_embeddings, output_dir=tmp_path, cache_size=2)  # small cache: evictions too
    img = Image.open(demo_image()).convert("RGB")
    vocabs = [f"a{i}, b{i}, c{i}" for i in range(4)] * 2
    boxes = [[0.0, 0.0, 960.0, 540.0], [960.0, 540.0, 1920.0, 1080.0], [400.0, 200.0, 1500.0, 900.0]]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda v: be.run(img, VOCAB_CUSTOM, v, REGIONS_BOXES, boxes, 0.0, 10), vocabs))
    for v, r in zip(vocabs, results):
        own = {n.strip() for n in v.split(",")}
        assert r.rows and {row[0] for row in r.rows} <= own
        assert r.detections.class_names == [n.strip() for n in v.split(",")]


# ---------------------------------------------------------------------------------------------- gradio app + HTTP
@pytest.fixture(scope="module")
def served_demo(model: RegionCLIP) -> Iterator[tuple[str, object]]:
    """The gradio app on a free local port, in this process (background server thread)."""
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'regionclip[demo]')")
    from regionclip.demo import build_demo, launch_demo

    demo = build_demo(model, name_embeddings)
    url = launch_demo(demo, port=free_port(), block=False, quiet=True)
    try:
        yield url, demo
    finally:
        demo.close()


def _client(url: str):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(url, verbose=False), gradio_client.handle_file


def test_http_eight_concurrent_requests_all_complete(served_demo: tuple[str, object]) -> None:
    url, demo = served_demo
    client, handle_file = _client(url)
    editor = {"background": handle_file(str(demo_image())), "layers": [], "composite": None}
    vocabs = [f"thing{i}, other{i}" for i in range(8)]
    jobs = [client.submit(editor, VOCAB_CUSTOM, v, REGIONS_RPN, "", 0.0, 5, api_name="/detect") for v in vocabs]
    outputs = [j.result(timeout=300) for j in jobs]
    assert len(outputs) == 8
    for v, (annotated, table, json_path, status) in zip(vocabs, outputs):
        assert Path(annotated).is_file() and Image.open(annotated).size == (1920, 1080)
        rows = table["data"]
        assert 0 < len(rows) <= 5 and {r[0] for r in rows} <= {n.strip() for n in v.split(",")}
        assert json.loads(Path(json_path).read_text())["categories"][0]["name"] == v.split(",")[0]
        assert "detection" in status
    assert demo.regionclip_backend.embed_calls >= 8  # 8 distinct vocabularies, each embedded (cache size 8)


def test_http_errors_are_messages_and_app_survives(served_demo: tuple[str, object]) -> None:
    url, _ = served_demo
    client, handle_file = _client(url)
    editor = {"background": handle_file(str(demo_image())), "layers": [], "composite": None}
    with pytest.raises(Exception, match="vocabulary is empty"):
        client.predict(editor, VOCAB_CUSTOM, " , ", REGIONS_RPN, "", 0.0, 5, api_name="/detect")
    with pytest.raises(Exception, match="not 4 numbers"):
        client.predict(editor, VOCAB_CUSTOM, "cat", REGIONS_BOXES, "1,2,3", 0.0, 5, api_name="/detect")
    # the app is still alive and answers the next request
    out = client.predict(editor, VOCAB_CUSTOM, "cat", REGIONS_BOXES, "10,10,500,400", 0.0, 5, api_name="/detect")
    assert [r[0] for r in out[1]["data"]] == ["cat"]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_demo_registered_and_parses() -> None:
    from regionclip.cli.main import build_parser

    args = build_parser().parse_args(["demo", "--weights", "w.pth", "--port", "7999", "--host", "0.0.0.0"])
    assert args.command == "demo" and args.port == 7999 and args.host == "0.0.0.0" and args.weights == "w.pth"


def test_cli_demo_missing_weights_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gradio")
    from regionclip.cli.main import main

    rc = main(["demo", "--weights", str(tmp_path / "missing.pth"), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pth" in err and "Traceback" not in err


def test_missing_gradio_gives_install_hint(model: RegionCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extra, building the page says how to install it; the backend itself works without gradio."""
    import sys

    from regionclip.demo import build_demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(ImportError, match=r"regionclip\[demo\]"):
        build_demo(model, name_embeddings)
    be = DemoBackend(model, name_embeddings)
    img = Image.open(demo_image()).convert("RGB")
    assert be.run(img, VOCAB_CUSTOM, "cat", REGIONS_BOXES, [[0.0, 0.0, 50.0, 50.0]], 0.0, 5).rows[0][0] == "cat"
