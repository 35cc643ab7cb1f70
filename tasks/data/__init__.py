"""Data modules and datasets for the tasks (imported lazily: each pulls in its own dependencies)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MaskDataModule": "tasks.data.masks",
    "MaskDataset": "tasks.data.masks",
    "CocoDataModule": "tasks.data.coco",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:  # noqa: ANN401 - a class
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks.data' has no attribute {name!r}")
