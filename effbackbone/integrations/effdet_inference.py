"""Faster EfficientDet inference with the same detections as effdet's ``DetBenchPredict``.

Two parts, usable separately:

* :func:`post_process` replaces effdet's ``_post_process`` (the top-k over every anchor x class
  logit before NMS). effdet concatenates all levels into a ``[B, anchors, classes]`` tensor and
  runs ``topk`` over its 4.4M entries at 512 px (D0), which takes longer on a CPU than the class
  head. Here the k-th largest *per-anchor maximum* ``t`` is found first (a top-k over 49k values):
  at least k (anchor, class) pairs are >= t, so every one of the top k pairs is >= t and belongs to
  an anchor whose maximum is >= t. Only those anchors' rows (about k of them) enter the final top-k,
  which therefore returns the same values, anchors and classes, in the same order (up to the
  arbitrary order of exact ties, as with any top-k). With channels_last head outputs the per-level
  ``permute + reshape`` is a view, so nothing of size anchors x classes is copied.
* :func:`optimize_efficientdet_for_inference` returns a :class:`FastDetBenchPredict`: BN folded into
  the convolutions of our encoder and of effdet's BiFPN (:func:`effbackbone.fuse.fuse_bn`; the head's
  per-level BNs follow shared convolutions and stay), channels_last, and :func:`post_process`.

``DetBenchPredict``'s decode, NMS and output format (``[B, max_det, 6]``: x1, y1, x2, y2, score,
class) are effdet's own.
"""

from __future__ import annotations

import copy

import torch
from effdet import DetBenchPredict, EfficientDet
from effdet.bench import _batch_detection
from effdet.efficientdet import ConvBnAct2d, SeparableConv2d
from torch import Tensor, nn

from effbackbone.fuse import fuse_bn, register_conv_bn_pairs

register_conv_bn_pairs(SeparableConv2d, (("conv_pw", "bn"),))
register_conv_bn_pairs(ConvBnAct2d, (("conv", "bn"),))


def _flat(outputs: list[Tensor], width: int) -> list[Tensor]:
    """``[B, A * width, H, W]`` per level -> ``[B, H * W * A, width]`` (a view for channels_last)."""
    return [o.permute(0, 2, 3, 1).reshape(o.shape[0], -1, width) for o in outputs]


def post_process(
    cls_outputs: list[Tensor],
    box_outputs: list[Tensor],
    num_levels: int,
    num_classes: int,
    max_detection_points: int = 5000,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same as effdet's ``_post_process`` (arguments and outputs), with an exact top-k pre-filter.

    Returns:
        Logits ``[B, k, 1]``, box regressions ``[B, k, 4]``, anchor indices ``[B, k]`` and class
        indices ``[B, k]`` of the ``k = max_detection_points`` largest class logits, largest first.
    """
    cls_levels = _flat(cls_outputs[:num_levels], num_classes)
    boxes = torch.cat(_flat(box_outputs[:num_levels], 4), 1)  # [B, N, 4]: small
    batch, k = boxes.shape[0], max_detection_points
    anchor_max = torch.cat([c.amax(-1) for c in cls_levels], 1)  # [B, N]
    threshold = anchor_max.topk(min(k, anchor_max.shape[1]), dim=1).values[:, -1:]  # k-th largest anchor max
    offsets = [0]
    for c in cls_levels:
        offsets.append(offsets[-1] + c.shape[1])
    level_starts = torch.tensor(offsets[1:-1], device=anchor_max.device)
    scores, anchors, classes = [], [], []
    for b in range(batch):
        keep = (anchor_max[b] >= threshold[b]).nonzero().squeeze(1)  # sorted anchor ids, >= min(k, N) of them
        bounds = torch.searchsorted(keep, level_starts).tolist()
        parts = torch.tensor_split(keep, bounds)
        rows = torch.cat([c[b, ids - off] for c, ids, off in zip(cls_levels, parts, offsets, strict=False)], 0)
        values, flat = rows.reshape(-1).topk(k)
        scores.append(values)
        anchors.append(keep[flat // num_classes])
        classes.append(flat % num_classes)
    indices = torch.stack(anchors)
    box_topk = torch.gather(boxes, 1, indices.unsqueeze(2).expand(-1, -1, 4))
    return torch.stack(scores).unsqueeze(2), box_topk, indices, torch.stack(classes)


class FastDetBenchPredict(DetBenchPredict):
    """``DetBenchPredict`` with :func:`post_process`; optionally feeds the model channels_last inputs.

    Args:
        model: An effdet ``EfficientDet``.
        channels_last: Convert the input images to ``torch.channels_last`` first.
    """

    def __init__(self, model: EfficientDet, channels_last: bool = False) -> None:
        super().__init__(model)
        self.channels_last = channels_last

    def forward(self, x: Tensor, img_info: dict[str, Tensor] | None = None) -> Tensor:
        """Detections ``[B, max_det, 6]`` (x1, y1, x2, y2, score, class), as ``DetBenchPredict``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        class_out, box_out = self.model(x)
        class_out, box_out, indices, classes = post_process(
            class_out, box_out, self.num_levels, self.num_classes, self.max_detection_points
        )
        img_scale = None if img_info is None else img_info["img_scale"]
        img_size = None if img_info is None else img_info["img_size"]
        return _batch_detection(
            x.shape[0], class_out, box_out, self.anchors.boxes, indices, classes, img_scale, img_size,
            max_det_per_image=self.max_det_per_image, soft_nms=self.soft_nms,
        )  # fmt: skip


def optimize_efficientdet_for_inference(model: nn.Module, *, channels_last: bool = True) -> FastDetBenchPredict:
    """A fast predictor from an ``EfficientDet`` or any effdet bench wrapping one (the input is not changed).

    BN is folded into the convolutions of the encoder and the BiFPN (so the result is for inference
    only), the weights go channels_last (faster on CPU with oneDNN and on GPU with cuDNN), and the
    top-k uses :func:`post_process`. The detections equal ``DetBenchPredict(model.eval())``'s within
    float rounding of the folded convolutions.
    """
    detector = model.model if isinstance(getattr(model, "model", None), EfficientDet) else model
    if not isinstance(detector, EfficientDet):
        raise TypeError(f"expected an effdet EfficientDet or a bench wrapping one, got {type(model).__name__}")
    fused = fuse_bn(copy.deepcopy(detector), inplace=True)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return FastDetBenchPredict(fused, channels_last=channels_last).eval()


__all__ = ["FastDetBenchPredict", "optimize_efficientdet_for_inference", "post_process"]
