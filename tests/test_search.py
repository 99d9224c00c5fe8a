"""Region search: index a real (tiny) extract-regions store with both back-ends, query by embedding / image region /
text, incremental adds, crash safety, width checks, the CLI (table, JSON, HTML) and the demo tab's search."""
from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _region_helpers import random_boxes, write_images
from regionclip.engine.extract import RegionStore, load_regions
from regionclip.search import FaissOptions, RegionIndex
from regionclip.search.html import contact_sheet

SIZES = [(90, 140), (120, 80), (96, 96), (64, 96), (90, 140)]
BACKENDS = ["exact", pytest.param("faiss", marks=pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss-cpu not installed (pip install 'regionclip[search]')"))]


META = {"format": "regionclip-regions/1", "model": "tiny-random#0123456789abcdef", "embed_dim": 16,
        "extract": {"regions": "boxes"}}


def make_store(root: Path, n_images: int = len(SIZES), seed: int = 7) -> Path:
    """A feature store of the first ``n_images`` images in ``root/feats``, written with extract-regions' own
    writer (2 images per shard; random features, real PNG images for the crops). Re-running with more images
    resumes into new shards, as extract-regions does."""
    paths = write_images(root / "imgs", SIZES, seed=seed)
    with RegionStore(root / "feats", META, shard_images=2) as st:
        for i, (p, (h, w)) in enumerate(zip(paths[:n_images], SIZES)):
            if p.name in st.done:
                continue
            g = torch.Generator().manual_seed(seed * 1000 + i)  # per image: a resumed run adds the same data
            boxes = random_boxes(3 + i, h, w, seed=i)
            st.add({"key": p.name, "file_name": str(p), "width": w, "height": h},
                   {"boxes": boxes, "feats": torch.randn(len(boxes), 16, generator=g) * 5,
                    "objectness": torch.randn(len(boxes), generator=g)})
    return root / "feats"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("search"))


def _regions(feats: Path) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(image key, row within the image, feat [D], box [4]) of every region of the store."""
    return [(k, i, rec["feats"][i], rec["boxes"][i]) for k, rec in sorted(load_regions(feats).items())
            for i in range(len(rec["boxes"]))]


def _cli(argv: list[str]) -> int:
    """Run `regionclip index|search` through their own register/run (independent of main.py's list)."""
    parser = argparse.ArgumentParser(prog="regionclip")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("index", "search"):
        mod = importlib.import_module(f"regionclip.cli.{name}")
        mod.register(sub).set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_own_embedding_returns_that_region_first(tmp_path, store, backend) -> None:
    feats = store
    idx = RegionIndex.build(feats, tmp_path / "idx", backend=backend)
    regions = _regions(feats)
    assert idx.num_regions == len(regions) and idx.embed_dim == 16
    for key, _, feat, box in regions[::3]:
        hits = RegionIndex.open(tmp_path / "idx").search(feat * 7.0, top_k=5)  # raw (unnormalised) query
        assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0].key == key and hits[0].score == pytest.approx(1.0, abs=2e-3)
        assert hits[0].box == pytest.approx(tuple(box.tolist()))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert hits[0].path is not None and Path(hits[0].path).is_file()


def test_faiss_ivf_with_all_lists_probed_equals_exact(tmp_path, store) -> None:
    pytest.importorskip("faiss")
    feats = store
    exact = RegionIndex.build(feats, tmp_path / "exact", backend="exact", dtype="float32")
    ivf = RegionIndex.build(feats, tmp_path / "ivf", backend="faiss",
                            faiss_options=FaissOptions(ivf_min_rows=1, nlist=2, nprobe=2, train_points_per_list=8))
    assert ivf.manifest["segments"][0]["backend"]["kind"] == "ivf"
    q = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    for a, b in zip(exact.search_batch(q, 10), ivf.search_batch(q, 10)):
        assert [(h.shard, h.row) for h in a] == [(h.shard, h.row) for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=2e-3)  # SQfp16 storage


def test_incremental_add_indexes_only_new_shards(tmp_path) -> None:
    feats = make_store(tmp_path, n_images=3)  # shards 0 (2 images) and 1 (1 image)
    idx = RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    first = tmp_path / "idx" / "segments" / "seg-00000"
    stamp = (first / "vectors.npy").stat().st_mtime_ns
    assert idx.indexed_shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    make_store(tmp_path, n_images=5)  # resumes: the 2 new images go into a new shard
    reopened = RegionIndex.open(tmp_path / "idx")
    added = reopened.add_shards()
    total = sum(len(r["boxes"]) for r in load_regions(feats).values())
    assert reopened.num_regions == total and added == total - idx.num_regions
    assert len(reopened.manifest["segments"]) == 2 and (first / "vectors.npy").stat().st_mtime_ns == stamp
    assert RegionIndex.build(feats, tmp_path / "idx", backend="exact").num_regions == total  # nothing new: no-op
    assert len(RegionIndex.open(tmp_path / "idx").manifest["segments"]) == 2
    # two segments answer exactly like one fresh index over everything
    full = RegionIndex.build(feats, tmp_path / "full", backend="exact")
    q = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    for a, b in zip(reopened.search_batch(q, 8), full.search_batch(q, 8)):
        assert [(h.shard, h.row, h.key) for h in a] == [(h.shard, h.row, h.key) for h in b]


def test_interrupted_build_leaves_previous_index_and_is_cleaned_up(tmp_path, monkeypatch) -> None:
    import regionclip.search.index as index_mod

    feats = make_store(tmp_path, n_images=3)
    RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    before = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    make_store(tmp_path, n_images=5)

    def killed(*a, **k):  # the segment's vectors are half written when the "kill" arrives
        tmp = a[0]
        tmp.mkdir(parents=True)
        (tmp / "vectors.npy").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(index_mod, "_write_segment", killed)
    with pytest.raises(KeyboardInterrupt):
        RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    monkeypatch.undo()
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text()) == before
    assert [d.name for d in (tmp_path / "idx" / "segments").iterdir()] == ["seg-00000"]
    # a SIGKILL between the segment rename and the manifest write leaves an unlisted segment: ignored, then removed
    (tmp_path / "idx" / "segments" / "seg-00001").mkdir()
    (tmp_path / "idx" / "segments" / ".seg-00002.tmp-99").mkdir()
    assert RegionIndex.open(tmp_path / "idx").num_regions == sum(s["num_regions"] for s in before["segments"])
    idx = RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    assert idx.num_regions == sum(len(r["boxes"]) for r in load_regions(feats).values())
    assert sorted(d.name for d in (tmp_path / "idx" / "segments").iterdir()) == ["seg-00000", "seg-00001"]


