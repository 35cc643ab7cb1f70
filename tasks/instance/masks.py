"""Instance-mask formats: the one place where a mask changes format.

Four formats meet in instance segmentation, and each boundary has one converter here:

- ``segmentation`` in a COCO json: polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixels (one object may have
  several parts), an uncompressed RLE ``{"size": [h, w], "counts": [int, ...]}`` (COCO's crowd regions) or a
  compressed RLE ``{"size": [h, w], "counts": "<string>"}``. pycocotools rasterises all three
  (:func:`segmentation_to_rle`, :func:`decode_segmentation`), the same way ``COCOeval`` does.
- ``masks`` inside ``tasks``: ``(N, H, W)`` uint8 or bool, one per instance, aligned with ``boxes_xyxy``.
- torchvision's Mask R-CNN: targets ``{"boxes", "labels", "masks"}`` with labels 1-based (0 is the background
  class), detections with ``masks`` as ``(N, 1, 28, 28)`` probabilities inside each box
  (:func:`to_maskrcnn_targets`, :func:`from_maskrcnn_detections`, :func:`paste_masks`).
- ``segmentation`` in COCO results: compressed RLE with ``counts`` as a string, so it is json
  (:func:`encode_masks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.models.detection.roi_heads import paste_masks_in_image


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str = "annotation") -> dict[str, Any]:  # noqa: ANN401 - json
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE of ``height x width``.

    Polygon parts with fewer than three points are left out (a point or a line covers no pixel); an object whose
    parts are all such gives an empty mask.

    Raises:
        ValueError: naming ``where`` when the value is none of the three formats, a polygon has an odd number of
            coordinates, or an RLE's ``size`` is not the image's.
    """
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: its RLE segmentation has size {size} but the image is [{height}, {width}] "
                             "([height, width]); re-export the annotation for this image")  # fmt: skip
        if isinstance(segmentation["counts"], list):  # uncompressed (COCO's crowd regions)
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        if any(len(p) % 2 for p in segmentation):
            raise ValueError(f"{where}: a polygon has an odd number of coordinates; polygons are [x1, y1, x2, y2, ...]")
        parts = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
        if not parts:
            return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    raise ValueError(f"{where}: 'segmentation' must be a list of polygons or an RLE dict with 'size' and 'counts', "
                     f"got {type(segmentation).__name__}; re-export the annotations in COCO format")  # fmt: skip


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "annotation") -> np.ndarray:  # noqa: ANN401 - json
    """A COCO ``segmentation`` as a ``height x width`` uint8 mask (1 inside), see :func:`segmentation_to_rle`."""
    return mask_utils.decode(segmentation_to_rle(segmentation, height, width, where))


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W)`` masks (bool or 0/1) as compressed COCO RLEs with ``counts`` a string (json-ready)."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def to_maskrcnn_targets(
    boxes_xyxy: list[Tensor], labels: list[Tensor], masks: list[Tensor], device: torch.device
) -> list[dict[str, Tensor]]:
    """Per-image ``boxes_xyxy``, 0-based ``labels`` and ``(N, H, W)`` masks to torchvision's training targets.

    torchvision's detectors reserve label 0 for the background, so labels become ``label + 1``.
    """
    return [
        {"boxes": b.to(device, torch.float32), "labels": lab.to(device, torch.int64) + 1, "masks": m.to(device)}
        for b, lab, m in zip(boxes_xyxy, labels, masks, strict=True)
    ]


def from_maskrcnn_detections(detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Convert torchvision's detections to ours: ``boxes_xyxy``, ``scores``, 0-based ``labels`` and ``mask_probs``.

    ``mask_probs`` stay torchvision's ``(N, 1, M, M)`` per-box probabilities until :func:`paste_masks`.
    """
    return [
        {"boxes_xyxy": d["boxes"].float(), "scores": d["scores"].float(), "labels": d["labels"] - 1,
         "mask_probs": d["masks"]}
        for d in detections
    ]  # fmt: skip


def paste_masks(mask_probs: Tensor, boxes_xyxy: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """Per-box mask probabilities pasted into a ``height x width`` image and thresholded: ``(N, H, W)`` bool.

    As torchvision's own post-processing (``paste_masks_in_image``), but at the size the caller asks for: the
    original image, so masks are never resized after thresholding.
    """
    if len(mask_probs) == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=mask_probs.device)
    return paste_masks_in_image(mask_probs, boxes_xyxy, (height, width))[:, 0] > threshold


__all__ = [
    "decode_segmentation",
    "encode_masks",
    "from_maskrcnn_detections",
    "paste_masks",
    "segmentation_to_rle",
    "to_maskrcnn_targets",
]
