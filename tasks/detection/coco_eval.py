"""COCO detection metrics, as pure functions.

``to_coco_results`` turns per-image predictions (``boxes_xyxy`` in original-image pixels,
0-based contiguous ``labels``) into COCO's results list (``bbox`` as ``[x, y, w, h]``, original
``category_id``); ``coco_map`` runs ``COCOeval`` on it and returns the six AP numbers. The evaluator is
faster-coco-eval's when it is installed (the same numbers, several times faster), else pycocotools'
(:mod:`tasks.detection.coco_backends`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from tasks.detection.boxes import xyxy_to_xywh
from tasks.detection.coco_backends import CocoBackend, run_cocoeval

# Names of COCOeval.stats[0:6], in order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(
    image_ids: Sequence[int], detections: Sequence[Mapping[str, Tensor]], category_ids: Sequence[int],
    score_threshold: float = 0.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per-image detections to COCO results dicts.

    Args:
        image_ids: COCO ``image_id`` of each entry of ``detections``.
        detections: ``{"boxes_xyxy": (N, 4), "scores": (N,), "labels": (N,)}`` per image, boxes
            in original-image pixels and labels contiguous ``0..K-1``.
        category_ids: COCO ``category_id`` of each label (``CategoryMap.category_ids``).
        score_threshold: Drop detections scoring below this.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` (plain Python types).
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(image_ids)} image ids for {len(detections)} detection entries")
    results: list[dict[str, Any]] = []
    for image_id, det in zip(image_ids, detections, strict=True):
        keep = det["scores"] >= score_threshold
        bbox_xywh = xyxy_to_xywh(det["boxes_xyxy"][keep].detach().float().cpu()).tolist()
        scores = det["scores"][keep].detach().float().cpu().tolist()
        labels = det["labels"][keep].detach().cpu().tolist()
        for box, score, label in zip(bbox_xywh, scores, labels, strict=True):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})  # fmt: skip
    return results


def coco_map(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    backend: CocoBackend = "auto",
    iou_type: Literal["bbox", "segm"] = "bbox",
) -> dict[str, float]:
    """COCO box (or mask, ``iou_type="segm"``) AP of ``results`` against ``coco_gt``.

    Args:
        coco_gt: Ground truth (``pycocotools.coco.COCO``).
        results: COCO results dicts (``to_coco_results``); may be empty.
        image_ids: Evaluate on these images only (the ones actually predicted, e.g. under
            ``limit_val_batches``); default: every image of ``coco_gt``.
        class_names: ``category_id`` -> name: also return ``AP_<name>`` and ``AP50_<name>`` per category
            (NaN for a category without ground truth in the evaluated images).
        backend: ``auto`` (faster-coco-eval when installed, else pycocotools), ``faster-coco-eval`` or
            ``pycocotools``.
        iou_type: ``bbox`` scores the results' ``bbox``, ``segm`` their ``segmentation`` (COCO RLE).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (and the per-class values). With no results every
        value is 0.0; COCOeval's -1 (no ground truth in that size range) is kept as -1.0.
    """
    ids = sorted(set(int(i) for i in image_ids)) if image_ids is not None else sorted(coco_gt.getImgIds())
    unknown = {int(r["image_id"]) for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results name image ids absent from the ground truth: {sorted(unknown)[:10]}")
    if not results or not ids:
        present = {a["category_id"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=ids, iscrowd=False))}
        per_class = {f"{m}_{str(n).replace('/', '_')}": 0.0 if c in present else math.nan
                     for c, n in (class_names or {}).items() for m in ("AP", "AP50")}  # fmt: skip
        return {**dict.fromkeys(COCO_METRICS, 0.0), **per_class}
    evaluator = run_cocoeval(coco_gt, results, ids, iou_type, backend)
    stats = {name: float(v) for name, v in zip(COCO_METRICS, evaluator.stats[:6], strict=True)}
    return {**stats, **(per_class_ap(evaluator, class_names) if class_names else {})}


def per_class_ap(evaluator: COCOeval, class_names: Mapping[int, str]) -> dict[str, float]:
    """``AP_<name>`` (IoU 0.50:0.95) and ``AP50_<name>`` of each category, from an accumulated ``COCOeval``.

    The values are COCOeval's own (all areas, 100 detections): its mean AP is the mean of these over the
    categories that have ground truth. A category without ground truth is NaN.
    """
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
    out: dict[str, float] = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        if category_id not in class_names:
            continue
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]  # iouThrs[0] is 0.5
        name = str(class_names[category_id]).replace("/", "_")
        out[f"AP_{name}"] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
        out[f"AP50_{name}"] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else math.nan
    return out
