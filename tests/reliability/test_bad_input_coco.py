"""Bad COCO input: errors name the json, the ids and the fix; repairable cases are counted warnings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")
pytest.importorskip("albumentations")

from tasks.detection.coco_eval import coco_map  # noqa: E402
from tasks.detection.data import CocoDetection, ImageFolderDataset  # noqa: E402
from tasks.detection.transforms import build_det_transforms  # noqa: E402

CATS = [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}]


def _coco(root: Path, images: list[dict], annotations: list[dict], categories=CATS, write_images=True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for im in images if write_images else []:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(root / "images" / im["file_name"])
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _ds(path: Path) -> CocoDetection:
    return CocoDetection(path, path.parent / "images", build_det_transforms("val", 128), 128)


def _im(i: int, w: int = 64, h: int = 48) -> dict:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i: int, image_id: int = 1, bbox=(4, 4, 20, 10), cat: int = 3, **kw) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "iscrowd": 0,
            "area": bbox[2] * bbox[3], **kw}  # fmt: skip


def test_missing_image_file(tmp_path):
    path = _coco(tmp_path, [_im(1), _im(2)], [])
    (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed in .*instances\.json are missing.*: 2\.png"):
        _ds(path)


def test_unknown_category_id(tmp_path):
    path = _coco(tmp_path, [_im(1)], [_ann(1, cat=99)])
    with pytest.raises(ValueError, match=r"annotation #0 \(id 1\) has category_id 99, which is not among the "
                                         r"categories \[3, 17\]; add it"):
        _ds(path)


def test_category_missing_from_the_training_json(tmp_path):
    from tasks.detection.data import CategoryMap

    path = _coco(tmp_path, [_im(1)], [_ann(1, cat=17)])
    train_map = CategoryMap.from_categories([CATS[0]])  # the training json only has category 3
    with pytest.raises(ValueError, match=r"instances\.json: category_id 17 is not among the known ids \[3\].*same "
                                         r"'categories' in every split"):
        CocoDetection(path, tmp_path / "images", build_det_transforms("val", 128), 128, train_map)


@pytest.mark.parametrize("bbox", [[0, 0, 10], [0, 0, float("nan"), 3], "0 0 10 10"])
def test_malformed_bbox(tmp_path, bbox):
    path = tmp_path / "instances.json"
    ann = {"id": 1, "image_id": 1, "category_id": 3, "bbox": bbox}
    # json.dumps writes NaN as the bare token NaN, which Python's json reads back, as many tools do.
    path.write_text(json.dumps({"images": [_im(1)], "annotations": [ann], "categories": CATS}))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"annotation #0 \(id 1\) has bbox .*\[x, y, width, height\]"):
        _ds(path)


def test_zero_negative_and_outside_boxes_are_dropped_counted_and_ignored_in_eval(tmp_path):
    anns = [_ann(1, bbox=(4, 4, 20, 10)),       # fine
            _ann(2, bbox=(10, 10, 0, 8)),       # zero width
            _ann(3, bbox=(30, 20, -5, 5)),      # negative width
            _ann(4, bbox=(200, 100, 10, 10)),   # entirely outside the 64x48 image
            _ann(5, bbox=(50, 40, 30, 30))]     # partly outside: clipped to 14 x 8, kept
    path = _coco(tmp_path, [_im(1)], anns)
    with pytest.warns(UserWarning, match=r"dropped 3 degenerate box\(es\) .*instances\.json"):
        ds = _ds(path)
    assert ds.num_dropped == 3
    boxes = ds[0]["boxes_xyxy"] * ds[0]["img_scale"]
    np.testing.assert_allclose(boxes.numpy(), [[4, 4, 24, 14], [50, 40, 64, 48]], atol=0.5)
    # Perfect detections of the two real boxes give AP 1: the degenerate ones are ignore regions, not misses.
    perfect = [{"image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 10], "score": 0.9},
               {"image_id": 1, "category_id": 3, "bbox": [50, 40, 30, 30], "score": 0.8}]
    assert coco_map(ds.coco, perfect, [1])["AP50"] == pytest.approx(1.0)


def test_duplicate_image_ids(tmp_path):
    path = _coco(tmp_path, [_im(1), {**_im(2), "id": 1}], [])
    with pytest.raises(ValueError, match=r"instances\.json has duplicate image ids: 1; each image needs a unique id"):
        _ds(path)


def test_annotation_of_an_image_that_does_not_exist(tmp_path):
    path = _coco(tmp_path, [_im(1)], [_ann(1), _ann(2, image_id=42)])
    with pytest.raises(ValueError, match=r"1 annotation\(s\) refer to images that are not in 'images': annotation #1 "
                                         r"\(id 2\) -> image_id 42"):
        _ds(path)


@pytest.mark.parametrize("ids", [[0, 1], [5, 5], [None, 2]], ids=["zero", "duplicate", "missing"])
def test_annotation_ids_zero_duplicate_or_missing_are_renumbered(tmp_path, ids):
    anns = [_ann(i, bbox=(4 + 30 * k, 4, 20, 10)) for k, i in enumerate(ids)]
    for a in anns:
        if a["id"] is None:
            del a["id"]
    path = _coco(tmp_path, [_im(1)], anns)
    with pytest.warns(UserWarning, match=r"annotation id\(s\) missing, duplicated or <= 0 .*renumbered all 2"):
        ds = _ds(path)
    assert sorted(ds.coco.anns) == [1, 2]
    # With id 0 left in place, COCOeval reads the matched box as "unmatched" (measured: AP50 0.25 instead of 1).
    perfect = [{"image_id": 1, "category_id": 3, "bbox": [4 + 30 * k, 4, 20, 10], "score": 0.9} for k in range(2)]
    assert coco_map(ds.coco, perfect, [1])["AP50"] == pytest.approx(1.0)


def test_images_without_annotations_are_negatives(tmp_path):
    path = _coco(tmp_path, [_im(1), _im(2)], [_ann(1)])
    ds = _ds(path)
    assert len(ds) == 2 and ds[1]["boxes_xyxy"].shape == (0, 4) and ds[1]["labels"].shape == (0,)


def test_crowd_annotations_are_not_trained_on(tmp_path):
    path = _coco(tmp_path, [_im(1)], [_ann(1), _ann(2, bbox=(30, 20, 20, 20), iscrowd=1)])
    sample = _ds(path)[0]
    assert sample["labels"].tolist() == [0] and len(sample["boxes_xyxy"]) == 1


def test_not_a_coco_json(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text("{broken")
    with pytest.raises(ValueError, match=r"instances\.json is not valid json"):
        _ds(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"has no 'images' list"):
        _ds(path)


def test_corrupt_image_in_a_coco_split(tmp_path):
    path = _coco(tmp_path, [_im(1)], [_ann(1)])
    (tmp_path / "images" / "1.png").write_bytes(b"not a png")
    ds = _ds(path)
    with pytest.raises(ValueError, match=r"image .*1\.png cannot be read: it is truncated, corrupt or not an image"):
        ds[0]


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (33, 31)])
def test_tiny_and_odd_images_are_letterboxed(tmp_path, size):
    w, h = size
    path = _coco(tmp_path, [_im(1, w, h)], [])
    sample = _ds(path)[0]
    assert sample["image"].shape == (3, 128, 128) and torch.isfinite(sample["image"]).all()
    assert sample["img_scale"] == pytest.approx(max(w, h) / 128)


def test_prediction_folder_counts_non_image_files(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "readme.md").write_text("x")
    with pytest.warns(UserWarning, match=r"ignored 1 non-image file\(s\) in .*readme\.md"):
        ds = ImageFolderDataset(tmp_path, 128)
    assert [p.name for p in ds.files] == ["a.jpg"]


def test_wrong_channel_count_for_the_detector():
    pytest.importorskip("effdet")
    from tasks.detection import DetectionTask

    task = DetectionTask(model="d0", num_classes=2, image_size=128).eval()
    with pytest.raises(ValueError, match=r"DetectionTask was built for in_channels=3 but the image has 4 channel"):
        task(torch.zeros(1, 4, 128, 128))
