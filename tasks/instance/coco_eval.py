"""COCO box and mask AP of instance predictions, on :mod:`tasks.detection.coco_eval`.

``to_instance_results`` writes one COCO result per detection with both ``bbox`` (``[x, y, w, h]``) and
``segmentation`` (compressed RLE), as detectron2's ``coco_instances_results.json`` does: ``COCO.loadRes`` reads
it for ``iouType="bbox"`` and ``"segm"`` alike. ``instance_map`` scores both: the box numbers under the
detection task's names (``AP``, ``AP50``, ...) and the mask numbers under the same names prefixed ``segm_``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from torch import Tensor

from tasks.detection.coco_eval import coco_map, to_coco_results
from tasks.instance.masks import encode_masks

SEGM_PREFIX = "segm_"


def to_instance_results(
    image_ids: Sequence[int], detections: Sequence[Mapping[str, Any]], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Per-image instance detections to COCO results dicts with ``bbox`` and ``segmentation``.

    Args:
        image_ids: COCO ``image_id`` of each entry of ``detections``.
        detections: ``{"boxes_xyxy", "scores", "labels"}`` per image (original-image pixels, labels ``0..K-1``)
            with either ``masks`` (``(N, H, W)`` bool, the original image's size) or ``segmentation`` (their
            COCO RLEs, :func:`~tasks.instance.masks.encode_masks`).
        category_ids: COCO ``category_id`` of each label.

    Returns:
        ``[{"image_id", "category_id", "bbox", "score", "segmentation": {"size", "counts"}}, ...]``.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(image_ids)} image ids for {len(detections)} detection entries")
    results: list[dict[str, Any]] = []
    for image_id, det in zip(image_ids, detections, strict=True):
        rles = det["segmentation"] if "segmentation" in det else encode_masks(det["masks"])
        boxes = to_coco_results([image_id], [det], category_ids)  # every detection: the threshold is 0
        results.extend({**box, "segmentation": rle} for box, rle in zip(boxes, rles, strict=True))
    return results


def instance_map(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """Box AP and mask AP of ``results`` (:func:`to_instance_results`) against ``coco_gt``.

    Returns:
        :func:`~tasks.detection.coco_eval.coco_map`'s keys for the boxes (``AP``, ``AP50``, ..., ``AP_<name>``),
        and the same keys prefixed ``segm_`` for the masks (``segm_AP``, ``segm_AP50``, ..., ``segm_AP_<name>``).
    """
    boxes = coco_map(coco_gt, results, image_ids, class_names)
    # Without "bbox", loadRes takes each result's area from its mask (with it, from the box), so the APs/APm/APl
    # size ranges count mask pixels, as the ground truth's "area" does (detectron2 drops it the same way).
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    masks = coco_map(coco_gt, masks_only, image_ids, class_names, iou_type="segm")
    return {**boxes, **{SEGM_PREFIX + k: v for k, v in masks.items()}}


def masks_as_rles(detection: Mapping[str, Tensor]) -> dict[str, Any]:
    """``detection`` with its ``masks`` replaced by their RLEs (``segmentation``): compact to keep or send."""
    out = {k: v for k, v in detection.items() if k != "masks"}
    out["segmentation"] = encode_masks(detection["masks"])
    return out


__all__ = ["SEGM_PREFIX", "instance_map", "masks_as_rles", "to_instance_results"]
