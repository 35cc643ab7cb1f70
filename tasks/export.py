"""``effbackbone export --ckpt run/best.ckpt --output model.onnx``: a trained task to ONNX.

The graph takes any batch, height and width unless ``--static`` fixes height and width. The task class
is read from the checkpoint (``_class_path``, which LightningCLI records); each task's exporter is
looked up in :data:`EXPORTERS` (:func:`~tasks.segmentation.export.export_segmentation_onnx`,
:func:`~tasks.detection.export.export_detection_onnx`: EfficientDet at its fixed ``image_size``). The file
carries the metadata ``effbackbone predict --ckpt_path <file>`` needs (:mod:`tasks.common.deploy`).
Checkpoints are read weights-only, and only their weights and hyperparameters are used (a checkpoint without
optimizer state exports too).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks.common.checkpoint_io import WEIGHT_SOURCES_OFF, safe_torch_load

DEFAULT_CLASS = "tasks.segmentation.SegmentationTask"
# Task class name -> "module:function" of its ONNX exporter (imported only when used).
EXPORTERS = {
    "SegmentationTask": "tasks.segmentation.export:export_segmentation_onnx",
    "DetectionTask": "tasks.detection.export:export_detection_onnx",
}


def exporter_for(task: Any) -> Callable[..., dict[str, Any]] | None:  # noqa: ANN401 - any LightningModule
    """The ONNX exporter of ``task``'s class (or of a base class), ``None`` when it has none."""
    for cls in type(task).__mro__:
        if cls.__name__ in EXPORTERS:
            module, _, func = EXPORTERS[cls.__name__].partition(":")
            return getattr(importlib.import_module(module), func)
    return None


#: A state-dict key each task's checkpoints have, for checkpoints saved without LightningCLI's ``_class_path``
#: (``Trainer.fit`` from Python, as in the pruning and frozen-BN fine-tunes of docs/deploy.md).
TASK_KEYS = {
    "tasks.detection.DetectionTask": "detector.model.class_net.",
    "tasks.instance.InstanceTask": "detector.roi_heads.",
}


def task_class_of(state_dict: Mapping[str, Any]) -> str:
    """The task class whose network the state dict holds (segmentation when no other matches)."""
    for class_path, prefix in TASK_KEYS.items():
        if any(key.startswith(prefix) for key in state_dict):
            return class_path
    return DEFAULT_CLASS


def load_task(ckpt: str | Path) -> Any:  # noqa: ANN401 - the LightningModule named in the checkpoint
    """Instantiate the task recorded in a Lightning checkpoint, weights loaded, in eval mode."""
    checkpoint = safe_torch_load(ckpt)
    hparams = checkpoint.get("hyper_parameters", {})
    class_path = str(hparams.get("_class_path") or task_class_of(checkpoint.get("state_dict") or {}))
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    from lightning.pytorch import LightningModule

    # The checkpoint picks the class; only ever instantiate a LightningModule from it.
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ValueError(f"{ckpt} names class {class_path!r}, which is not a LightningModule; refusing to load it")
    # The checkpoint has every weight: do not fetch the starting weights named in its hyper-parameters.
    off = {k: v for k, v in {**WEIGHT_SOURCES_OFF, "encoder_weights": None}.items() if k in hparams}
    return cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, **off).eval()


def main(argv: list[str] | None = None) -> int:
    """``effbackbone export --ckpt PATH --output model.onnx [--static --height H --width W --opset N --no-verify]``."""
    parser = argparse.ArgumentParser(prog="effbackbone export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (best.ckpt / last.ckpt)")
    parser.add_argument("--output", required=True, help="destination .onnx file")
    dynamic = "default: any batch, height and width"
    parser.add_argument("--static", action="store_true", help=f"fix height and width to --height x --width ({dynamic})")
    size = "of the example only, unless --static; default 256; detection: its image_size"
    parser.add_argument("--height", type=int, default=None, help=f"input height ({size})")
    parser.add_argument("--width", type=int, default=None, help=f"input width ({size})")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (segmentation; default 17)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint not found: {args.ckpt}")
    task = load_task(args.ckpt)
    export = exporter_for(task)
    if export is None:
        parser.error(f"{type(task).__name__} has no ONNX exporter; it cannot be exported from the CLI")
    sizes = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    info = export(task, args.output, **sizes, opset=args.opset, verify=not args.no_verify, dynamic=not args.static)
    output = Path(args.output)
    shape = " x ".join(str(s) for s in info["input"]["shape"])
    print(f"export: {output.parent} (2 files: {output.name}, {output.name}.json); input {shape}")
    if "max_abs_diff" in info:
        sizes = ", ".join(f"{h}x{w}" for h, w in info["verified_sizes"])
        print(f"onnxruntime vs PyTorch at {sizes}: max abs diff {info['max_abs_diff']:.2e}")
    return 0
