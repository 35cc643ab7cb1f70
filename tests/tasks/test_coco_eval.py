"""COCO mAP helpers and the box-format boundaries."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

from tasks.detection.boxes import split_detections, to_effdet_targets, xywh_to_xyxy, xyxy_to_xywh  # noqa: E402
from tasks.detection.coco_eval import COCO_METRICS, coco_map, to_coco_results  # noqa: E402


def make_gt() -> COCO:
    """Three images, sparse categories, a mix of sizes (small < 32^2 < medium < 96^2 < large)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 200} for i in (1, 2, 5)]
    boxes = [(1, 3, [10, 10, 20, 20]), (1, 17, [50, 40, 60, 50]), (2, 90, [0, 0, 150, 120]),
             (2, 3, [200, 100, 40, 40]), (5, 17, [100, 20, 25, 15])]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": str(c)} for c in (3, 17, 90)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_as_results(coco: COCO, shift: float = 0.0) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1] + shift, a["bbox"][2], a["bbox"][3]]}
            for a in coco.dataset["annotations"]]


def test_ground_truth_as_predictions_scores_one():
    gt = make_gt()
    stats = coco_map(gt, gt_as_results(gt))
    assert set(stats) == set(COCO_METRICS)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert stats[name] == pytest.approx(1.0), name


def test_shifted_boxes_score_lower():
    gt = make_gt()
    exact, shifted = coco_map(gt, gt_as_results(gt)), coco_map(gt, gt_as_results(gt, shift=6.0))
    assert shifted["AP"] < exact["AP"]
    assert shifted["AP75"] < shifted["AP50"] <= 1.0


def test_wrong_category_scores_zero():
    gt = make_gt()
    wrong = [{**r, "category_id": 90 if r["category_id"] != 90 else 3} for r in gt_as_results(gt)]
    assert coco_map(gt, wrong)["AP"] == pytest.approx(0.0)


def test_empty_results_give_zero_without_crash():
    stats = coco_map(make_gt(), [])
    assert stats == dict.fromkeys(COCO_METRICS, 0.0)


def test_image_subset_and_unknown_ids():
    gt = make_gt()
    only_first = [r for r in gt_as_results(gt) if r["image_id"] == 1]
    assert coco_map(gt, only_first, image_ids=[1])["AP"] == pytest.approx(1.0)
    assert coco_map(gt, only_first)["AP"] < 1.0  # the other images' boxes are missed
    with pytest.raises(ValueError, match="absent from the ground truth"):
        coco_map(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}])


def test_results_input_is_not_mutated():
    gt = make_gt()
    results = gt_as_results(gt)
    before = [dict(r) for r in results]
    coco_map(gt, results)
    assert results == before


def test_to_coco_results_maps_labels_and_boxes():
    det = {"boxes_xyxy": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
           "scores": torch.tensor([0.8, 0.01]), "labels": torch.tensor([2, 0])}
    res = to_coco_results([42], [det], category_ids=(3, 17, 90), score_threshold=0.05)
    assert res == [{"image_id": 42, "category_id": 90, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.8}]
    with pytest.raises(ValueError, match="image ids"):
        to_coco_results([1, 2], [det], (3, 17, 90))


def test_round_trip_through_every_boundary():
    gt = make_gt()
    # COCO json -> xyxy -> effdet targets (yxyx, 1-based) -> "detections" -> COCO results: AP 1.
    per_image = {i: [a for a in gt.dataset["annotations"] if a["image_id"] == i] for i in (1, 2, 5)}
    cat_ids = (3, 17, 90)
    boxes = [torch.from_numpy(xywh_to_xyxy([a["bbox"] for a in anns])) for anns in per_image.values()]
    labels = [torch.tensor([cat_ids.index(a["category_id"]) for a in anns]) for anns in per_image.values()]
    target = to_effdet_targets(boxes, labels)
    assert target["bbox"].shape == (3, 2, 4) and target["cls"][2, 1] == -1  # padding
    assert target["bbox"][0, 0].tolist() == [10, 10, 30, 30] and target["cls"][0].tolist() == [1, 2]
    # effdet detections: xyxy, score, 1-based class, zero rows as padding.
    det = torch.zeros(3, 5, 6)
    for i, (b, lab) in enumerate(zip(target["bbox"], target["cls"], strict=True)):
        valid = lab > 0
        det[i, : valid.sum(), :4] = b[valid][:, [1, 0, 3, 2]]
        det[i, : valid.sum(), 4] = 0.9
        det[i, : valid.sum(), 5] = lab[valid]
    dets = split_detections(det)
    assert [len(d["labels"]) for d in dets] == [2, 2, 1]
    assert coco_map(gt, to_coco_results(list(per_image), dets, cat_ids))["AP"] == pytest.approx(1.0)
    assert torch.equal(xyxy_to_xywh(boxes[0]), torch.tensor([[10.0, 10, 20, 20], [50, 40, 60, 50]]))


def test_empty_batch_targets():
    target = to_effdet_targets([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0), torch.zeros(0)])
    assert target["bbox"].shape == (2, 1, 4) and bool((target["cls"] == -1).all())
