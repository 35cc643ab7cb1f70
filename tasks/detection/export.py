"""A trained detector to ONNX, with a json sidecar that says how to use it.

``effbackbone export`` (:mod:`tasks.export`) calls :func:`export_detection_onnx`. The file is the EfficientDet
network with BN folded (:func:`effbackbone.runtime.export_for_runtime`): input ``input`` ``(N, 3, S, S)``
letterboxed and normalised, outputs the class and box maps of P3-P7 (``class_P3`` ... ``box_P7``). Boxes come from
them through the anchors, effdet's decoding and NMS, whose settings are in the file's metadata;
``effbackbone predict --ckpt_path <file>`` does all of that (:mod:`tasks.detection.deploy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tasks.detection.deploy import network, task_metadata
from tasks.detection.task import DetectionTask


def _verify(path: Path, task: DetectionTask) -> float:
    """Largest |onnxruntime - PyTorch| over the raw outputs of a batch of 2."""
    from tasks.common.deploy import TaskModel

    size = task.image_size
    batch = torch.randn(2, 3, size, size)
    model = network(task)
    training = model.training
    with torch.no_grad():
        expected_cls, expected_box = model.eval()(batch)
    model.train(training)
    got_cls, got_box = TaskModel(path)(batch)
    pairs = [*zip(got_cls, expected_cls, strict=True), *zip(got_box, expected_box, strict=True)]
    return max(float((g - e.float()).abs().max()) for g, e in pairs)


def export_detection_onnx(
    task: DetectionTask,
    path: str | Path,
    *,
    height: int | None = None,
    width: int | None = None,
    opset: int | None = None,
    verify: bool = True,
    dynamic: bool = True,
) -> dict[str, Any]:
    """Export the task's EfficientDet to ONNX at its ``image_size`` (the anchors fix the input size).

    Args:
        task: The trained task.
        path: Destination ``.onnx`` file (a ``<path>.json`` sidecar is written next to it).
        height: Must be the task's ``image_size`` when given.
        width: Likewise.
        opset: Not supported (the runtime exporter's default opset is used); must be ``None``.
        verify: Compare onnxruntime's raw outputs with PyTorch's on a random batch.
        dynamic: Ignored: the batch is always dynamic, height and width never are.

    Returns:
        The sidecar's content, plus ``max_abs_diff`` and ``verified_sizes`` when verified.
    """
    from effbackbone.runtime import export_for_runtime

    size = task.image_size
    if (height or size, width or size) != (size, size):
        raise ValueError(f"an EfficientDet runs at its image_size only ({size} x {size}: its anchors are fixed); "
                         f"drop --height/--width or set them to {size}")  # fmt: skip
    if opset is not None:
        raise ValueError("--opset is not supported for detection exports (the runtime exporter's default is used)")
    path = Path(path)
    meta = task_metadata(task)
    example = torch.zeros(1, 3, size, size)
    export_for_runtime(network(task), path, example, mean=meta["mean"], std=meta["std"], metadata={"task": meta})
    levels = range(meta["detector"]["min_level"], meta["detector"]["max_level"] + 1)
    info: dict[str, Any] = {
        "input": {"name": "input", "shape": ["batch", 3, size, size], "mean": meta["mean"], "std": meta["std"],
                  "scale": meta["scale"]},
        "output": {"names": [f"{head}_P{lv}" for head in ("class", "box") for lv in levels],
                   "boxes": "anchors + effdet decoding + NMS with the settings of 'detector' (effbackbone predict "
                            "--ckpt_path <file> does it)"},
        "class_names": meta["class_names"], "category_ids": meta["category_ids"], "detector": meta["detector"],
    }  # fmt: skip
    if verify:
        info["max_abs_diff"] = _verify(path, task)
        info["verified_sizes"] = [[size, size]]
    Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
