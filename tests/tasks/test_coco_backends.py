"""faster-coco-eval against pycocotools on the same inputs: identical numbers; backend choice and fallback."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import random

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")
from pycocotools.coco import COCO  # noqa: E402

from tasks.detection import coco_backends  # noqa: E402
from tasks.detection.coco_backends import resolve_backend, run_cocoeval  # noqa: E402
from tasks.detection.coco_eval import coco_map  # noqa: E402

CATEGORIES = (3, 17, 41, 90)  # sparse ids; 41 never has ground truth


def generated(seed: int, num_images: int = 60, score_decimals: int = 2) -> tuple[COCO, list[dict]]:
    """Ground truth and results with every case COCOeval treats specially.

    Images without ground truth, images without detections (and some with only false positives), crowd regions,
    a category with detections but no ground truth, sizes across small/medium/large, wrong labels, more than 100
    detections on some images (maxDets), and scores rounded to ``score_decimals`` so that ties occur.
    """
    rng = random.Random(seed)
    images, anns, results = [], [], []
    for k in range(num_images):
        image_id = 5 * k + 2  # sparse image ids too
        w, h = rng.choice([(640, 480), (300, 200), (1024, 768)])
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
        boxes = [] if rng.random() < 0.15 else [_box(rng, w, h) for _ in range(rng.randint(1, 12))]
        for x, y, bw, bh in boxes:
            category = rng.choice(CATEGORIES[:2] + CATEGORIES[3:])
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, bw, bh],
                         "area": bw * bh * rng.uniform(0.6, 1.0), "iscrowd": int(rng.random() < 0.08)})  # fmt: skip
            if rng.random() < 0.8:  # a detection near the box
                jitter = [rng.gauss(0, 0.08 * max(bw, bh)) for _ in range(4)]
                label = category if rng.random() < 0.85 else rng.choice(CATEGORIES)
                bbox = [x + jitter[0], y + jitter[1], max(1.0, bw + jitter[2]), max(1.0, bh + jitter[3])]
                results.append(_result(image_id, label, bbox, rng.random(), score_decimals))
        if rng.random() < 0.15:
            continue  # an image without any detection
        for _ in range(rng.choice([0, 2, 10, 130])):  # false positives, sometimes past maxDets=100
            results.append(
                _result(image_id, rng.choice(CATEGORIES), _box(rng, w, h), 0.6 * rng.random(), score_decimals)
            )
    return _coco(images, anns), results


def _coco(images: list[dict], anns: list[dict]) -> COCO:
    """An indexed COCO ground truth of ``images`` and ``anns`` over :data:`CATEGORIES`."""
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"cat{c}"} for c in CATEGORIES]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _box(rng: random.Random, w: int, h: int) -> list[float]:
    bw, bh = rng.uniform(3, w / 2), rng.uniform(3, h / 2)  # 3 px to half the image: all three size ranges
    return [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]


def _result(image_id: int, category: int, bbox: list[float], score: float, decimals: int) -> dict:
    return {"image_id": image_id, "category_id": category, "bbox": bbox, "score": round(score, decimals)}


@pytest.mark.parametrize(("seed", "decimals"), [(0, 2), (1, 5), (2, 1), (7, 6)])
def test_all_twelve_stats_are_identical(seed, decimals):
    coco, results = generated(seed, score_decimals=decimals)
    ids = sorted(coco.getImgIds())
    slow = run_cocoeval(coco, results, ids, backend="pycocotools")
    fast = run_cocoeval(coco, results, ids, backend="faster-coco-eval")
    assert type(fast).__module__.startswith("faster_coco_eval")
    slow_stats, fast_stats = np.asarray(slow.stats), np.asarray(fast.stats[:12])
    assert len(slow_stats) == 12 and 0 < slow_stats[0] < 1  # a non-trivial score
    if decimals >= 5:  # no tied scores: bitwise equal
        assert np.array_equal(slow_stats, fast_stats)
    else:  # tied scores: equal to the last bit of a double (means of the same numbers summed in another order)
        np.testing.assert_allclose(fast_stats, slow_stats, rtol=1e-15, atol=0)
    # The precision table behind per-class AP, to the same precision.
    np.testing.assert_allclose(fast.eval["precision"], slow.eval["precision"], rtol=0, atol=1e-15)


def test_coco_map_identical_per_class_and_on_an_image_subset():
    coco, results = generated(3)
    names = {c: f"cat{c}" for c in CATEGORIES}
    ids = sorted(coco.getImgIds())[::3]  # a subset: results on other images are left out by both
    slow = coco_map(coco, results, ids, names, backend="pycocotools")
    fast = coco_map(coco, results, ids, names, backend="faster-coco-eval")
    assert slow.keys() == fast.keys() and math.isnan(slow["AP_cat41"]) and math.isnan(fast["AP_cat41"])
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, rel=1e-15, abs=0, nan_ok=True), key


def test_only_crowd_and_empty_images():
    coco, results = generated(4, num_images=12)
    for ann in coco.dataset["annotations"]:
        ann["iscrowd"] = 1  # every ground truth an ignore region: nothing to find
    coco.createIndex()
    ids = sorted(coco.getImgIds())
    slow = run_cocoeval(coco, results, ids, backend="pycocotools").stats
    fast = run_cocoeval(coco, results, ids, backend="faster-coco-eval").stats[:12]
    assert np.array_equal(slow, fast) and all(v == -1 for v in slow)


def test_results_and_ground_truth_are_not_modified():
    coco, results = generated(5, num_images=10)
    before = [{**r, "bbox": list(r["bbox"])} for r in results]
    for backend in ("faster-coco-eval", "pycocotools"):
        run_cocoeval(coco, results, sorted(coco.getImgIds()), backend=backend)
    assert results == before


def test_faster_index_of_the_ground_truth_is_built_once():
    coco, _ = generated(6, num_images=5)
    assert coco_backends._faster_gt(coco) is coco_backends._faster_gt(coco)


def test_auto_falls_back_to_pycocotools_and_names_are_checked(monkeypatch):
    assert resolve_backend("auto") == "faster-coco-eval"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "faster_coco_eval" else real(name)
    )
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        resolve_backend("faster-coco-eval")
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'fast'; choose one of auto"):
        resolve_backend("fast")


def test_detection_task_checks_the_backend_before_building():
    pytest.importorskip("effdet")
    from tasks.detection import DetectionTask

    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        DetectionTask(coco_eval_backend="cocoapi")


def generated_masks(seed: int, num_images: int = 30) -> tuple[COCO, list[dict]]:
    """Mask ground truth (RLE and polygons, some crowd) and mask results (RLE) with shifted, grown or shrunk shapes."""
    from pycocotools import mask as mask_utils

    rng = random.Random(seed)
    images, anns, results = [], [], []
    for k in range(num_images):
        image_id = 3 * k + 1
        w, h = rng.choice([(64, 48), (40, 72)])
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
        for _ in range(0 if rng.random() < 0.15 else rng.randint(1, 6)):
            x0, y0 = rng.randrange(0, w - 4), rng.randrange(0, h - 4)
            x1, y1 = rng.randrange(x0 + 2, w + 1), rng.randrange(y0 + 2, h + 1)
            category = rng.choice(CATEGORIES[:2] + CATEGORIES[3:])
            crowd = int(rng.random() < 0.1)
            if crowd or rng.random() < 0.5:  # RLE (crowd regions always are), else a polygon
                grid = np.zeros((h, w), np.uint8, order="F")
                grid[y0:y1, x0:x1] = 1
                segmentation = mask_utils.encode(grid)
                segmentation["counts"] = segmentation["counts"].decode()
            else:
                segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "iscrowd": crowd,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": segmentation})  # fmt: skip
            for _ in range(rng.choice([0, 1, 1, 2])):  # a detection near it, sometimes two
                d = [rng.randint(-1, 1) for _ in range(4)]
                grid = np.zeros((h, w), np.uint8, order="F")
                grid[max(0, y0 + d[0]) : max(1, y1 + d[1]), max(0, x0 + d[2]) : max(1, x1 + d[3])] = 1
                rle = mask_utils.encode(grid)
                rle["counts"] = rle["counts"].decode()
                label = category if rng.random() < 0.85 else rng.choice(CATEGORIES)
                results.append({"image_id": image_id, "category_id": label, "segmentation": rle,
                                "score": round(rng.random(), 3)})  # fmt: skip
    return _coco(images, anns), results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_stats_are_identical(seed):
    """Mask AP (instance segmentation's ``segm`` evaluation) agrees between the backends as box AP does."""
    coco, results = generated_masks(seed)
    ids = sorted(coco.getImgIds())
    slow = run_cocoeval(coco, results, ids, iou_type="segm", backend="pycocotools")
    fast = run_cocoeval(coco, results, ids, iou_type="segm", backend="faster-coco-eval")
    assert type(fast).__module__.startswith("faster_coco_eval")
    slow_stats, fast_stats = np.asarray(slow.stats), np.asarray(fast.stats[:12])
    assert 0.1 < slow_stats[0] < 0.9  # a non-trivial score
    np.testing.assert_allclose(fast_stats, slow_stats, rtol=1e-12, atol=0)
    names = {c: f"cat{c}" for c in CATEGORIES}
    slow_map = coco_map(coco, results, ids, names, backend="pycocotools", iou_type="segm")
    fast_map = coco_map(coco, results, ids, names, backend="faster-coco-eval", iou_type="segm")
    for key, value in slow_map.items():
        assert fast_map[key] == pytest.approx(value, rel=1e-12, abs=0, nan_ok=True), key
