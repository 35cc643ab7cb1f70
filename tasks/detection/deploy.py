"""A trained detector as a model file (ONNX or OpenVINO IR): its metadata, prediction from it, the quantize steps.

The file holds the EfficientDet network (BN folded), whose raw outputs are the class and box maps of P3-P7.
Turning them into boxes needs the anchors and effdet's decoding and NMS, so :func:`task_metadata` records the
detector's anchor and decoding settings (``anchor_scale``, ``aspect_ratios``, ``max_det_per_image``, ... of its
effdet config, fitted anchors included) besides the categories and the input size, and
:class:`DetectionFileModel` decodes the file's outputs with the very predictor the task uses
(:class:`~effbackbone.integrations.effdet_inference.FastDetBenchPredict`) and the task's own
``predict_step``: a file predicts boxes as its checkpoint does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from effbackbone.integrations.effdet_inference import FastDetBenchPredict
from tasks.common.deploy import TaskModel, check_agree, progress
from tasks.common.images import IMAGENET_MEAN, IMAGENET_STD
from tasks.detection.boxes import split_detections
from tasks.detection.coco_eval import coco_map, to_coco_results
from tasks.detection.data import CocoDetection, collate_detection
from tasks.detection.task import DetectionTask
from tasks.detection.transforms import build_det_transforms

NAME = "detection"
# The effdet config fields that anchors, decoding and NMS read (effdet's DetBenchPredict, Anchors.from_config).
DECODE_FIELDS = ("image_size", "num_classes", "min_level", "max_level", "num_levels", "num_scales", "aspect_ratios",
                 "anchor_scale", "max_detection_points", "max_det_per_image", "soft_nms")  # fmt: skip


def network(task: DetectionTask) -> nn.Module:
    """The EfficientDet that predicts (its EMA copy when the task keeps one), without effdet's bench."""
    return task.eval_bench().model


def task_metadata(task: DetectionTask) -> dict[str, Any]:
    """What predicting with the network needs besides it: the file's ``effbackbone.task`` entry."""
    config = OmegaConf.to_container(network(task).config, resolve=True)
    assert isinstance(config, dict)
    return {
        "name": NAME, "num_classes": task.num_classes, "class_names": list(task.class_names),
        "category_ids": [int(c) for c in task.category_ids], "image_size": task.image_size, "in_channels": 3,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "scale": "pixels / 255, letterboxed: longer side resized to image_size, padded at the bottom/right with the "
                 "mean, then (x - mean) / std",
        "detector": {k: config[k] for k in DECODE_FIELDS},
    }  # fmt: skip


class _RawOutputs:
    """The file as the network effdet's predictor wraps: called on images, with the config it reads."""

    def __init__(self, runtime: TaskModel, config: DictConfig) -> None:
        self.runtime = runtime
        self.config = config

    def __call__(self, images: Tensor) -> Any:  # noqa: ANN401 - ([class per level], [box per level])
        return self.runtime(images)


