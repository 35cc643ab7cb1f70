"""COCO reading rules: category ids, crowd, empty images, degenerate boxes, missing files, colour modes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("albumentations")
from PIL import Image  # noqa: E402

from tasks.detection.data import CategoryMap, CocoDataModule, CocoDetection, collate_detection  # noqa: E402
from tasks.detection.synthetic import SyntheticCocoSpec, generate_synthetic_coco  # noqa: E402
from tasks.detection.transforms import build_det_transforms  # noqa: E402

CATS = [{"id": 90, "name": "c"}, {"id": 3, "name": "a"}, {"id": 17, "name": "b"}]  # unsorted on purpose


def write_coco(root: Path, images: list[dict], annotations: list[dict], split: str = "train",
               modes: dict[str, str] | None = None, skip_files: tuple[str, ...] = ()) -> Path:
    """A COCO split with plain images (mode per file name, default RGB)."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    for im in images:
        if im["file_name"] in skip_files:
            continue
        mode = (modes or {}).get(im["file_name"], "RGB")
        Image.new(mode, (im["width"], im["height"]), color=128 if mode in ("L", "P") else None).save(
            root / split / "images" / im["file_name"])
    for i, a in enumerate(annotations):
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATS}))
    return path


def dataset(path: Path, root: Path, size: int = 128, split: str = "train") -> CocoDetection:
    return CocoDetection(path, root / split / "images", build_det_transforms("val", size), size)


def test_sparse_category_ids_round_trip():
    cmap = CategoryMap.from_categories(CATS)
    assert cmap.category_ids == (3, 17, 90) and cmap.names == ("a", "b", "c")
    assert [cmap.to_label(c) for c in (3, 17, 90)] == [0, 1, 2]
    assert [cmap.to_category_id(cmap.to_label(c)) for c in (90, 3, 17)] == [90, 3, 17]
    with pytest.raises(KeyError, match="category_id 5"):
        cmap.to_label(5)


def test_labels_are_contiguous_and_boxes_map_back(tmp_path):
    images = [{"id": 7, "file_name": "a.png", "width": 200, "height": 100}]
    anns = [{"image_id": 7, "category_id": 90, "bbox": [10, 20, 50, 40]},
            {"image_id": 7, "category_id": 3, "bbox": [100, 0, 100, 100]}]
    ds = dataset(write_coco(tmp_path, images, anns), tmp_path)
    sample = ds[0]
    assert sample["image"].shape == (3, 128, 128)
    assert sample["labels"].tolist() == [2, 0]
    assert sample["image_id"] == 7 and sample["img_size"] == (200, 100)
    # Letterbox at the top-left: model boxes times img_scale are the original xyxy boxes.
    back = sample["boxes_xyxy"] * sample["img_scale"]
    np.testing.assert_allclose(back.numpy(), [[10, 20, 60, 60], [100, 0, 200, 100]], atol=0.5)


