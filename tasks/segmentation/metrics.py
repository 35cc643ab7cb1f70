"""Segmentation metrics: IoU and Dice per class and averaged, and pixel accuracy, from torchmetrics.

Binary models (one sigmoid output) are scored as two classes, so background and foreground both
get an IoU. Classes absent from both prediction and target are left out of the averages (and are
NaN per class) instead of counting as 0 or 1.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import ClasswiseWrapper, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelAccuracy,
    MultilabelF1Score,
    MultilabelJaccardIndex,
)


class _ClassDice(MulticlassF1Score):
    """Per-class Dice (F1) that is NaN, not 0, for a class absent from prediction and target alike."""

    def compute(self) -> Tensor:
        """Per-class scores."""
        tp, fp, _, fn = self._final_state()
        return super().compute().masked_fill((tp + fp + fn) == 0, float("nan"))


class _LabelDice(MultilabelF1Score):
    """Per-label Dice (F1), NaN for a label absent from prediction and target alike."""

    def compute(self) -> Tensor:
        """Per-label scores."""
        tp, fp, _, fn = self._final_state()
        return super().compute().masked_fill((tp + fp + fn) == 0, float("nan"))


def build_metrics(mode: str, num_classes: int, class_names: list[str], ignore_index: int) -> MetricCollection:
    """``iou_<class>``, ``miou``, ``dice_<class>``, ``mdice`` and ``pixel_acc`` for ``mode``.

    Dice equals the F1 score over pixels. Pixel accuracy is the share of non-ignored pixels (of
    label planes, for multilabel) predicted right.
    """
    nan = float("nan")
    metrics: dict[str, Metric | MetricCollection]
    if mode == "multilabel":
        kw = {"num_labels": num_classes, "ignore_index": ignore_index}
        metrics = {
            "iou": ClasswiseWrapper(MultilabelJaccardIndex(average=None, zero_division=nan, **kw), class_names, "iou_"),
            "miou": MultilabelJaccardIndex(average="macro", **kw),
            "dice": ClasswiseWrapper(_LabelDice(average=None, **kw), class_names, "dice_"),
            "mdice": MultilabelF1Score(average="macro", **kw),
            "pixel_acc": MultilabelAccuracy(average="micro", **kw),
        }
    else:
        kw = {"num_classes": num_classes, "ignore_index": ignore_index}
        metrics = {
            "iou": ClasswiseWrapper(MulticlassJaccardIndex(average=None, zero_division=nan, **kw), class_names, "iou_"),
            "miou": MulticlassJaccardIndex(average="macro", **kw),
            "dice": ClasswiseWrapper(_ClassDice(average=None, **kw), class_names, "dice_"),
            "mdice": MulticlassF1Score(average="macro", **kw),
            "pixel_acc": MulticlassAccuracy(average="micro", **kw),
        }
    return MetricCollection(metrics)


def to_metric_input(logits: Tensor, mode: str) -> Tensor:
    """Hard predictions the metrics take: class ids N x H x W, or 0/1 planes N x C x H x W (multilabel)."""
    if mode == "multiclass":
        return logits.argmax(1)
    if mode == "binary":
        return (logits[:, 0] > 0).long()
    return (logits > 0).long()