def test_width_mismatch_and_stale_or_foreign_store_are_refused(tmp_path, store) -> None:
    feats = store
    idx = RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    with pytest.raises(ValueError, match=r"width 24 but the regions .* are 16-d"):
        idx.search(torch.randn(24))
    with pytest.raises(ValueError, match="zero"):
        idx.search(torch.zeros(16))
    with pytest.raises(ValueError, match="back-end 'exact'.*--rebuild"):
        RegionIndex.build(feats, tmp_path / "idx", backend="faiss")
    torch.save(torch.randn(24), tmp_path / "q24.pt")
    with pytest.raises(ValueError, match="width 24"):
        _cli(["search", str(tmp_path / "idx"), "--query-embedding", str(tmp_path / "q24.pt")])
    # a shard extracted with other settings (here: another checkpoint) cannot be mixed into the index
    import shutil

    mixed = tmp_path / "mixedstore"
    shutil.copytree(feats, mixed)
    RegionIndex.build(mixed, tmp_path / "idx2", backend="exact")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(mixed / "shards" / "shard-00000.safetensors"), framework="pt") as sf:
        header = json.loads(sf.metadata()["regionclip"])
        tensors = {k: sf.get_tensor(k) * 2 for k in sf.keys()}
    header["meta"]["model"] = "another-checkpoint"
    save_file(tensors, str(mixed / "shards" / "shard-00099.safetensors"), metadata={"regionclip": json.dumps(header)})
    with pytest.raises(ValueError, match="other settings or another checkpoint"):
        RegionIndex.build(mixed, tmp_path / "idx2", backend="exact")
    (mixed / "shards" / "shard-00099.safetensors").unlink()
    header["meta"]["model"] = META["model"]
    save_file(tensors, str(mixed / "shards" / "shard-00000.safetensors"), metadata={"regionclip": json.dumps(header)})
    with pytest.raises(ValueError, match="changed since it was indexed.*--rebuild"):
        RegionIndex.build(mixed, tmp_path / "idx2", backend="exact")
    assert RegionIndex.build(mixed, tmp_path / "idx2", backend="exact", rebuild=True).num_regions == idx.num_regions


