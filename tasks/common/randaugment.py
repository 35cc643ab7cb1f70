"""RandAugment (Cubuk et al. 2020) for dense targets, from albumentations ops.

Each sample gets ``num_ops`` ops drawn uniformly (with replacement) from the paper's 14, each applied at the
one global ``magnitude`` M with a random sign where the op has one. M is on the paper's scale, where 10 is the
reference maximum of every op (rotate 30 degrees, shear 0.3, translate 45% of the side, enhance factors
1 +- 0.9, posterize to 4 bits, solarize everything); values up to 30 extrapolate the same lines, as the TF
implementation does for EfficientNet's M = 15-28 (physically impossible values are clipped). Solarize and
posterize grow stronger with M (timm's "increasing" variants; TF's solarize threshold weakens with M).

Geometric ops (rotate, shear, translate) move the image, the masks (nearest neighbour) and the boxes
(``A.BboxParams`` of the enclosing ``Compose``: clipped to the image, boxes that leave it dropped together with
their labels); pixels brought in from outside the image are filled with ``fill`` in the image and ``fill_mask``
in the mask (the tasks' ignore label, so the loss skips them). Photometric ops change the image only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np

#: The paper's ops, in its order (Cubuk et al. 2020, §3).
OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
    "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
#: Each op's strength at M = 10 (the lines go through 0 at M = 0).
AT_MAX = {"rotate": 30.0, "shear": 0.3, "translate": 0.45, "enhance": 0.9, "posterize_bits": 4.0, "solarize": 1.0}


@dataclass(frozen=True)
class RandAugmentSpec:
    """``num_ops`` ops per sample at ``magnitude``; ``ops`` restricts the set drawn from (default: all 14)."""

    num_ops: int = 2
    magnitude: float = 9.0
    ops: tuple[str, ...] = OPS

    def __post_init__(self) -> None:
        if not isinstance(self.num_ops, int) or self.num_ops < 1:
            raise ValueError(f"randaugment num_ops must be an integer >= 1, got {self.num_ops!r}")
        if not 0.0 <= float(self.magnitude) <= 30.0:
            raise ValueError(f"randaugment magnitude must be in [0, 30] (10 = each op's reference maximum), got "
                             f"{self.magnitude}")  # fmt: skip
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"randaugment ops {unknown or '[]'} unknown; choose from {list(OPS)}")

    @classmethod
    def parse(cls, option: Mapping[str, Any] | None) -> RandAugmentSpec | None:
        """The spec of a data module's ``randaugment`` option (``None``: off)."""
        if option is None:
            return None
        unknown = set(option) - {"num_ops", "magnitude", "ops"}
        if unknown:
            raise ValueError(f"unknown randaugment key(s) {sorted(unknown)}; valid: num_ops, magnitude, ops")
        values = dict(option)
        if "ops" in values:
            values["ops"] = tuple(values["ops"])
        return cls(**values)


def _signed(op_plus: A.BasicTransform, op_minus: A.BasicTransform) -> A.BasicTransform:
    """One of the two directions, each with probability 1/2 (RandAugment's random sign)."""
    return A.OneOf([op_plus, op_minus], p=1.0)


def _affine(fill: Any, fill_mask: float, **kwargs: Any) -> A.Affine:  # noqa: ANN401 - albumentations fill
    return A.Affine(**kwargs, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=fill_mask, p=1.0)  # fmt: skip


def _geometric(name: str, m: float, fill: Any, fill_mask: float) -> A.BasicTransform:  # noqa: ANN401
    if name == "rotate":
        deg = AT_MAX["rotate"] * m
        return _signed(*(_affine(fill, fill_mask, rotate=(s * deg, s * deg)) for s in (1, -1)))
    if name.startswith("shear"):
        # PIL's shear factor s is tan(angle); albumentations takes the angle in degrees.
        deg = math.degrees(math.atan(AT_MAX["shear"] * m))
        axis = name[-1]
        return _signed(*(_affine(fill, fill_mask, shear={"x": (0.0, 0.0), "y": (0.0, 0.0), axis: (s * deg, s * deg)})
                         for s in (1, -1)))  # fmt: skip
    shift = min(1.0, AT_MAX["translate"] * m)
    axis = name[-1]
    return _signed(*(_affine(fill, fill_mask, translate_percent={"x": (0.0, 0.0), "y": (0.0, 0.0),
                                                                 axis: (s * shift, s * shift)})
                     for s in (1, -1)))  # fmt: skip


