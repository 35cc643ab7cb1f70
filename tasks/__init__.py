"""Lightning tasks (segmentation, detection) on effbackbone encoders.

``tasks`` imports ``effbackbone``, never the reverse. The task classes are imported lazily so that
``import tasks.optim`` does not pull in Lightning, smp or effdet.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SegmentationTask": "tasks.segmentation",
    "DetectionTask": "tasks.detection",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