def test_crowd_not_trained_on_and_empty_images_kept(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
              {"id": 2, "file_name": "b.png", "width": 64, "height": 64}]
    anns = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1},
            {"image_id": 1, "category_id": 17, "bbox": [30, 30, 20, 20]}]
    ds = dataset(write_coco(tmp_path, images, anns), tmp_path)
    assert len(ds) == 2
    assert ds[0]["labels"].tolist() == [1]  # the crowd box is gone
    assert ds[1]["boxes_xyxy"].shape == (0, 4) and ds[1]["labels"].shape == (0,)
    batch = collate_detection([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 128, 128) and [len(b) for b in batch["boxes_xyxy"]] == [1, 0]


def test_degenerate_boxes_clipped_dropped_and_counted(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}]
    anns = [{"image_id": 1, "category_id": 3, "bbox": [90, 70, 30, 30]},   # clipped to 10 x 10: kept
            {"image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 5]},     # zero width
            {"image_id": 1, "category_id": 3, "bbox": [20, 20, -5, 5]},    # negative width
            {"image_id": 1, "category_id": 3, "bbox": [150, 10, 20, 20]}]  # outside the image
    path = write_coco(tmp_path, images, anns)
    with pytest.warns(UserWarning, match="dropped 3 degenerate box") as record:
        ds = dataset(path, tmp_path)
    assert sum("degenerate" in str(w.message) for w in record) == 1  # one warning, not one per box
    assert ds.num_dropped == 3
    np.testing.assert_allclose((ds[0]["boxes_xyxy"] * ds[0]["img_scale"]).numpy(), [[90, 70, 100, 80]], atol=0.5)


def test_missing_image_file_is_named(tmp_path):
    images = [{"id": 1, "file_name": "here.png", "width": 32, "height": 32},
              {"id": 2, "file_name": "gone.png", "width": 32, "height": 32}]
    path = write_coco(tmp_path, images, [], skip_files=("gone.png",))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        dataset(path, tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_any_colour_mode_becomes_rgb(tmp_path, mode):
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
    ds = dataset(write_coco(tmp_path, images, [], modes={"a.png": mode}), tmp_path)
    assert ds[0]["image"].shape == (3, 128, 128)


def test_train_augmentation_keeps_labels_aligned():
    t = build_det_transforms("train", 128)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 40], [60, 10, 140, 90], [100, 70, 149, 99]], dtype=np.float32)
    for _ in range(20):
        out = t(image=image, bboxes=boxes, labels=np.array([0, 1, 2]))
        assert out["image"].shape == (128, 128, 3)
        assert len(out["bboxes"]) == len(out["labels"])
        # Small box 0 and large box 1 keep their sizes' order under any flip/scale.
        sizes = {int(lab): (b[2] - b[0]) * (b[3] - b[1]) for b, lab in zip(out["bboxes"], out["labels"], strict=True)}
        if 0 in sizes and 1 in sizes:
            assert sizes[0] < sizes[1]


def test_datamodule_generates_synthetic_data_and_links_classes(tmp_path):
    spec = SyntheticCocoSpec(num_train=3, num_val=2, num_classes=3, category_ids=(3, 17, 90), min_size=40, max_size=60)
    dm = CocoDataModule(root=str(tmp_path / "syn"), image_size=128, batch_size=2, synthetic=spec)
    assert dm.num_classes == 3  # known before anything is generated (the CLI links it at instantiation)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.category_map.category_ids == (3, 17, 90)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 128, 128)
    with pytest.raises(ValueError, match="multiple of 128"):
        CocoDataModule(root=str(tmp_path), image_size=100)


