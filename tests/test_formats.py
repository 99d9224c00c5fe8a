"""regionclip.formats: COCO results, the resumable journal, output formats, adapters, user boxes (no model)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regionclip.formats import (BadBoxesError, BoxesFileError, CsvWriter, JournalError, ResultsError, ResultsWriter,
                                coco_to_detections, detections_to_coco, export_journal, from_hf,
                                from_supervision, match_boxes, merge_journals, read_boxes_file, read_csv,
                                read_journal, read_jsonl, read_yolo, to_hf, to_supervision, validate_user_boxes,
                                write_csv, write_jsonl, write_results, write_yolo)
from regionclip.structures import Detections

NAMES = ["cat", "dog", "traffic cone"]


def make_det(n: int = 4, hw: tuple[int, int] = (40, 60), *, masks: bool = False, seed: int = 0,
             image_id=None, file_name=None) -> Detections:
    """Random valid detections: boxes inside the image with fractional float32 coordinates."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 1 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
    boxes = torch.cat([xy, xy + wh], 1).float()
    scores = torch.rand(n, generator=g).float()
    labels = torch.randint(0, len(NAMES), (n,), generator=g)
    m = None
    if masks:
        m = torch.zeros(n, h, w, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            m[i, y1:y2, x1:x2] = True
    return Detections(boxes, scores, labels, hw, NAMES, masks=m, image_id=image_id, file_name=file_name)


def assert_same(a: Detections, b: Detections, atol: float = 0.0, score_atol: float = 0.0) -> None:
    """Equal up to order (both sorted by score descending)."""
    ia, ib = a.scores.argsort(descending=True, stable=True), b.scores.argsort(descending=True, stable=True)
    torch.testing.assert_close(b.boxes[ib], a.boxes[ia], atol=atol, rtol=0)
    torch.testing.assert_close(b.scores[ib], a.scores[ia], atol=score_atol, rtol=0)
    assert b.labels[ib].tolist() == a.labels[ia].tolist()
    assert [b.names[i] for i in ib] == [a.names[i] for i in ia]
    if a.masks is not None:
        assert torch.equal(b.masks[ib], a.masks[ia])


# ---- COCO results -----------------------------------------------------------------------------------------------

def test_detections_to_coco_fields_order_and_ids() -> None:
    det = make_det(5)
    res = detections_to_coco(det, 7, category_ids=[3, 9, 11])
    assert [r["score"] for r in res] == sorted(det.scores.tolist(), reverse=True)
    for r in res:
        i = det.scores.tolist().index(r["score"])
        x1, y1, x2, y2 = det.boxes[i].tolist()
        assert r["bbox"] == [x1, y1, x2 - x1, y2 - y1]
        assert r["image_id"] == 7 and r["category_id"] == [3, 9, 11][int(det.labels[i])]
        assert "segmentation" not in r
    default = detections_to_coco(det, 7)
    assert [r["category_id"] for r in default] == [[3, 9, 11].index(r["category_id"]) + 1 for r in res]  # label+1
    with pytest.raises(ResultsError, match="vocabulary"):
        detections_to_coco(det, 7, category_ids=[3])


def test_coco_rle_masks_round_trip() -> None:
    mask_util = pytest.importorskip("pycocotools.mask")
    det = make_det(3, masks=True)
    res = detections_to_coco(det, 1)
    json.dumps(res)  # counts are ASCII strings
    for r in res:
        i = det.scores.tolist().index(r["score"])
        assert np.array_equal(mask_util.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}),
                              det.masks[i].numpy().astype(np.uint8))
    back = coco_to_detections(res, det.image_size, NAMES, None)
    assert_same(det, back, atol=1e-5)


# ---- journal / ResultsWriter -------------------------------------------------------------------------------------

def _run(out: Path, keys: list[str], *, settings=None, resume=True, stop_after=None, **kw) -> ResultsWriter:
    w = ResultsWriter(out, NAMES, [3, 9, 11], settings=settings or {"score_thresh": 0.05}, resume=resume, **kw)
    for n, k in enumerate(k for k in keys if k not in w.done):
        if stop_after is not None and n == stop_after:
            break
        w.add(k, make_det(3, seed=int(k[3:])), image_id=int(k[3:]) + 1, file_name=f"/data/{k}.jpg")
    return w


