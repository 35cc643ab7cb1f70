"""Albumentations pipelines for detection: letterbox to the model size, plus train-time jitter.

Boxes travel as ``pascal_voc`` (``boxes_xyxy`` in pixels) with ``labels`` as a label field, so
albumentations drops a label whenever it drops its box and the two stay aligned.

The letterbox keeps the aspect ratio and pads at the bottom/right only, so a box in model
coordinates maps back to the original image by a multiplication per axis (``letterbox_scales``: the
resized shorter side is rounded to whole pixels, so its factor differs slightly from the longer side's).
"""

from __future__ import annotations

from typing import Literal

import albumentations as A
import cv2
from torch import Tensor

from tasks.common.images import IMAGENET_MEAN, IMAGENET_STD
from tasks.common.randaugment import RandAugmentSpec, rand_augment

# The mean as uint8: padding with it becomes 0 after normalisation.
_PAD_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def letterbox_scale(width: int, height: int, image_size: int) -> float:
    """Original pixels per model pixel along the longer side (exact there; see :func:`letterbox_scales`)."""
    return max(width, height) / image_size


def letterbox_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The ``(width, height)`` the letterbox resizes an image to, rounded as albumentations' ``LongestMaxSize``."""
    scale = image_size / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def letterbox_scales(width: int, height: int, image_size: int) -> tuple[float, float]:
    """Original pixels per model pixel along x and along y.

    The shorter side is rounded to whole pixels (427 x 512/640 = 341.6 -> 342), so its factor differs from the
    longer side's: one factor for both would shift boxes by up to half a model pixel along the shorter side.
    """
    new_w, new_h = letterbox_size(width, height, image_size)
    return width / new_w, height / new_h


def boxes_to_original(boxes_xyxy: Tensor, width: float, height: float, image_size: int) -> Tensor:
    """``boxes_xyxy`` in letterboxed model pixels -> original-image pixels of a ``width`` x ``height`` image."""
    sx, sy = letterbox_scales(int(width), int(height), image_size)
    return boxes_xyxy * boxes_xyxy.new_tensor([sx, sy, sx, sy])


def _bbox_params(split: str) -> A.BboxParams:
    # Train crops can cut boxes: drop those mostly outside; the val pipeline never cuts any.
    min_visibility = 0.3 if split == "train" else 0.0
    return A.BboxParams(
        format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, min_width=1.0, min_height=1.0,
        clip=True,
    )  # fmt: skip


def build_det_transforms(
    split: Literal["train", "val", "test", "predict"],
    image_size: int,
    augment: bool = True,
    randaugment: RandAugmentSpec | None = None,
) -> A.Compose:
    """The pipeline for ``split``: letterbox + normalise, and for ``train`` (with ``augment``) jitter.

    Args:
        split: ``train`` gets horizontal flip, scale/translate jitter and colour jitter; the
            other splits only the letterbox.
        image_size: Square model input side in pixels (a multiple of 128 for EfficientDet P3-P7).
        augment: ``False`` gives the plain letterbox for ``train`` too (for overfitting checks).
        randaugment: ``train`` only: RandAugment after the letterbox (:mod:`tasks.common.randaugment`): boxes
            follow the geometric ops, clipped to the image, and those that leave it are dropped with their labels.

    Returns:
        A ``Compose`` called as ``t(image=hwc_uint8, bboxes=boxes_xyxy, labels=labels)``.
    """
    letterbox: list[A.BasicTransform] = [
        A.LongestMaxSize(max_size=image_size),
        A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=_PAD_FILL),
    ]
    jitter: list[A.BasicTransform] = []
    if split == "train" and randaugment is not None:
        jitter.append(rand_augment(randaugment, fill=_PAD_FILL))
    if split == "train" and augment:
        jitter += [  # after RandAugment, not instead of it
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), border_mode=cv2.BORDER_CONSTANT,
                     fill=_PAD_FILL, p=0.5),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]  # fmt: skip
    normalize = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return A.Compose([*letterbox, *jitter, normalize], bbox_params=_bbox_params(split))
