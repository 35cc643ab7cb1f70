"""The default learning-rate schedule of the tasks: linear warmup, then cosine decay, stepped per optimizer step.

EfficientNet (Tan & Le, 2019, §5) and EfficientNetV2 (§6.1) train with a short linear warmup followed by a decay;
the warmup keeps the first, large updates from wrecking pretrained encoder weights and the BatchNorm statistics,
and cosine decay (Loshchilov & Hutter, SGDR, 2017) ends at a small learning rate without a step to tune.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LRSchedule = Literal["warmup_cosine", "constant"]


def resolve_warmup(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    """Warmup length in optimizer steps: ``warmup_steps`` when given, else ``warmup_fraction`` of ``total_steps``.

    Raises:
        ValueError: A negative step count, or a fraction outside [0, 1).
    """
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return warmup_steps
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}; or set warmup_steps")
    return round(warmup_fraction * total_steps)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_factor: float) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimizer step ``s`` (0-based), for ``LambdaLR``.

    ``(s + 1) / warmup_steps`` during warmup (never 0: the first step already learns), then a half cosine from
    1 down to ``min_lr_factor`` at ``total_steps``; it stays at ``min_lr_factor`` after that.
    """
    if not 0.0 <= min_lr_factor <= 1.0:
        raise ValueError(f"min_lr_factor must be in [0, 1], got {min_lr_factor}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deferred_warmup_cosine(
    warmup_steps: int | None, warmup_fraction: float, min_lr_factor: float
) -> tuple[Callable[[int], float], Callable[[int], None]]:
    """:func:`warmup_cosine` whose run length is given later: ``(factor, set_total_steps)``.

    The length comes from the trainer's ``estimated_stepping_batches``, which sets up the training data;
    asking for it in ``configure_optimizers`` would set the data up before a resumed run's state is
    restored, and the resumed run would no longer equal an uninterrupted one. The task sets it in
    ``on_train_start`` instead. Until then the factor is 1. A closure, not a callable object: ``LambdaLR``
    saves an object's ``__dict__`` in the checkpoint, which a weights-only load refuses.
    """
    holder: dict[str, Callable[[int], float]] = {}

    def factor(step: int) -> float:
        return holder["f"](step) if "f" in holder else 1.0

    def set_total_steps(total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        warmup = resolve_warmup(total_steps, warmup_steps, warmup_fraction)
        holder["f"] = warmup_cosine(total_steps, warmup, min_lr_factor)

    return factor, set_total_steps


def build_warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int | None, warmup_fraction: float, min_lr_factor: float
) -> LambdaLR:
    """A ``LambdaLR`` with :func:`warmup_cosine` for every param group (each keeps its own base lr).

    The factor is a closure, so a checkpoint stores only the step count (``last_epoch``): a resumed run
    recomputes the shape from its own ``total_steps`` and continues at the saved step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = resolve_warmup(total_steps, warmup_steps, warmup_fraction)
    return LambdaLR(optimizer, warmup_cosine(total_steps, warmup, min_lr_factor))