def test_writer_resume_after_partial_line_and_final_files(tmp_path: Path, caplog) -> None:
    keys = [f"img{i}" for i in range(5)]
    out = tmp_path / "out"
    _run(out, keys, stop_after=3).close()
    journal = out / "predictions.jsonl"
    with open(journal, "a") as f:  # a kill in the middle of writing the 4th image
        f.write('{"key": "img3", "image_id": 4, "inst')
    w = _run(out, keys, stop_after=0)
    assert w.done == {"img0", "img1", "img2"} and "partial last line" in caplog.text
    assert journal.read_text().endswith("\n")  # the partial line was cut off
    w.close()
    w = _run(out, keys)
    results = w.finalize(order=list(reversed(keys)))
    expected = [r for k in reversed(keys) for r in detections_to_coco(make_det(3, seed=int(k[3:])), int(k[3:]) + 1,
                                                                      [3, 9, 11])]
    assert results == expected == json.loads((out / "results.json").read_text())
    images = json.loads((out / "images.json").read_text())
    assert [im["id"] for im in images["images"]] == [5, 4, 3, 2, 1]
    assert images["images"][0] == {"id": 5, "file_name": "/data/img4.jpg", "height": 40, "width": 60}
    assert images["categories"] == [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"},
                                    {"id": 11, "name": "traffic cone"}]
    assert sum(1 for ln in journal.read_text().splitlines()) == 1 + 5


def test_writer_refuses_other_settings_and_corrupt_lines(tmp_path: Path) -> None:
    _run(tmp_path, ["img0", "img1"]).close()
    with pytest.raises(JournalError, match=r"other settings or input files \(score_thresh: 0.05 in the journal, "
                                           r"0.5 now\).*--overwrite"):
        _run(tmp_path, ["img0"], settings={"score_thresh": 0.5})
    with pytest.raises(JournalError, match="categories"):  # the vocabulary is part of the fingerprint
        ResultsWriter(tmp_path, NAMES[:2], [3, 9], settings={"score_thresh": 0.05})
    # --no-resume starts over
    assert _run(tmp_path, ["img0"], resume=False, stop_after=0).done == set()
    _run(tmp_path, ["img0", "img1"], resume=False).close()
    p = tmp_path / "predictions.jsonl"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    with pytest.raises(JournalError, match="line 2 is corrupt"):
        _run(tmp_path, ["img0"])
    p.write_text('{"key": "x"}\n')
    with pytest.raises(JournalError, match="not a regionclip results journal"):
        _run(tmp_path, ["img0"])


def test_errors_are_retried_and_duplicates_never_doubled(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path, NAMES, settings={})
    w.add("a", make_det(2, seed=1), image_id=1)
    w.add_error("b", "cannot read b.jpg", file_name="b.jpg")
    with pytest.raises(ResultsError, match="already recorded"):
        w.add("a", make_det(2, seed=1), image_id=1)
    with pytest.raises(ResultsError, match="label 3 but the vocabulary has 3 classes"):
        w.add("c", Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([3]), (9, 9)), image_id=3)
    with pytest.raises(ResultsError, match="both have image_id 1"):
        w.add("c", make_det(2, seed=1), image_id=1)
    w.close()
    w = ResultsWriter(tmp_path, NAMES, settings={})
    assert w.done == {"a"} and w.errors == {"b": "cannot read b.jpg"}
    w.add("b", make_det(1, seed=2), image_id=2)
    w.close()
    # append an older duplicate of "a" by hand: the last result line wins, an error never replaces a result
    p = tmp_path / "predictions.jsonl"
    newer_a = json.loads(p.read_text().splitlines()[1])
    newer_a["instances"] = newer_a["instances"][:1]
    with open(p, "a") as f:
        f.write(json.dumps(newer_a) + "\n" + json.dumps({"key": "b", "error": "late"}) + "\n")
    j = read_journal(p)
    assert j.entries["a"].instances == newer_a["instances"] and "b" in j.entries and not j.errors
    results = write_results(j, tmp_path, order=["a", "b"])
    assert len(results) == 2 and [r["image_id"] for r in results] == [1, 2]


