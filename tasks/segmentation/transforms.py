"""Albumentations pipelines for segmentation: geometric ops move image and mask together.

Masks are only ever resampled with nearest-neighbour interpolation (a blend of class 1 and 3 is
not class 2), which is set explicitly rather than trusted to a library default. Images enter as
float32 in [0, 1] (any number of channels) and are normalised afterwards, in the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import albumentations as A
import cv2

from tasks.common.randaugment import RandAugmentSpec, rand_augment

Split = Literal["train", "val", "test", "predict"]
EvalResize = Literal["resize", "pad"]


def build_transforms(
    split: Split,
    image_size: int,
    *,
    in_channels: int = 3,
    eval_resize: EvalResize = "pad",
    crop_scale: tuple[float, float] = (0.25, 1.0),
    vertical_flip: bool = False,
    color_jitter: float = 0.2,
    randaugment: RandAugmentSpec | None = None,
    fill: float | Sequence[float] = 0.0,
    fill_mask: int = -100,
) -> A.Compose:
    """The augmentation pipeline of one split.

    Args:
        split: ``train`` gets a random resized crop to ``image_size``, flips and colour jitter;
            ``val``/``test`` are kept at their own size (``eval_resize="pad"``, the default: the model
            pads to a multiple of 32 and crops back, and the batch collate pads differing sizes with the
            ignore label) or squashed to ``image_size`` (``"resize"``); ``predict`` keeps the image as is.
        image_size: Side of the square training crop and of the evaluation resize.
        in_channels: Image channels; colour jitter (hue, saturation) needs 3, other counts get
            brightness/contrast only.
        eval_resize: See ``split``.
        crop_scale: Area range of the random crop, as a fraction of the image.
        vertical_flip: Also flip vertically (for top-down imagery, microscopy).
        color_jitter: Strength of brightness/contrast/saturation jitter (0 turns it off).
        randaugment: RandAugment after the crop and flips (:mod:`tasks.common.randaugment`); ``None``: off.
        fill: Image value (per channel, in [0, 1]) of pixels that RandAugment's geometric ops shift in.
        fill_mask: Mask value of those pixels (the ignore label: the loss skips them).

    Returns:
        A ``Compose`` called as ``pipeline(image=..., mask=...)``.
    """
    if split == "train":
        ops: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=(image_size, image_size),
                scale=crop_scale,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            ),
            A.HorizontalFlip(p=0.5),
        ]
        if vertical_flip:
            ops.append(A.VerticalFlip(p=0.5))
        if randaugment is not None:
            ops.append(rand_augment(randaugment, channels=in_channels, fill=fill, fill_mask=fill_mask))
        if color_jitter > 0:
            j = (1 - color_jitter, 1 + color_jitter)
            if in_channels == 3:
                ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=(-0.05, 0.05), p=0.8))
            else:
                ops.append(
                    A.RandomBrightnessContrast(brightness_limit=color_jitter, contrast_limit=color_jitter, p=0.8)
                )
        return A.Compose(ops)
    if split in ("val", "test") and eval_resize == "resize":
        return A.Compose(
            [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
        )
    return A.Compose([])
