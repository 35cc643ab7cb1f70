"""A trained segmentation model as a file (ONNX or OpenVINO IR): its metadata, prediction from it, the quantize steps.

:func:`task_metadata` is the file's ``effbackbone.task`` entry (mode, classes, mean/std, tiling);
:class:`SegmentationFileModel` runs ``effbackbone predict --ckpt_path model.onnx`` with the task's own
prediction code (tiling, probabilities, labels, the writer), so a file predicts as its checkpoint does.
``effbackbone quantize`` (:mod:`tasks.quantize`) uses :func:`network`, :func:`check_data`,
:func:`calibration_images`, :func:`evaluate` and :func:`report_rows`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tasks.common.deploy import TaskModel, check_agree, pad_to_multiple, progress
from tasks.common.images import default_stats
from tasks.segmentation.data import collate_padded
from tasks.segmentation.metrics import build_metrics, to_metric_input
from tasks.segmentation.task import SegmentationTask

NAME = "segmentation"


def task_metadata(task: SegmentationTask) -> dict[str, Any]:
    """What predicting with the task's network needs besides the network: the file's ``effbackbone.task`` entry."""
    mean, std = (
        (task.mean, task.std) if task.mean is not None and task.std is not None else default_stats(task.in_channels)
    )
    return {
        "name": NAME, "mode": task.mode, "num_classes": task.num_classes, "class_names": list(task.class_names),
        "in_channels": task.in_channels, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "size_divisibility": task.size_divisibility, "tile_size": task.tile_size, "tile_overlap": task.tile_overlap,
        "ignore_index": task.ignore_index, "scale": "pixels / dtype max, then (x - mean) / std",
    }  # fmt: skip


def network(task: SegmentationTask) -> nn.Module:
    """The network that predicts (the smp model; its EMA copy when the task keeps one)."""
    return task.eval_network()


class SegmentationFileModel(L.LightningModule):
    """``effbackbone predict`` with a model file (ONNX or OpenVINO) of a segmentation task instead of its checkpoint.

    The task's prediction code runs unchanged (:meth:`SegmentationTask.predict_step`: tiles larger images,
    probabilities, labels); only the network is the file, run by ONNX Runtime or OpenVINO on the CPU. The data-module
    values the CLI links into a model are checked against the file's.

    Args:
        file: An ``.onnx`` file from ``effbackbone export`` or ``effbackbone quantize``, or an OpenVINO ``.xml``
            from ``effbackbone quantize``.
        num_classes: Linked from the data: must equal the file's.
        class_names: Linked from the data (the file's names are used).
        in_channels: Linked from the data: must equal the file's.
        mode: Linked from the data: must equal the file's.
        mean: Linked from the data: the images are normalised with it, so it must equal the file's.
        std: Likewise.
        num_threads: Runtime threads (default: its own choice, the physical cores).
    """

    def __init__(
        self, file: str, num_classes: int | None = None, class_names: list[str] | None = None,
        in_channels: int | None = None, mode: str | None = None, mean: list[float] | None = None,
        std: list[float] | None = None, num_threads: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.runtime = TaskModel(file, num_threads=num_threads)
        meta = self.runtime.task
        if meta["name"] != NAME:
            raise ValueError(f"{file} is a {meta['name']} model; use a segmentation config, or a {meta['name']} one")
        given = {"num_classes": num_classes, "in_channels": in_channels, "mode": mode, "mean": mean, "std": std}
        check_agree(meta, given, str(file), "the config's data")
        self.mode, self.num_classes = str(meta["mode"]), int(meta["num_classes"])
        self.class_names: list[str] = list(meta["class_names"])
        self.in_channels = int(meta["in_channels"])
        self.mean, self.std = list(meta["mean"]), list(meta["std"])
        self.size_divisibility = int(meta["size_divisibility"])
        self.tile_size, self.tile_overlap = int(meta["tile_size"]), float(meta["tile_overlap"])

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``(N, C, H, W)`` for any size: padded to the network's multiple and cropped back, as the task."""
        h, w = image.shape[-2:]
        return self.runtime(pad_to_multiple(image.cpu(), self.size_divisibility))[..., :h, :w]

    # The task's own code, so that a file predicts exactly as its checkpoint does (they use only the
    # attributes set above and forward).
    probabilities = SegmentationTask.probabilities
    labels = SegmentationTask.labels
    predict_probabilities = SegmentationTask.predict_probabilities
    predict_step = SegmentationTask.predict_step


# -- effbackbone quantize ----------------------------------------------------------------------------------


def data_values(dm: Any) -> dict[str, Any]:  # noqa: ANN401 - a MaskDataModule
    """The data module's values that the model must agree with."""
    keys = ("num_classes", "in_channels", "mode", "mean", "std")
    return {k: getattr(dm, k, None) for k in keys}


def check_data(meta: dict[str, Any], dm: Any, model_source: str, data_source: str) -> None:  # noqa: ANN401
    """Raise if the data module's classes, channels, mode or normalisation differ from the model's."""
    check_agree(meta, data_values(dm), model_source, data_source)


def calibration_images(dm: Any, meta: dict[str, Any], batches: int) -> Iterator[Tensor]:  # noqa: ANN401
    """Up to ``batches`` batches of training images as evaluated (whole, not cropped), padded to the network's multiple.

    The images are the train split's, drawn in a fixed random order, through the validation transform: what
    the network sees at validation and prediction time, without the training crops and colour jitter.
    """
    dm.prepare_data()  # a synthetic dataset is generated on first use
    root = Path(dm.root)
    try:
        train, _ = dm._train_val_pairs()  # the data module's own split (a val folder, or the held-out share)
    except FileNotFoundError as e:
        raise ValueError(
            f"quantize calibrates on the training images, and {root / 'train'} has none ({e}); set data.init_args.root "
            "(in the config or as --data.init_args.root=...) to the data the model was trained on"
        ) from e
    dataset = dm._dataset([(image, None) for image, _ in train], "val")  # images only: no mask is read
    order = torch.Generator().manual_seed(0)
    size = int(dm.hparams.batch_size)
    loader = DataLoader(dataset, batch_size=size, shuffle=True, generator=order, collate_fn=collate_padded)
    for batch in itertools.islice(loader, batches):
        yield pad_to_multiple(batch["image"], int(meta["size_divisibility"]))


@torch.no_grad()
def evaluate(model: Any, dm: Any, meta: dict[str, Any], limit: int | None, desc: str) -> dict[str, float]:  # noqa: ANN401
    """The validation metrics (mIoU, per-class IoU, ...) of ``model`` (images -> logits) on the val split."""
    dm.setup("validate")
    loader = dm.val_dataloader()
    total = len(loader) if limit is None else min(limit, len(loader))
    metrics = build_metrics(meta["mode"], int(meta["num_classes"]), list(meta["class_names"]), meta["ignore_index"])
    for batch in progress(itertools.islice(loader, total), desc, total):
        logits = model(batch["image"]).float()
        metrics.update(to_metric_input(logits, meta["mode"]), batch["mask"])
    return {k: float(v) for k, v in metrics.compute().items()}


def report_rows(
    float_metrics: dict[str, float], int8_metrics: dict[str, float], meta: dict[str, Any]
) -> list[tuple[str, float, float]]:
    """The rows ``quantize`` prints: mIoU, then the IoU of each class."""
    rows = [("mIoU", float_metrics["miou"], int8_metrics["miou"])]
    for name in meta["class_names"]:
        key = f"iou_{name}"
        rows.append((f"IoU {name}", float_metrics.get(key, float("nan")), int8_metrics.get(key, float("nan"))))
    return rows


FILE_MODEL = SegmentationFileModel

__all__ = [
    "FILE_MODEL",
    "NAME",
    "SegmentationFileModel",
    "calibration_images",
    "check_data",
    "evaluate",
    "network",
    "report_rows",
    "task_metadata",
]
