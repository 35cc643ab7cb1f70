"""Semantic segmentation: ``SegmentationTask`` (any smp decoder on an effbackbone encoder) and ``MaskDataModule``.

Modules: ``task``, ``data`` (datasets, data module), ``io`` (masks on disk), ``transforms``, ``losses``,
``metrics``, ``viz`` (colours, panels), ``callbacks`` (validation overlays), ``tiling``, ``predict``
(writers), ``export`` (ONNX), ``synthetic`` (the quickstart's shapes). Classes are imported lazily.
"""

from __future__ import annotations

from tasks._lazy import lazy_getattr

_LAZY = {
    "SegmentationTask": "tasks.segmentation.task",
    "MaskDataModule": "tasks.segmentation.data",
    "MaskDataset": "tasks.segmentation.data",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
