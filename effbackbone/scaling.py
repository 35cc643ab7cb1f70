"""Compound scaling and rounding, as in the paper and its reference implementation.

Pure Python: no torch import, so the rules can be read, tested and reused anywhere.

Rules (TF reference ``efficientnet_model.round_filters`` / ``round_repeats``; timm agrees):

* **Channels**: ``c * width`` rounded to the nearest multiple of 8, never below 8, and bumped by
  8 when rounding lost more than 10 % (:func:`round_filters`).
* **Repeats**: ``ceil(n * depth)`` per stage (:func:`round_repeats`).
* **Compound coefficient** (paper eq. 3): depth ``d = alpha^phi``, width ``w = beta^phi``,
  resolution ``r = gamma^phi`` with ``alpha * beta^2 * gamma^2 ~ 2`` so that FLOPs grow ~ ``2^phi``.
  Any real phi works, negative too.
* **Resolution**: ``224 * gamma^phi`` rounded to the nearest multiple of 8 (at least 32). The
  named variants B1-B7 use the authors' hand-picked resolutions instead (see ``arch.VARIANTS``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effbackbone.arch import StageSpec

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going more than 10 % below it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:  # never lose more than 10 % of the width
        rounded += divisor
    return rounded


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round it (TF reference ``round_filters``)."""
    return make_divisible(channels * width, divisor)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounding up (TF reference ``round_repeats``)."""
    return int(math.ceil(depth * repeats))


def round_resolution(resolution: float, multiple: int = 8) -> int:
    """Round an input resolution to the nearest multiple of ``multiple`` (at least 32)."""
    return max(32, int(round(resolution / multiple)) * multiple)


@dataclass(frozen=True)
class Compound:
    """The multipliers that one compound coefficient phi gives.

    Attributes:
        phi: The compound coefficient.
        depth: ``alpha^phi``.
        width: ``beta^phi``.
        resolution: ``224 * gamma^phi`` rounded by :func:`round_resolution`.
        flops_base: ``alpha * beta^2 * gamma^2`` (the paper constrains it to ~2).
    """

    phi: float
    depth: float
    width: float
    resolution: int
    flops_base: float


def compound(phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> Compound:
    """Multipliers for compound coefficient ``phi`` (paper section 3.3, eq. 3).

    Warns when ``alpha * beta^2 * gamma^2`` is more than 10 % away from 2: the model is still
    built, but FLOPs will not double per unit of phi as the paper intends.
    """
    if min(alpha, beta, gamma) < 1.0:
        raise ValueError(f"alpha, beta, gamma must be >= 1 (paper eq. 3), got {alpha}, {beta}, {gamma}")
    flops_base = alpha * beta**2 * gamma**2
    if abs(flops_base - 2.0) > 0.2:
        warnings.warn(
            f"alpha*beta^2*gamma^2 = {flops_base:.3f}; the paper constrains it to ~2 "
            "(FLOPs grow by that factor per unit of phi)",
            stacklevel=2,
        )
    return Compound(
        phi=phi,
        depth=alpha**phi,
        width=beta**phi,
        resolution=round_resolution(BASE_RESOLUTION * gamma**phi),
        flops_base=flops_base,
    )


def scale_stages(
    stages: tuple[StageSpec, ...], width: float, depth: float, fix_first_last: bool = False
) -> tuple[StageSpec, ...]:
    """Apply width and depth multipliers to a base stage table.

    Args:
        stages: The base table.
        width: Channel multiplier.
        depth: Repeat multiplier.
        fix_first_last: Keep the first and last stage's repeats (EfficientNet-Lite).
    """
    last = len(stages) - 1
    return tuple(
        replace(
            s,
            out_channels=round_filters(s.out_channels, width),
            repeats=s.repeats if fix_first_last and i in (0, last) else round_repeats(s.repeats, depth),
        )
        for i, s in enumerate(stages)
    )


def level_stages(strides: list[int], stem_stride: int = 2) -> list[int]:
    """Indices of the stages that end each pyramid level (the last stage before a stride change).

    Args:
        strides: Each stage's stride, in order.
        stem_stride: The stem's stride.

    Returns:
        One stage index per level, for levels of stride ``stem_stride * 2^k``.
    """
    ends: list[int] = []
    for i, _ in enumerate(strides):
        if i + 1 == len(strides) or strides[i + 1] > 1:
            ends.append(i)
    if stem_stride != 2 or strides[0] != 1:
        raise ValueError("expected a stride-2 stem followed by a stride-1 stage")
    return ends
