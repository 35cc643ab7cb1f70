"""CutMix for segmentation: a box of another training image pasted, with the same box of its mask.

Yun et al. (2019), "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features": a
box covering a share ``1 - lambda`` of the image, ``lambda ~ Beta(1, 1)`` (uniform), centred uniformly and clipped
to the image. For dense targets the labels need no mixing: every pixel keeps the label of the image it now shows
(French et al. 2020, "Semi-supervised semantic segmentation needs strong, varied perturbations", use it so).
Pixels marked ignore keep that mark on both sides of the box edge, so the loss leaves out exactly the pixels it
left out before.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from tasks.common.mixing import MixingDataset, check_probability

Box = tuple[int, int, int, int]  # y0, y1, x0, x1: rows y0..y1-1, columns x0..x1-1


def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Box:
    """The CutMix box of an ``height`` x ``width`` image: sides ``sqrt(1 - lam)`` of the image's, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix(image: Tensor, mask: Tensor, other_image: Tensor, other_mask: Tensor, box: Box) -> tuple[Tensor, Tensor]:
    """``image`` and ``mask`` with ``box`` replaced by the same box of ``other_image`` and ``other_mask``.

    Images are ``C x H x W``; masks ``H x W`` (class ids) or ``C x H x W`` (multilabel planes). Both pairs must
    cover ``box``. The inputs are not modified.
    """
    y0, y1, x0, x1 = box
    image, mask = image.clone(), mask.clone()
    image[..., y0:y1, x0:x1] = other_image[..., y0:y1, x0:x1]
    mask[..., y0:y1, x0:x1] = other_mask[..., y0:y1, x0:x1]
    return image, mask


class CutMixDataset(MixingDataset):
    """Training samples, each CutMixed with another with probability ``p`` (``MaskDataModule(cutmix=p)``).

    Args:
        dataset: A training :class:`~tasks.segmentation.data.MaskDataset` (its crops share one size).
        p: Probability that a sample is mixed.
    """

    def __init__(self, dataset: Dataset[dict[str, Any]], p: float) -> None:
        super().__init__(dataset)
        self.p = check_probability("cutmix", p)

    def mix(self, index: int) -> dict[str, Any]:
        """Sample ``index``, with a box of another sample pasted in with probability ``p``."""
        sample = self.sample(index)
        if self.rng.random() >= self.p:
            return sample
        other = self.sample(self.other_index())
        # Crops share one size; otherwise the box stays inside both images.
        height = min(sample["image"].shape[-2], other["image"].shape[-2])
        width = min(sample["image"].shape[-1], other["image"].shape[-1])
        box = cut_box(height, width, float(self.rng.beta(1.0, 1.0)), self.rng)
        image, mask = cutmix(sample["image"], sample["mask"], other["image"], other["mask"], box)
        return {**sample, "image": image, "mask": mask}


__all__ = ["CutMixDataset", "cut_box", "cutmix"]
