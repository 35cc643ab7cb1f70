"""Lightning tasks on effbackbone encoders, one package per task over a shared base.

- :mod:`tasks.common`: ``BaseTask`` (optimizer, non-finite guard, channels_last, channel check),
  checkpoint IO, prediction writers, samplers, the DDP per-image merge, image reading, input checks.
- :mod:`tasks.segmentation`: ``SegmentationTask``, ``MaskDataModule`` and their data, losses, metrics,
  pictures, tiling, prediction and ONNX export.
- :mod:`tasks.detection`: ``DetectionTask``, ``CocoDataModule`` and their transforms, box formats, COCO
  evaluation and prediction.
- :mod:`tasks.instance`: ``InstanceTask`` (Mask R-CNN), ``CocoInstanceDataModule`` and their mask formats, box
  and mask AP, and prediction; built on the detection package's reading, categories and evaluation.
- :mod:`tasks.cli` (the ``effbackbone`` command), :mod:`tasks.quickstart`, :mod:`tasks.export`.

``tasks`` imports ``effbackbone``, never the reverse. Classes are imported lazily, so ``import tasks``
pulls in neither Lightning, smp nor effdet. Module paths from before the split (``tasks.data.masks``,
``tasks.predict_seg``, ``tasks.callbacks``, ...) keep working: checkpoints and users' YAML files name them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

from tasks._lazy import lazy_getattr

_LAZY = {
    "SegmentationTask": "tasks.segmentation.task",
    "DetectionTask": "tasks.detection.task",
    "InstanceTask": "tasks.instance.task",
}
# Old module path -> where its contents live now.
MOVED_MODULES = {
    "tasks.boxes": "tasks.detection.boxes",
    "tasks.callbacks": "tasks.segmentation.callbacks",
    "tasks.checkpoint_io": "tasks.common.checkpoint_io",
    "tasks.data.coco": "tasks.detection.data",
    "tasks.data.det_transforms": "tasks.detection.transforms",
    "tasks.data.mask_io": "tasks.segmentation.io",
    "tasks.data.masks": "tasks.segmentation.data",
    "tasks.data.sampling": "tasks.common.sampling",
    "tasks.data.synthetic": "tasks.segmentation.synthetic",
    "tasks.data.synthetic_coco": "tasks.detection.synthetic",
    "tasks.data.transforms": "tasks.segmentation.transforms",
    "tasks.eval": "tasks.detection.coco_eval",
    "tasks.eval.coco": "tasks.detection.coco_eval",
    "tasks.guards": "tasks.common.guards",
    "tasks.optim": "tasks.common.optim",
    "tasks.predict_det": "tasks.detection.predict",
    "tasks.predict_seg": "tasks.segmentation.predict",
    "tasks.seg_losses": "tasks.segmentation.losses",
    "tasks.seg_metrics": "tasks.segmentation.metrics",
    "tasks.seg_viz": "tasks.segmentation.viz",
    "tasks.validation": "tasks.common.checks",
    "tasks.writers": "tasks.common.writers",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a thin module that forwards every attribute to the new module.

    The classes are the same objects (``tasks.data.masks.MaskDataModule is
    tasks.segmentation.data.MaskDataModule``), so ``isinstance`` checks and checkpoints agree.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:  # noqa: ANN401, D102
        if fullname not in MOVED_MODULES:
            return None
        # A moved package (``tasks.eval``) must be a package for its old submodules to import.
        is_package = any(name.startswith(fullname + ".") for name in MOVED_MODULES)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:  # noqa: D102
        return None

    def exec_module(self, module: ModuleType) -> None:  # noqa: D102
        target = importlib.import_module(MOVED_MODULES[module.__name__])
        module.__doc__ = f"Moved to :mod:`{target.__name__}` (this path keeps working)."
        module.__getattr__ = lambda name: getattr(target, name)  # type: ignore[method-assign]
        module.__all__ = list(getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")]))


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