def test_merge_journals_equals_single_run(tmp_path: Path) -> None:
    keys = [f"img{i}" for i in range(6)]
    single = _run(tmp_path / "single", keys).finalize(order=keys)
    shards = []
    for r in range(2):  # interleaved shards, each process with its own journal, processed in another order
        name = f"predictions.rank{r}.jsonl"
        _run(tmp_path / "sharded", list(reversed(keys[r::2])), journal_name=name).close()
        shards.append(tmp_path / "sharded" / name)
    j = merge_journals(shards)
    merged = write_results(j, tmp_path / "sharded", order=keys)
    assert merged == single
    assert (tmp_path / "sharded" / "images.json").read_text() == (tmp_path / "single" / "images.json").read_text()
    assert write_results(merge_journals(shards[::-1]), tmp_path / "m2") == write_results(j, tmp_path / "m3")
    _run(tmp_path / "other", keys[:1], settings={"score_thresh": 0.3}).close()
    with pytest.raises(JournalError, match="other settings"):
        merge_journals([shards[0], tmp_path / "other" / "predictions.jsonl"])


def test_every_finished_image_is_on_disk_before_close(tmp_path: Path) -> None:
    # What a kill leaves is what was flushed to the OS: read the journal while the writer is still open (never
    # closed, as in a killed process). fsync (power loss) cannot be tested here.
    w = ResultsWriter(tmp_path, NAMES, settings={})
    for i in range(4):
        w.add(f"k{i}", make_det(2, seed=i), image_id=i)
        assert set(read_journal(tmp_path / "predictions.jsonl").entries) == {f"k{j}" for j in range(i + 1)}
    w.close()


# ---- output formats ---------------------------------------------------------------------------------------------

def _dets() -> list[Detections]:
    return [make_det(4, (40, 60), seed=1, image_id=1, file_name="a/one.jpg"),
            make_det(0, (30, 20), seed=2, image_id=2, file_name="a/empty.png"),
            make_det(5, (50, 70), seed=3, image_id=3, file_name="b/three.jpg")]