def _jitter(kind: str, factor: float, channels: int) -> A.BasicTransform:
    """PIL-style enhance ``factor`` of brightness/contrast/colour (1 = unchanged)."""
    if channels in (1, 3):
        values = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0)}
        values[kind] = (factor, factor)
        return A.ColorJitter(**values, hue=(0.0, 0.0), p=1.0)
    # ColorJitter takes 1 or 3 channels; other counts get albumentations' brightness/contrast.
    limit = (factor - 1.0, factor - 1.0)
    zero = (0.0, 0.0)
    if kind == "brightness":
        return A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=zero, p=1.0)
    return A.RandomBrightnessContrast(brightness_limit=zero, contrast_limit=limit, p=1.0)


def _photometric(name: str, m: float, channels: int) -> A.BasicTransform | None:
    if name == "identity":
        return A.NoOp()
    if name == "autocontrast":
        return A.AutoContrast(p=1.0)
    if name == "equalize":
        return A.Equalize(p=1.0) if channels in (1, 3) else None
    if name == "solarize":
        threshold = max(0.0, 1.0 - AT_MAX["solarize"] * m)  # of the value range: invert everything above it
        return A.Solarize(threshold_range=(threshold, threshold), p=1.0)
    if name == "posterize":
        bits = int(max(1, round(8 - AT_MAX["posterize_bits"] * m)))
        return A.Posterize(num_bits=(bits, bits), p=1.0)
    if name == "sharpness":
        # albumentations sharpens only; PIL's factors below 1 (blurring) have no counterpart here.
        alpha = min(1.0, AT_MAX["enhance"] * m)
        return A.Sharpen(alpha=(alpha, alpha), lightness=(1.0, 1.0), p=1.0)
    kind = {"color": "saturation", "contrast": "contrast", "brightness": "brightness"}[name]
    if kind == "saturation" and channels != 3:
        return None  # no colour to saturate
    up, down = 1.0 + AT_MAX["enhance"] * m, max(0.0, 1.0 - AT_MAX["enhance"] * m)
    return _signed(_jitter(kind, up, channels), _jitter(kind, down, channels))


class SignedMask(A.DualTransform):
    """Masks as int32, so that geometric ops can fill with a negative ignore label (uint8 would clip it)."""

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:  # noqa: ANN401 - albumentations params
        """The image is unchanged."""
        return img

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:  # noqa: ANN401
        """The mask as int32."""
        return mask.astype(np.int32, copy=False)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:  # noqa: ANN401
        """Boxes are unchanged."""
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """No arguments."""
        return ()


def rand_augment(
    spec: RandAugmentSpec,
    *,
    channels: int = 3,
    fill: float | Sequence[float] = 0,
    fill_mask: int | None = None,
) -> A.BaseCompose:
    """``spec.num_ops`` ops per sample at ``spec.magnitude``, as one albumentations block.

    Args:
        spec: Ops, count and magnitude.
        channels: Image channels (colour and equalize need 3, or 1 for equalize; they are left out otherwise).
        fill: Image value for pixels shifted in from outside (per channel, in the image's value range).
        fill_mask: Mask value for those pixels (e.g. the ignore label -100); ``None`` for pipelines without
            masks. With a value, masks come out as int32.

    Returns:
        A ``Sequential`` block to put inside a ``Compose`` (whose ``BboxParams`` govern boxes).
    """
    m = float(spec.magnitude) / 10.0
    ops: list[A.BasicTransform] = []
    for name in spec.ops:
        if name in GEOMETRIC:
            ops.append(_geometric(name, m, fill, fill_mask if fill_mask is not None else 0))
        else:
            op = _photometric(name, m, channels)
            if op is not None:
                ops.append(op)
    block: list[A.BasicTransform] = [SignedMask(p=1.0)] if fill_mask is not None else []
    block.append(A.SomeOf(ops, n=spec.num_ops, replace=True, p=1.0))
    return A.Sequential(block, p=1.0)


__all__ = ["AT_MAX", "GEOMETRIC", "OPS", "RandAugmentSpec", "SignedMask", "rand_augment"]