class DetectionFileModel(L.LightningModule):
    """``effbackbone predict`` with a model file (ONNX or OpenVINO) of a detection task instead of its checkpoint.

    The file's raw outputs are decoded by the task's own predictor (anchors, top-k, NMS) and mapped back to
    original pixels and COCO category ids by the task's own code, on the CPU with ONNX Runtime or OpenVINO.

    Args:
        file: An ``.onnx`` file from ``effbackbone export`` or ``effbackbone quantize``, or an OpenVINO ``.xml``
            from ``effbackbone quantize``.
        num_classes: Linked from the data: must equal the file's.
        image_size: Linked from the data (the letterbox side): must equal the file's.
        num_threads: Runtime threads (default: its own choice, the physical cores).
    """

    def __init__(
        self, file: str, num_classes: int | None = None, image_size: int | None = None, num_threads: int | None = None
    ) -> None:
        super().__init__()
        self.runtime = TaskModel(file, num_threads=num_threads)
        meta = self.runtime.task
        if meta["name"] != NAME:
            raise ValueError(f"{file} is a {meta['name']} model; use a detection config, or a {meta['name']} one")
        check_agree(meta, {"num_classes": num_classes, "image_size": image_size}, str(file), "the config's data")
        self.num_classes, self.image_size, self.in_channels = int(meta["num_classes"]), int(meta["image_size"]), 3
        self.category_ids: tuple[int, ...] = tuple(int(c) for c in meta["category_ids"])
        self.class_names: tuple[str, ...] = tuple(meta["class_names"])
        # A plain list: not a submodule, so Lightning never moves its anchors off the CPU that ONNX Runtime runs on.
        self._predictor = [FastDetBenchPredict(_RawOutputs(self.runtime, OmegaConf.create(meta["detector"])))]

    def forward(
        self, images: Tensor, img_scale: Tensor | None = None, img_size: Tensor | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image, as :meth:`DetectionTask.forward` (original pixels when ``img_size`` is given)."""
        predictor = self._predictor[0]
        if img_size is None:
            return split_detections(predictor(images.cpu(), None))
        info, scales = self._letterbox_info(img_size.cpu())
        return self._to_original(split_detections(predictor(images.cpu(), info)), scales)

    # The task's own code (it reads only image_size, category_ids and forward).
    _letterbox_info = DetectionTask._letterbox_info
    _to_original = staticmethod(DetectionTask._to_original)
    predict_step = DetectionTask.predict_step


FILE_MODEL = DetectionFileModel


# -- effbackbone quantize ----------------------------------------------------------------------------------


def check_data(meta: dict[str, Any], dm: Any, model_source: str, data_source: str) -> None:  # noqa: ANN401
    """Raise if the data module's categories or image size differ from the model's."""
    data = {"num_classes": dm.num_classes, "image_size": dm.image_size,
            "category_ids": list(dm.category_map.category_ids)}  # fmt: skip
    check_agree(meta, data, model_source, data_source)


def calibration_images(dm: Any, meta: dict[str, Any], batches: int) -> Iterator[Tensor]:  # noqa: ANN401
    """Up to ``batches`` batches of training images, letterboxed as for validation and prediction (no jitter)."""
    dm.prepare_data()  # a synthetic dataset is generated on first use
    split = dm.splits["train"]
    annotations = dm.annotation_file(split)
    fix = ("set data.init_args.root (in the config or as --data.init_args.root=...) to the data the model was "
           "trained on")  # fmt: skip
    if not annotations.is_file():
        raise ValueError(f"quantize calibrates on the training images, and {annotations} does not exist; {fix}")
    transforms = build_det_transforms("val", dm.image_size)
    dataset = CocoDetection(annotations, dm.root / dm.image_dir.format(split=split), transforms, dm.image_size,
                            dm.category_map)  # fmt: skip
    if len(dataset) == 0:
        raise ValueError(f"quantize calibrates on the training images, and {annotations} lists none; {fix}")
    order = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=dm.batch_size, shuffle=True, generator=order, collate_fn=collate_detection)
    for batch in itertools.islice(loader, batches):
        yield batch["image"]


@torch.no_grad()
def evaluate(model: Any, dm: Any, meta: dict[str, Any], limit: int | None, desc: str) -> dict[str, float]:  # noqa: ANN401
    """COCO AP, AP50, ... and per-class AP of ``model`` (a task or a file model) on the val split."""
    dm.setup("validate")
    loader = dm.val_dataloader()
    total = len(loader) if limit is None else min(limit, len(loader))
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for batch in progress(itertools.islice(loader, total), desc, total):
        detections = model(batch["image"], batch["img_scale"], batch["img_size"])
        ids = batch["image_id"].tolist()
        results += to_coco_results(ids, detections, meta["category_ids"])
        image_ids += ids
    names = dict(zip(meta["category_ids"], meta["class_names"], strict=True))
    return coco_map(loader.dataset.coco, results, image_ids, names)  # type: ignore[attr-defined]


def report_rows(
    float_metrics: dict[str, float], int8_metrics: dict[str, float], meta: dict[str, Any]
) -> list[tuple[str, float, float]]:
    """The rows ``quantize`` prints: AP, AP50, then the AP of each class."""
    rows = [(m, float_metrics[m], int8_metrics[m]) for m in ("AP", "AP50")]
    for name in meta["class_names"]:
        key = "AP_" + str(name).replace("/", "_")
        rows.append((f"AP {name}", float_metrics.get(key, float("nan")), int8_metrics.get(key, float("nan"))))
    return rows


__all__ = [
    "FILE_MODEL",
    "NAME",
    "DetectionFileModel",
    "calibration_images",
    "check_data",
    "evaluate",
    "network",
    "report_rows",
    "task_metadata",
]
