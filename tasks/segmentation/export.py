"""A trained segmentation model to ONNX, with a json sidecar that says how to use it.

``effbackbone export`` (:mod:`tasks.export`) calls :func:`export_segmentation_onnx`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from tasks.segmentation.task import SegmentationTask


class _Logits(nn.Module):
    """The task's forward only (pad to 32, decoder, crop), without Lightning around it."""

    def __init__(self, task: SegmentationTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, image: Tensor) -> Tensor:
        return self.task(image)


def export_segmentation_onnx(
    task: SegmentationTask,
    path: str | Path,
    *,
    height: int = 256,
    width: int = 256,
    opset: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Export the task's model to ONNX: input ``image`` (N x C x H x W, normalised), output ``logits``.

    Height and width are fixed at export (any size, not only multiples of 32: the padding is
    baked in); the batch axis is dynamic. Tile larger images as :mod:`tasks.segmentation.predict` does. A
    ``<path>.json`` sidecar records what a deployment needs: mean/std, class names, mode, and how
    to turn logits into labels. With ``verify``, onnxruntime's output is compared with PyTorch's.

    Returns:
        The sidecar's content, plus ``max_abs_diff`` when verified.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _Logits(task).eval()
    example = torch.randn(1, task.in_channels, height, width)
    with torch.no_grad(), warnings.catch_warnings():
        # The pad-to-32 branch is traced as a constant, which is the point: H and W are fixed here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        # The TorchScript-based exporter (deprecated, hence the filter): much faster than dynamo on
        # CPU, and this graph has no dynamic shapes for dynamo to add.
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset or 17,
        )  # fmt: skip
    info: dict[str, Any] = {
        "input": {"name": "image", "shape": ["batch", task.in_channels, height, width],
                  "mean": task.mean, "std": task.std, "scale": "pixels / dtype max, then (x - mean) / std"},
        "output": {"name": "logits", "mode": task.mode,
                   "labels": {"multiclass": "argmax over axis 1", "binary": "logits[:, 0] > 0",
                              "multilabel": "logits > 0 per class"}[task.mode]},
        "class_names": task.class_names,
    }  # fmt: skip
    if verify:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        batch = torch.randn(2, task.in_channels, height, width)
        with torch.no_grad():
            expected = model(batch).numpy()
        got = session.run(["logits"], {"image": batch.numpy()})[0]
        info["max_abs_diff"] = float(np.abs(got - expected).max())
    Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
