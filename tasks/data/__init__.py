"""The data modules under their first path (``tasks.data.MaskDataModule`` in users' YAML files).

They live in :mod:`tasks.segmentation.data` and :mod:`tasks.detection.data` now; importing is lazy
(each pulls in its own dependencies).
"""

from __future__ import annotations

from tasks._lazy import lazy_getattr

_LAZY = {
    "MaskDataModule": "tasks.segmentation.data",
    "MaskDataset": "tasks.segmentation.data",
    "CocoDataModule": "tasks.detection.data",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