def test_image_region_query_finds_that_region(tmp_path) -> None:
    """With a real (tiny random) model: regions embedded by the RoI head (test_extract checks extract-regions'
    feats equal ``RegionPredictor.encode_boxes``), indexed, then queried with an image + box."""
    from _region_helpers import tiny_model
    from regionclip.predictor import RegionPredictor
    from regionclip.search.query import embed_image_region

    model = tiny_model(seed=3)  # a RegionCLIP around a tiny random detector (no weights file)
    paths = write_images(tmp_path / "imgs", SIZES[:3], seed=3)
    with RegionStore(tmp_path / "feats", {**META, "model": "tiny"}) as st:
        for i, (p, (h, w)) in enumerate(zip(paths, SIZES)):
            boxes = random_boxes(4, h, w, seed=i)
            feats = RegionPredictor(model).set_image(str(p)).encode_boxes(boxes)
            st.add({"key": p.name, "file_name": str(p), "width": w, "height": h}, {"boxes": boxes, "feats": feats})
    idx = RegionIndex.build(tmp_path / "feats", tmp_path / "idx", backend="exact", dtype="float32")
    key, i, feat, box = _regions(tmp_path / "feats")[5]
    q = embed_image_region(model, str(tmp_path / "imgs" / key), box.tolist())
    torch.testing.assert_close(q, torch.nn.functional.normalize(feat, dim=0), rtol=1e-4, atol=1e-5)
    # a tiny random model's region embeddings are nearly parallel (cosines > 0.99999: its ReLU features share a
    # big mean component), so the region is found among the hits at cosine 1 up to float32 rounding; which of
    # those ranks first is decided by rounding (retrieval order itself is tested with distinct vectors above)
    hits = idx.search(q, 12)
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    at_one = [(h.key, h.box) for h in hits if h.score > 1 - 1e-5]
    assert (key, pytest.approx(tuple(box.tolist()))) in at_one


def test_cli_index_and_search_table_json_html_text_query(tmp_path, store, monkeypatch, capsys) -> None:
    import regionclip.search.query as query_mod

    feats = store
    assert _cli(["index", str(feats), "-o", str(tmp_path / "idx"), "--backend", "exact", "--quiet"]) == 0
    assert re.search(r"\d+ regions added", capsys.readouterr().out)
    key, i, feat, box = _regions(feats)[6]

    class TextModel:  # stands in for RegionCLIP: the text "that region" embeds to that region's feature
        weights_path = None

        def embed_names(self, names):
            assert names == ["that region"]
            return feat[None] * 3.0

    monkeypatch.setattr(query_mod, "load_model", lambda weights, device="cpu", **k: TextModel())
    out_json, out_html = tmp_path / "hits.json", tmp_path / "sheet.html"
    assert _cli(["search", str(tmp_path / "idx"), "that region", "--weights", "x.pth", "--top-k", "4",
                 "--json", str(out_json), "--html", str(out_html)]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^\s+1\s+1\.0000\s+\S+\s+.*{re.escape(key)}", printed, re.M), printed
    data = json.loads(out_json.read_text())
    assert data["query"] == "that region" and len(data["hits"]) == 4 and data["hits"][0]["key"] == key
    page = out_html.read_text()
    assert page.count('class="card"') == 4 and page.count("data:image/jpeg;base64,") == 4
    with pytest.raises(ValueError, match="exactly one query"):
        _cli(["search", str(tmp_path / "idx")])


def test_contact_sheet_marks_missing_images(tmp_path, store) -> None:
    feats = store
    idx = RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    hits = idx.search(torch.randn(16), 3)
    moved = [h.__class__(**{**h.to_dict(), "path": None, "file_name": "gone/" + h.key}) for h in hits]
    page = contact_sheet(moved, tmp_path / "s.html").read_text()
    assert page.count("image not found") == 3 and page.count('class="card"') == 3
    # with --image-root the images are found again by file name
    page = contact_sheet(moved, tmp_path / "s2.html", image_root=feats.parent / "imgs").read_text()
    assert page.count("data:image/jpeg;base64,") == 3


def test_demo_tab_search_gallery(tmp_path, store) -> None:
    from regionclip.search.demo_tab import build_search_tab, search_gallery

    feats = store
    idx = RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    key, i, feat, box = _regions(feats)[2]
    items, status = search_gallery(idx, lambda names: feat[None].repeat(len(names), 1), "x", 5)
    assert len(items) == 5 and items[0][1].startswith("#1 1.000") and key in items[0][1]
    assert items[0][0].size[0] > 0 and "5 best of" in status
    with pytest.raises(ValueError, match="type what to search"):
        search_gallery(idx, lambda names: feat[None], "  ", 5)
    gr = pytest.importorskip("gradio")
    with gr.Blocks() as demo, gr.Tab("Search"):
        build_search_tab(idx, lambda names: feat[None])
    assert any(getattr(b, "elem_id", None) == "rc-search-gallery" for b in demo.blocks.values())