def test_jsonl_round_trip_with_masks(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    dets = _dets()[:2] + [make_det(3, (32, 48), masks=True, seed=4, image_id=4, file_name="m.jpg")]
    path = write_jsonl([(d.file_name, d) for d in dets], tmp_path / "d.jsonl")
    back = read_jsonl(path, NAMES)
    assert [k for k, _ in back] == [d.file_name for d in dets]
    for d, (_, b) in zip(dets, back):
        assert_same(d, b)  # exact: shortest float32 decimals read back as the same float32
        assert (b.image_size, b.image_id, b.file_name) == (d.image_size, d.image_id, d.file_name)
    assert back[2][1].masks is not None and back[0][1].masks is None


def test_csv_round_trip(tmp_path: Path) -> None:
    dets = _dets()
    path = write_csv(dets, tmp_path / "d.csv")
    header = path.read_text().splitlines()[0]
    assert header == "file_name,image_id,x1,y1,x2,y2,score,label,name"
    back = dict(read_csv(path, image_sizes={d.file_name: d.image_size for d in dets}))
    assert sorted(back) == ["a/one.jpg", "b/three.jpg"]  # an image without detections has no row
    for d in (dets[0], dets[2]):
        assert_same(d, back[d.file_name])
        assert back[d.file_name].image_id == d.image_id and back[d.file_name].image_size == d.image_size
    assert back["a/one.jpg"].class_names == NAMES[:max(d.labels.max() for d in (dets[0], dets[2])) + 1]


@pytest.mark.parametrize("with_scores", [False, True])
def test_yolo_round_trip(tmp_path: Path, with_scores: bool) -> None:
    dets = _dets()
    labels = write_yolo(dets, tmp_path, NAMES, with_scores=with_scores)
    assert (tmp_path / "classes.txt").read_text().splitlines() == NAMES
    assert (labels / "empty.txt").read_text() == ""
    row = (labels / "one.txt").read_text().splitlines()[0].split()
    assert len(row) == (6 if with_scores else 5) and all(0.0 <= float(v) <= 1.0 for v in row[1:5])
    back = read_yolo(tmp_path, {Path(d.file_name).name: d.image_size for d in dets})
    for d in dets:
        b = back[Path(d.file_name).stem]
        # 6 decimals of a normalised coordinate: at most 0.5e-6 * side per value, two values per coordinate
        tol = 1e-6 * max(d.image_size) + 1e-5
        if with_scores:
            assert_same(d, b, atol=tol, score_atol=1e-6)
        else:  # no scores in the file: compare in the writer's (input) order
            torch.testing.assert_close(b.boxes, d.boxes, atol=tol, rtol=0)
            assert b.labels.tolist() == d.labels.tolist() and b.scores.eq(1).all()
    with pytest.raises(ValueError, match="both 'one'"):
        write_yolo([dets[0], make_det(1, file_name="c/one.png", image_id=9)], tmp_path / "clash", NAMES)


def test_export_journal_matches_direct_writers(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path / "run", NAMES, [3, 9, 11], settings={})
    dets = _dets()
    for d in dets:
        w.add(d.file_name, d)
    w.finalize()
    j = read_journal(tmp_path / "run" / "predictions.jsonl")
    order = [d.file_name for d in dets]
    export_journal(j, "jsonl", tmp_path / "run", order=order)
    back = read_jsonl(tmp_path / "run" / "detections.jsonl", NAMES)
    assert [k for k, _ in back] == order
    for d, (_, b) in zip(dets, back):
        assert_same(d, b, atol=1e-5)
    assert export_journal(j, "coco", tmp_path / "run") is None


def test_failed_writer_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with CsvWriter(tmp_path / "d.csv") as w:
            w.add("a", make_det(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---- adapters ---------------------------------------------------------------------------------------------------

def test_supervision_round_trip() -> None:
    sv = pytest.importorskip("supervision")
    det = make_det(4, masks=True)
    s = to_supervision(det)
    assert isinstance(s, sv.Detections) and len(s) == 4
    assert s.xyxy.dtype == np.float32 and s.mask.shape == (4, 40, 60)
    assert list(s.data["class_name"]) == det.names and s.class_id.tolist() == det.labels.tolist()
    assert_same(det, from_supervision(s, NAMES))
    plain = make_det(3, masks=False)
    back = from_supervision(to_supervision(plain), NAMES, image_size=plain.image_size)
    assert_same(plain, back) and back.masks is None
    with pytest.raises(ValueError, match="image_size"):
        from_supervision(to_supervision(plain), NAMES)
    by_name = sv.Detections(xyxy=s.xyxy, confidence=s.confidence, data={"class_name": s.data["class_name"]},
                            mask=s.mask)
    assert_same(det, from_supervision(by_name, NAMES))


def test_hf_pipeline_shape_and_round_trip() -> None:
    det = Detections(torch.tensor([[1.5, 2.0, 10.25, 20.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.25, 0.75]),
                     torch.tensor([2, 0]), (30, 40), NAMES)
    assert to_hf(det) == [
        {"score": 0.75, "label": "cat", "box": {"xmin": 0.0, "ymin": 0.0, "xmax": 5.0, "ymax": 5.0}},
        {"score": 0.25, "label": "traffic cone", "box": {"xmin": 1.5, "ymin": 2.0, "xmax": 10.25, "ymax": 20.0}},
    ]
    rand = make_det(5)
    assert_same(rand, from_hf(to_hf(rand), NAMES, rand.image_size))
    with pytest.raises(ValueError, match="candidate_labels"):
        from_hf([{"score": 1.0, "label": "bird", "box": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}}], NAMES, (9, 9))


# ---- user boxes -------------------------------------------------------------------------------------------------

def test_read_boxes_file_formats_and_dtypes(tmp_path: Path) -> None:
    coco = {"images": [{"id": 1, "file_name": "sub/a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "bbox": [10, 20, 30, 40], "iscrowd": 0},
                            {"image_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    got = read_boxes_file(tmp_path / "c.json")
    assert got["sub/a.jpg"].tolist() == [[10, 20, 40, 60]] and got["sub/a.jpg"].dtype == np.int64
    assert got["b.jpg"].shape == (0, 4)  # an image without annotations: no boxes, not missing
    (tmp_path / "d.json").write_text(json.dumps({"a.jpg": [[1, 2, 3, 4]], "b.jpg": [[1.5, 2, 3, 4]], "c.jpg": []}))
    got = read_boxes_file(tmp_path / "d.json")
    assert got["a.jpg"].dtype == np.int64 and got["b.jpg"].dtype == np.float32 and got["c.jpg"].shape == (0, 4)
    (tmp_path / "e.csv").write_text("file_name,x1,y1,x2,y2\na.jpg,1,2,3,4\na.jpg,5,6,7,8\nb.jpg,1.0,2,3,4\n")
    got = read_boxes_file(tmp_path / "e.csv")
    assert got["a.jpg"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and got["a.jpg"].dtype == np.int64
    assert got["b.jpg"].dtype == np.float32
    (tmp_path / "f.json").write_text(json.dumps({"a.jpg": [[1, 2, 3]]}))
    with pytest.raises(BoxesFileError, match=r"f.json, entry 'a.jpg'.*4 numbers"):
        read_boxes_file(tmp_path / "f.json")
    (tmp_path / "g.csv").write_text("a.jpg,1,2,3\n")
    with pytest.raises(BoxesFileError, match="line 1"):
        read_boxes_file(tmp_path / "g.csv")


def test_match_boxes_one_rule() -> None:
    b = {k: np.full((1, 4), i, np.int64) for i, k in enumerate(["k1", "/imgs/x/p.jpg", "q.jpg", "r.jpg", "d1/s.jpg",
                                                                 "d2/s.jpg"])}
    items = [("k1", "/imgs/a.jpg"), ("k2", "/imgs/x/p.jpg"), ("k3", "/elsewhere/q.jpg")]
    assert [int(m[0, 0]) for m in match_boxes(items, b, "boxes.json")] == [0, 1, 2]  # key, path, base name
    with pytest.raises(BoxesFileError, match=r"several entries by base name \(d1/s.jpg, d2/s.jpg\)"):
        match_boxes([("k", "/imgs/s.jpg")], b)
    with pytest.raises(BoxesFileError, match="matches several images"):
        match_boxes([("k", "/1/r.jpg"), ("j", "/2/r.jpg")], b)
    with pytest.raises(BoxesFileError, match=r"boxes.json has no boxes for image /imgs/zz.jpg.*empty list"):
        match_boxes([("zz", "/imgs/zz.jpg")], b, "boxes.json")


def test_validate_user_boxes_names_image_box_and_file() -> None:
    validate_user_boxes(np.array([[-5, -5, 3, 3], [50, 30, 80, 45]]), (40, 60), source="b.json", image_name="a.jpg")
    validate_user_boxes(np.zeros((0, 4)), (40, 60))
    cases = [([[0, 0, 5, 5], [1, 1, float("nan"), 4]], "box 1 .* of a.jpg \\(from b.json\\) contains NaN"),
             ([[5, 0, 4, 5]], "box 0 .*negative width"), ([[0, 5, 4, 5]], "box 0 .*zero or negative"),
             ([[60, 0, 70, 5]], "entirely outside the 60x40 image"), ([[0, 0, 1, 2, 3]], "shape")]
    for boxes, msg in cases:
        with pytest.raises(BadBoxesError, match=msg) as e:
            validate_user_boxes(torch.tensor(boxes), (40, 60), source="b.json", image_name="a.jpg")
        assert e.value.image_name == "a.jpg" and e.value.source == "b.json" and isinstance(e.value, ValueError)
