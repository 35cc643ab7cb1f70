"""``effbackbone export --ckpt run/best.ckpt --output model.onnx``: a trained task to ONNX.

The task class is read from the checkpoint (``_class_path``, which LightningCLI records) and must
have an ``export_onnx(path, height=..., width=..., opset=..., verify=...)`` method; the
segmentation task's is :func:`export_segmentation_onnx`. Checkpoints are read weights-only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from tasks.checkpoint_io import safe_torch_load

if TYPE_CHECKING:
    from tasks.segmentation import SegmentationTask

DEFAULT_CLASS = "tasks.segmentation.SegmentationTask"


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
    baked in); the batch axis is dynamic. Tile larger images as :mod:`tasks.predict_seg` does. A
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


def load_task(ckpt: str | Path) -> Any:  # noqa: ANN401 - the LightningModule named in the checkpoint
    """Instantiate the task recorded in a Lightning checkpoint, weights loaded, in eval mode."""
    hparams = safe_torch_load(ckpt).get("hyper_parameters", {})
    class_path = str(hparams.get("_class_path", DEFAULT_CLASS))
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    from lightning.pytorch import LightningModule

    # The checkpoint picks the class; only ever instantiate a LightningModule from it.
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ValueError(f"{ckpt} names class {class_path!r}, which is not a LightningModule; refusing to load it")
    return cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()


def main(argv: list[str] | None = None) -> int:
    """``effbackbone export --ckpt PATH --output model.onnx [--height H --width W --opset N --no-verify]``."""
    parser = argparse.ArgumentParser(prog="effbackbone export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (best.ckpt / last.ckpt)")
    parser.add_argument("--output", required=True, help="destination .onnx file")
    parser.add_argument("--height", type=int, default=256, help="input height baked into the graph")
    parser.add_argument("--width", type=int, default=256, help="input width baked into the graph")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint not found: {args.ckpt}")
    task = load_task(args.ckpt)
    if not hasattr(task, "export_onnx"):
        parser.error(f"{type(task).__name__} has no export_onnx method; it cannot be exported from the CLI")
    info = task.export_onnx(
        args.output, height=args.height, width=args.width, opset=args.opset, verify=not args.no_verify
    )
    print(f"wrote {args.output} (+ {args.output}.json)")
    if "max_abs_diff" in info:
        print(f"onnxruntime vs PyTorch: max abs diff {info['max_abs_diff']:.2e}")
    return 0
