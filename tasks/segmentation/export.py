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
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from tasks.segmentation.task import SegmentationTask


class _Logits(nn.Module):
    """The task's forward (pad to the model's multiple, network, crop back) without Lightning around it.

    The padding is computed from the input's shape with tensor-friendly integer arithmetic and always
    applied (a zero-width pad when none is needed), so a traced graph keeps it as shape operations and
    works for any height and width; the task's own forward skips the pad with a Python branch, which a
    trace would freeze at the export size.
    """

    def __init__(self, task: SegmentationTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2], image.shape[-1]
        d = self.task.size_divisibility
        padded = F.pad(image, [0, (d - w % d) % d, 0, (d - h % d) % d])  # zeros = the mean after normalisation
        return self.task.model(self.task.prepare_images(padded))[..., :h, :w]


def _verify(path: Path, model: nn.Module, in_channels: int, sizes: list[tuple[int, int]]) -> float:
    """Largest |onnxruntime - PyTorch| over a batch of 2 at each ``(height, width)`` of ``sizes``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for height, width in sizes:
        batch = torch.randn(2, in_channels, height, width)
        with torch.no_grad():
            expected = model(batch).numpy()
        got = session.run(["logits"], {"image": batch.numpy()})[0]
        if got.shape != expected.shape:
            raise AssertionError(f"ONNX logits have shape {got.shape} for input {tuple(batch.shape)}, "
                                 f"PyTorch gives {expected.shape}")  # fmt: skip
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def _write_metadata(task: SegmentationTask, path: Path, fixed_size: tuple[int, int] | None) -> None:
    """The ``effbackbone.*`` entries of :mod:`effbackbone.runtime` files plus the task entry, in ``path``."""
    from effbackbone.runtime import write_metadata
    from tasks.segmentation.deploy import task_metadata

    meta = task_metadata(task)
    # The graph pads to the network's multiple itself: any size is valid input (size_divisibility 1).
    rules = {"channels": task.in_channels, "size_divisibility": 1, "fixed_size": fixed_size, "mean": meta["mean"],
             "std": meta["std"]}  # fmt: skip
    entries = {"kind": "segmentation", "variant": task.hparams.get("variant"), "input": rules, "outputs": "logits"}
    write_metadata(path, {**entries, "task": meta})


def export_segmentation_onnx(
    task: SegmentationTask,
    path: str | Path,
    *,
    height: int = 256,
    width: int = 256,
    opset: int | None = None,
    verify: bool = True,
    dynamic: bool = True,
) -> dict[str, Any]:
    """Export the task's model to ONNX: input ``image`` (N x C x H x W, normalised), output ``logits``.

    By default the batch, height and width are dynamic: any size works, not only multiples of 32 (the
    pad to the model's multiple and the crop back are in the graph); ``height`` x ``width`` is only the
    tracing example. With ``dynamic=False`` height and width are fixed at ``height`` x ``width`` (the
    batch stays dynamic). Tile very large images as :mod:`tasks.segmentation.predict` does. A
    ``<path>.json`` sidecar records what a deployment needs: mean/std, class names, mode, the input
    shape, and how to turn logits into labels. With ``verify``, onnxruntime's output is compared with
    PyTorch's at the export size and, when dynamic, at a second size of other parity. The file's own metadata
    (``effbackbone.*`` entries, :mod:`tasks.segmentation.deploy`) carries the same, so ``effbackbone predict
    --ckpt_path <file>`` runs it.

    Returns:
        The sidecar's content, plus ``max_abs_diff`` and ``verified_sizes`` when verified.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _Logits(task).eval()
    example = torch.randn(1, task.in_channels, height, width)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # Static: the shape arithmetic is traced as constants, which is the point there.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        # The TorchScript-based exporter (deprecated, hence the filter): much faster than dynamo on
        # CPU, and it keeps the shape arithmetic of the padding as graph operations.
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes}, opset_version=opset or 17,
        )  # fmt: skip
    _write_metadata(task, path, None if dynamic else (height, width))
    shape: list[str | int] = ["batch", task.in_channels, *(["height", "width"] if dynamic else [height, width])]
    info: dict[str, Any] = {
        "input": {"name": "image", "shape": shape, "mean": task.mean, "std": task.std,
                  "scale": "pixels / dtype max, then (x - mean) / std"},
        "output": {"name": "logits", "mode": task.mode,
                   "labels": {"multiclass": "argmax over axis 1", "binary": "logits[:, 0] > 0",
                              "multilabel": "logits > 0 per class"}[task.mode]},
        "class_names": task.class_names,
    }  # fmt: skip
    if verify:
        sizes = [(height, width)] + ([(height + 17, width + 33)] if dynamic else [])
        info["max_abs_diff"] = _verify(path, model, task.in_channels, sizes)
        info["verified_sizes"] = [list(s) for s in sizes]
    Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
