"""Dataset readers: COCO / OV-COCO json, LVIS v1 json, image folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from regionclip.assets import demo_image_paths
from regionclip.data.datasets import (DatasetError, load_annotations, load_coco_json, load_image_folder,
                                      load_lvis_json, load_registered)


def _write(tmp_path: Path, name: str, obj: dict) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_parity_gt_boxes_json(shared_dir: Path) -> None:
    ds = load_coco_json(shared_dir / "parity" / "gt_boxes.json", shared_dir / "data" / "images")
    raw = json.loads((shared_dir / "parity" / "gt_boxes.json").read_text())
    assert len(ds) == 2 and len(ds.class_names) == 65
    # contiguous index = rank of the category id (OVR-CNN / detectron2 order).
    assert ds.category_ids == sorted(c["id"] for c in raw["categories"])
    a = raw["annotations"][0]
    rec = ds[0]
    x, y, w, h = a["bbox"]
    np.testing.assert_allclose(rec.boxes[0], [x, y, x + w, y + h])
    assert ds.category_ids[rec.labels[0]] == a["category_id"]
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64
    assert Path(rec.file_name).name == "sample_img1.jpg" and (rec.height, rec.width) == (1080, 1920)


def test_coco_contiguous_order_and_crowd(tmp_path: Path) -> None:
    gt = {"images": [{"id": 7, "file_name": "a.jpg", "height": 100, "width": 200},
                     {"id": 8, "file_name": "b.jpg", "height": 100, "width": 200}],
          "categories": [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}, {"id": 17, "name": "cat"}],
          "annotations": [
              {"id": 1, "image_id": 7, "category_id": 17, "bbox": [10, 10, 20, 30], "iscrowd": 0},
              {"id": 2, "image_id": 7, "category_id": 90, "bbox": [0, 0, 50, 50], "iscrowd": 1},
              {"id": 3, "image_id": 7, "category_id": 5, "bbox": [190, 90, 30, 30], "iscrowd": 0},  # crosses edge
              {"id": 4, "image_id": 7, "category_id": 5, "bbox": [5, 5, 0, 10], "iscrowd": 0}]}  # empty
    ds = load_coco_json(_write(tmp_path, "ovd_ins_val2017_all.json", gt), tmp_path / "img")
    assert ds.class_names == ["airplane", "cat", "toothbrush"] and ds.category_ids == [5, 17, 90]
    assert ds.name == "ovd_ins_val2017_all" and ds.kind == "coco"
    rec = ds[0]
    assert rec.labels.tolist() == [1, 2, 0, 0] and rec.iscrowd.tolist() == [False, True, False, False]
    boxes, labels = rec.region_boxes()
    assert labels.tolist() == [1, 0]  # crowd and empty boxes are not GT regions
    np.testing.assert_allclose(boxes, [[10, 10, 30, 40], [190, 90, 200, 100]])  # clipped to the image
    assert len(ds[1].boxes) == 0 and ds[1].file_name == str(tmp_path / "img" / "b.jpg")


def test_coco_bad_inputs(tmp_path: Path) -> None:
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(DatasetError, match="category_id 3"):
        load_coco_json(_write(tmp_path, "x.json", gt), tmp_path)
    p = tmp_path / "trunc.json"
    p.write_text(json.dumps(gt)[:-20])
    with pytest.raises(DatasetError, match="truncated"):
        load_coco_json(p, tmp_path)
    with pytest.raises(DatasetError, match="'images' and 'categories'"):
        load_coco_json(_write(tmp_path, "y.json", {"foo": 1}), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_coco_json(tmp_path / "missing.json", tmp_path)


def _lvis_json() -> dict:
    cats = [{"id": 1, "name": "bat_(animal)", "synonyms": ["bat_(animal)"], "frequency": "r"},
            {"id": 2, "name": "bull", "synonyms": ["horned_cow"], "frequency": "c"},
            {"id": 3, "name": "apple", "synonyms": ["apple"], "frequency": "f"}]
    images = [{"id": 10, "coco_url": "http://images.cocodataset.org/val2017/000000000010.jpg", "height": 100,
               "width": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []},
              {"id": 11, "coco_url": "http://images.cocodataset.org/train2017/000000000011.jpg", "height": 100,
               "width": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []},
              {"id": 12, "coco_url": "http://images.cocodataset.org/val2017/000000000012.jpg", "height": 100,
               "width": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}]
    anns = [{"id": i + 1, "image_id": 10, "category_id": 3, "bbox": [i % 90, 0, 5, 5]} for i in range(510)]
    anns += [{"id": 1000, "image_id": 11, "category_id": 1, "bbox": [0, 0, 5, 5]},
             {"id": 1001, "image_id": 10, "category_id": 2, "bbox": [0, 0, 5, 5]}]
    return {"images": images, "annotations": anns, "categories": cats}


def test_lvis_reader(tmp_path: Path) -> None:
    p = _write(tmp_path, "lvis_v1_val.json", _lvis_json())
    ds = load_lvis_json(p, tmp_path / "coco")
    assert ds.kind == "lvis" and ds.category_ids == [1, 2, 3]
    assert ds.class_names == ["bat animal", "bull", "apple"]  # prompt names
    assert ds.display_names == ["bat_(animal)", "horned_cow", "apple"]  # detectron2 thing_classes
    assert ds.frequencies == ["r", "c", "f"]
    assert [r.image_id for r in ds] == [10, 11]  # image 12 has no annotations -> dropped
    assert len(ds[0].boxes) == 500  # capped
    assert ds[0].labels[0] == 2  # id - 1
    assert ds[0].file_name == str(tmp_path / "coco" / "val2017" / "000000000010.jpg")
    assert ds[1].file_name == str(tmp_path / "coco" / "train2017" / "000000000011.jpg")
    assert load_annotations(p, tmp_path / "coco").kind == "lvis"


def test_lvis_reader_remove_rare(tmp_path: Path) -> None:
    ds = load_lvis_json(_write(tmp_path, "lvis_v1_train.json", _lvis_json()), tmp_path, remove_rare=True)
    assert ds.category_ids == [2, 3] and ds.class_names == ["bull", "apple"]
    # image 11 only had a rare annotation -> dropped; image 10's labels re-indexed to the base order.
    assert [r.image_id for r in ds] == [10]
    assert set(ds[0].labels.tolist()) == {1}  # first 500 annotations are all "apple" (base index 1)


def test_lvis_without_frequency_is_rejected(tmp_path: Path) -> None:
    gt = _lvis_json()
    del gt["categories"][0]["frequency"]
    with pytest.raises(DatasetError, match="frequency"):
        load_lvis_json(_write(tmp_path, "l.json", gt), tmp_path)


def test_image_folder(tmp_path: Path) -> None:
    folder = demo_image_paths()[0].parent
    ds = load_image_folder(folder, ["cat", "dog"])
    assert [Path(r.file_name).name for r in ds] == ["sample_img1.jpg", "sample_img2.jpg"]
    assert [r.image_id for r in ds] == [0, 1] and (ds[0].height, ds[0].width) == (1080, 1920)
    assert ds.category_ids == [1, 2] and not ds.has_annotations
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path, ["cat"])
    with pytest.raises(DatasetError, match="vocabulary"):
        load_image_folder(folder, [])


def test_registered_names(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="coco_2017_ovd_all_test"):
        load_registered("coco_ovd_typo", tmp_path)
    with pytest.raises(FileNotFoundError, match="ovd_ins_val2017_all.json"):
        load_registered("coco_2017_ovd_all_test", tmp_path)
    (tmp_path / "lvis").mkdir()
    _write(tmp_path / "lvis", "lvis_v1_train.json", _lvis_json())
    assert load_registered("lvis_v1_train", tmp_path).category_ids == [2, 3]  # train split: rare removed


def test_region_boxes_resized_truncates_integer_json_boxes(tmp_path: Path) -> None:
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 1080, "width": 1920}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 180, 100, 90]},  # ints
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10.0, 180.0, 100.0, 90.0]},  # floats
                          {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}
    rec = load_coco_json(_write(tmp_path, "g.json", gt), tmp_path)[0]
    boxes, labels = rec.region_boxes_resized((750, 1333))
    assert len(boxes) == 2  # crowd removed
    s = 1333 / 1920
    # detectron2 scales integer boxes in an int array: 10*s=6.94 -> 6, 180*(750/1080)=125 -> 125, 110*s=76.4 -> 76
    np.testing.assert_array_equal(boxes[0], [6, 125, 76, 187])
    np.testing.assert_allclose(boxes[1], [10 * s, 125, 110 * s, 270 * 750 / 1080], rtol=1e-6)
