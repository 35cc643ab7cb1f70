"""Instance segmentation: ``InstanceTask`` (Mask R-CNN on an effbackbone encoder + FPN) and ``CocoInstanceDataModule``.

Modules: ``task``, ``data`` (the detection reader plus masks), ``masks`` (the one converter at each boundary),
``coco_eval`` (box and mask AP), ``predict`` (COCO RLE results, drawings), ``synthetic`` (shapes with polygon,
RLE and crowd annotations). Reused from :mod:`tasks.detection`: COCO reading, categories, box formats, the
letterbox and COCO evaluation. Classes are imported lazily.
"""

from __future__ import annotations

from tasks._lazy import lazy_getattr

_LAZY = {
    "InstanceTask": "tasks.instance.task",
    "CocoInstanceDataModule": "tasks.instance.data",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
