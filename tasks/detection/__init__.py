"""Object detection: ``DetectionTask`` (EfficientDet on an effbackbone encoder) and ``CocoDataModule``.

Modules: ``task``, ``data`` (COCO json datasets, data module), ``transforms`` (letterbox, jitter),
``boxes`` (the one converter at each boundary), ``coco_eval``, ``predict`` (writer, drawings),
``synthetic`` (the quickstart's shapes). Classes are imported lazily.
"""

from __future__ import annotations

from tasks._lazy import lazy_getattr

_LAZY = {
    "DetectionTask": "tasks.detection.task",
    "CocoDataModule": "tasks.detection.data",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