def test_synthetic_generator_is_deterministic(tmp_path):
    spec = SyntheticCocoSpec(num_train=3, num_val=1, min_size=40, max_size=60)
    a, b = generate_synthetic_coco(tmp_path / "a", spec), generate_synthetic_coco(tmp_path / "b", spec)
    for rel in ("annotations/instances_train.json", "train/images/train_00002.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generated boxes are never degenerate
        dataset(a / "annotations" / "instances_train.json", a)


def test_raccoon_reads_with_grayscale_images(raccoon_data):
    root = raccoon_data
    dm = CocoDataModule(root=str(root), image_size=128, batch_size=2)
    assert dm.num_classes == 1 and dm.category_map.names == ("raccoon",)
    dm.setup("validate")
    ds = dm.datasets["val"]
    assert len(ds) == 40 and ds.num_dropped == 0
    grey = [i for i, image_id in enumerate(ds.image_ids)
            if Image.open(ds.image_dir / ds.coco.imgs[image_id]["file_name"]).mode != "RGB"]
    for i in grey[:2] or [0]:
        sample = ds[i]
        assert sample["image"].shape == (3, 128, 128) and len(sample["labels"]) >= 1


def _odd_size_split(root: Path) -> Path:
    """Three odd-sized images, with small (2-12 px) and large boxes: where a rounding shift costs the most."""
    sizes = {101: (427, 640), 205: (333, 500), 307: (640, 359)}
    images = [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in sizes.items()]
    rng = np.random.default_rng(0)
    anns = []
    for i, (w, h) in sizes.items():
        for side in (4, 7, 12, 30, 90, 200):
            x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
            anns.append({"image_id": i, "category_id": int(rng.choice([3, 17, 90])), "bbox": [x, y, side, side * 0.8]})
    return write_coco(root, images, anns, split="val")


def test_ground_truth_round_trip_scores_ap_one_on_odd_sizes(tmp_path):
    import torch

    from tasks.detection.coco_eval import coco_map, to_coco_results
    from tasks.detection.transforms import boxes_to_original

    ds = dataset(_odd_size_split(tmp_path), tmp_path, size=512, split="val")
    per_axis, single = [], []
    for k in range(len(ds)):
        s = ds[k]
        w, h = s["img_size"]
        det = {"scores": torch.ones(len(s["labels"])), "labels": s["labels"]}
        back = boxes_to_original(s["boxes_xyxy"], w, h, 512)  # what the task does with its detections
        per_axis += to_coco_results([s["image_id"]], [{**det, "boxes_xyxy": back}], ds.category_map.category_ids)
        old = s["boxes_xyxy"] * s["img_scale"]  # one factor for both axes: shifted along the rounded side
        single += to_coco_results([s["image_id"]], [{**det, "boxes_xyxy": old}], ds.category_map.category_ids)
    assert coco_map(ds.coco, per_axis)["AP"] == 1.0
    assert coco_map(ds.coco, single)["AP"] < 0.99  # the test can see the half-pixel shift


def test_labelme_background_category_is_dropped_with_a_warning(tmp_path):
    cats = [{"id": 0, "name": "_background_", "supercategory": None}, {"id": 1, "name": "cat"},
            {"id": 2, "name": "dog"}]  # fmt: skip
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}]
    path = write_coco(tmp_path, images, [{"image_id": 1, "category_id": 2, "bbox": [4, 4, 20, 20]},
                                         {"image_id": 1, "category_id": 0, "bbox": [0, 0, 64, 64]}])  # fmt: skip
    data = json.loads(path.read_text())
    data["categories"] = cats
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"left out category 0 '_background_': a placeholder .* 2 classes remain"):
        dm = CocoDataModule(root=str(tmp_path), image_size=128, val_split="train", check_images="off")
        assert dm.num_classes == 2
    assert dm.category_map.category_ids == (1, 2) and dm.category_map.names == ("cat", "dog")
    dm.setup("validate")
    assert dm.datasets["val"][0]["labels"].tolist() == [1]  # the background annotation is not a box to find


def test_predict_on_a_coco_split_writes_its_image_ids_for_pycocotools(tmp_path):
    pytest.importorskip("effdet")
    import contextlib
    import io

    import lightning as L
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from tasks.detection import DetectionTask
    from tasks.detection.predict import DetectionWriter

    annotations = _odd_size_split(tmp_path)
    task = DetectionTask(num_classes=3, image_size=128)
    task.category_ids = (3, 17, 90)
    runs = {"predict_split": {"predict_split": "val"},
            "predict_dir": {"predict_dir": str(tmp_path / "val" / "images")}}  # fmt: skip
    for name, option in runs.items():
        dm = CocoDataModule(root=str(tmp_path), image_size=128, batch_size=2, val_split="val", train_split="val",
                            **option)  # fmt: skip
        out = tmp_path / name
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[DetectionWriter(str(out), draw=False)])  # fmt: skip
        trainer.predict(task, datamodule=dm, return_predictions=False)
        results = json.loads((out / "results.json").read_text())
        assert results and {r["image_id"] for r in results} == {101, 205, 307}, name
        with contextlib.redirect_stdout(io.StringIO()):  # scored directly, no remapping
            gt = COCO(str(annotations))
            evaluator = COCOeval(gt, gt.loadRes(str(out / "results.json")), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert evaluator.stats[0] >= 0.0
    # From Python: predict_folder takes the ids from the json it is given.
    from tasks.detection.predict import predict_folder

    path = predict_folder(task, tmp_path / "val" / "images", tmp_path / "py", annotation_file=annotations)
    assert {r["image_id"] for r in json.loads(path.read_text())} == {101, 205, 307}
