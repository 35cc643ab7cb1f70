"""Mosaic and MixUp for detection: several letterboxed training samples combined into one, boxes kept aligned.

*Mosaic* (YOLOv4, Bochkovskiy et al. 2020; the 2x2 layout of mmdetection's ``Mosaic``): four images around a
random centre, each in its quadrant with its inner corner on the centre. Here the layout is built at half
scale, as mmdetection's 2S x 2S mosaic followed by a resize to S: the centre is drawn in [S/4, 3S/4] on each
axis (mmdetection's ``center_ratio_range=(0.5, 1.5)``), each image is shrunk by 2, and what falls outside the
S x S canvas is cut off. Only each image's letterboxed content is placed (not the padding the letterbox added
at its bottom/right). Boxes are scaled, shifted and clipped to their image's visible part; a box left with a
side under ``min_size`` pixels or under ``min_visibility`` of its area is dropped with its label, as the
training transforms drop cut boxes (``min_visibility`` 0.3, :mod:`tasks.detection.transforms`).

*MixUp* for detection (Zhang et al. 2019, "Bag of Freebies for Training Object Detection Neural Networks"):
two images blended pixel-wise, ``lam * a + (1 - lam) * b``, with the boxes of both. ``lam ~ Beta(32, 32)``
(YOLOv5's choice: 0.5 +- 0.06; YOLOX and mmdetection blend at 0.5), so both images stay about equally visible
and every box keeps a full weight in the loss, the usual practice. Zhang et al. weight each box's loss by its
image's ratio instead; with ratios this close to 0.5 that would scale all boxes alike, and effdet's losses take
no per-box weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from tasks.common.mixing import MixingDataset, check_probability
from tasks.detection.transforms import letterbox_size

MIXUP_ALPHA = 32.0  # Beta(alpha, alpha) of the blend ratio (YOLOv5)
MIN_VISIBILITY = 0.3  # the training transforms' min_visibility
MIN_SIZE = 2.0  # pixels; narrower boxes are dropped

Tile = tuple[Tensor, Tensor, Tensor]  # image C x h x w, boxes_xyxy (n, 4) in its pixels, labels (n,)


def _place(index: int, center: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """Top-left corner of quadrant ``index`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
    cx, cy = center
    return (cx - width if index in (0, 2) else cx), (cy - height if index in (0, 1) else cy)


def _clip_boxes(boxes: Tensor, region: tuple[int, int, int, int], min_visibility: float, min_size: float) -> Tensor:
    """Boxes clipped to ``region`` (x0, y0, x1, y1) and the mask of those kept."""
    x0, y0, x1, y1 = region
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = torch.stack([boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1),
                           boxes[:, 2].clamp(x0, x1), boxes[:, 3].clamp(y0, y1)], 1)  # fmt: skip
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_visibility * area)
    return clipped, keep


def mosaic(
    tiles: Sequence[Tile], size: int, center: tuple[int, int], scale: float = 0.5,
    min_visibility: float = MIN_VISIBILITY, min_size: float = MIN_SIZE,
) -> Tile:  # fmt: skip
    """Four tiles in a 2x2 layout around ``center`` on a ``size`` x ``size`` canvas (zeros: the normalised mean).

    Args:
        tiles: Four ``(image, boxes_xyxy, labels)``, in quadrant order top-left, top-right, bottom-left,
            bottom-right; each image is resized by ``scale`` and placed with its inner corner on ``center``.
        size: Canvas side.
        center: ``(x, y)`` of the centre in canvas pixels.
        scale: Resize factor of every tile.
        min_visibility: Smallest kept share of a box's (scaled) area.
        min_size: Smallest kept box side, in canvas pixels.

    Returns:
        The canvas, the kept boxes in its pixels and their labels.
    """
    if len(tiles) != 4:
        raise ValueError(f"mosaic needs 4 tiles, got {len(tiles)}")
    canvas = tiles[0][0].new_zeros(tiles[0][0].shape[0], size, size)
    all_boxes, all_labels = [], []
    for k, (image, boxes, labels) in enumerate(tiles):
        h, w = image.shape[-2:]
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                              align_corners=False)[0]  # fmt: skip
        x, y = _place(k, center, new_w, new_h)
        region = (max(x, 0), max(y, 0), min(x + new_w, size), min(y + new_h, size))
        if region[2] <= region[0] or region[3] <= region[1]:
            continue
        canvas[:, region[1] : region[3], region[0] : region[2]] = image[
            :, region[1] - y : region[3] - y, region[0] - x : region[2] - x
        ]
        factor = boxes.new_tensor([new_w / w, new_h / h, new_w / w, new_h / h])
        moved = boxes.reshape(-1, 4).float() * factor + boxes.new_tensor([x, y, x, y]).float()
        clipped, keep = _clip_boxes(moved, region, min_visibility, min_size)
        all_boxes.append(clipped[keep])
        all_labels.append(labels[keep])
    return canvas, torch.cat(all_boxes).reshape(-1, 4), torch.cat(all_labels)


def mixup(a: Tile, b: Tile, lam: float) -> Tile:
    """``lam * a + (1 - lam) * b`` with the boxes and labels of both (images of one size)."""
    if a[0].shape != b[0].shape:
        raise ValueError(f"mixup needs images of one size, got {tuple(a[0].shape)} and {tuple(b[0].shape)}")
    return lam * a[0] + (1.0 - lam) * b[0], torch.cat([a[1], b[1]]).reshape(-1, 4), torch.cat([a[2], b[2]])


def _content(sample: dict[str, Any]) -> Tile:
    """The sample's image cut to its letterboxed content (the letterbox pads at the bottom/right)."""
    image = sample["image"]
    size = max(image.shape[-2:])
    if "img_size" in sample:
        w, h = (int(v) for v in sample["img_size"])
        cw, ch = letterbox_size(w, h, size)
        image = image[:, :ch, :cw]
    return image, sample["boxes_xyxy"], sample["labels"]


class MosaicMixUpDataset(MixingDataset):
    """Training samples turned into a mosaic with probability ``mosaic``, then mixed up with ``mixup``.

    The MixUp partner is built the same way (a mosaic with probability ``mosaic``), as in YOLOv5. The mixed
    sample keeps the first sample's ``image_id``, ``img_size`` and ``file_name`` (used by evaluation only).

    Args:
        dataset: A training :class:`~tasks.detection.data.CocoDetection` (letterboxed to one size).
        mosaic: Probability of a mosaic.
        mixup: Probability of a MixUp.
    """

    def __init__(self, dataset: Dataset[dict[str, Any]], mosaic: float, mixup: float) -> None:
        super().__init__(dataset)
        self.mosaic = check_probability("mosaic", mosaic)
        self.mixup = check_probability("mixup", mixup)

    def mix(self, index: int) -> dict[str, Any]:
        """Sample ``index``, as a mosaic and/or a MixUp or as is."""
        first, tile = self._mosaic_or_single(index)
        if self.rng.random() < self.mixup:
            _, other = self._mosaic_or_single(self.other_index())
            tile = mixup(tile, other, float(self.rng.beta(MIXUP_ALPHA, MIXUP_ALPHA)))
        return {**first, "image": tile[0], "boxes_xyxy": tile[1], "labels": tile[2]}

    def _mosaic_or_single(self, index: int) -> tuple[dict[str, Any], Tile]:
        sample = self.sample(index)
        if self.rng.random() >= self.mosaic:
            return sample, (sample["image"], sample["boxes_xyxy"], sample["labels"])
        others = [self.sample(self.other_index()) for _ in range(3)]
        size = sample["image"].shape[-1]
        cx, cy = (int(v) for v in self.rng.integers(size // 4, 3 * size // 4 + 1, size=2))
        order = self.rng.permutation(4)  # the first sample in any quadrant
        tiles = [_content(s) for s in (sample, *others)]
        return sample, mosaic([tiles[i] for i in order], size, (cx, cy))


__all__ = ["MIXUP_ALPHA", "MosaicMixUpDataset", "mixup", "mosaic"]
