"""Box-format conversions: the one place where a box changes format.

Three formats meet in detection and every field names its own:

- ``bbox_xywh``: COCO json, ``[x_min, y_min, width, height]`` in original-image pixels.
- ``boxes_xyxy``: everything inside ``tasks`` (datasets, transforms, predictions), ``[x1, y1, x2, y2]``.
- ``boxes_yxyx``: effdet's training targets, ``[y1, x1, y2, x2]``, with classes 1-based
  (effdet reserves 0 for background and pads with -1).

Each boundary has exactly one converter here: COCO json -> dataset (``xywh_to_xyxy``),
collate -> effdet (``to_effdet_targets``), effdet detections -> ours (``split_detections``),
ours -> COCO results (``xyxy_to_xywh`` via ``tasks.detection.coco_eval.to_coco_results``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def xywh_to_xyxy(bbox_xywh: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` rows to ``[x1, y1, x2, y2]`` rows (float32, shape ``(N, 4)``)."""
    b = np.asarray(bbox_xywh, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes_xyxy: Tensor) -> Tensor:
    """``[x1, y1, x2, y2]`` rows to COCO ``[x, y, w, h]`` rows."""
    return torch.cat([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], dim=1)


def clip_xyxy(
    boxes_xyxy: np.ndarray, width: float, height: float, min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and flag those left with a side shorter than ``min_size`` pixels.

    Returns:
        The clipped boxes and a boolean ``keep`` mask (False = degenerate: zero, negative or
        sub-pixel width or height, or entirely outside the image).
    """
    b = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = b[:, 0::2].clip(0.0, width)
    b[:, 1::2] = b[:, 1::2].clip(0.0, height)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    return b, keep


def to_effdet_targets(boxes_xyxy: list[Tensor], labels: list[Tensor]) -> dict[str, Tensor]:
    """Per-image ``boxes_xyxy`` and 0-based ``labels`` to effdet's padded training target.

    effdet's anchor labeler wants ``bbox`` as ``[y1, x1, y2, x2]`` and ``cls`` 1-based, padded
    to the same count per image with class -1 (which it filters out), so images without boxes
    are plain negatives.
    """
    n_max = max(1, max((len(b) for b in boxes_xyxy), default=0))
    ref = boxes_xyxy[0] if boxes_xyxy else torch.zeros(0, 4)
    bbox = ref.new_full((len(boxes_xyxy), n_max, 4), -1.0, dtype=torch.float32)
    cls = ref.new_full((len(boxes_xyxy), n_max), -1.0, dtype=torch.float32)
    for i, (b, lab) in enumerate(zip(boxes_xyxy, labels, strict=True)):
        if len(b):
            bbox[i, : len(b)] = b[:, [1, 0, 3, 2]].float()
            cls[i, : len(b)] = lab.float() + 1.0
    return {"bbox": bbox, "cls": cls}


def split_detections(detections: Tensor) -> list[dict[str, Tensor]]:
    """Split effdet's padded ``(B, max_det, 6)`` output to per-image ``boxes_xyxy``, ``scores`` and 0-based ``labels``.

    effdet returns ``[x1, y1, x2, y2, score, class]`` with 1-based classes and zero rows as
    padding; the padding (class 0) is dropped here.
    """
    out = []
    for det in detections:
        valid = det[:, 5] >= 1
        det = det[valid]
        out.append({"boxes_xyxy": det[:, :4].float(), "scores": det[:, 4].float(), "labels": det[:, 5].long() - 1})
    return out
