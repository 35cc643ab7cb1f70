"""Stop (or skip) on a non-finite loss instead of silently training on garbage."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

NonFinitePolicy = Literal["raise", "skip"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def check_loss(loss: Tensor, step: int, policy: NonFinitePolicy, context: str = "") -> Tensor | None:
    """Return ``loss`` when finite; otherwise raise (``raise``) or return ``None`` (``skip``).

    Returning ``None`` from ``training_step`` makes Lightning skip the optimizer step for that
    batch, so no NaN reaches the weights.

    Args:
        loss: The scalar training loss.
        step: The global step (named in the message).
        policy: ``"raise"`` stops the run; ``"skip"`` drops the batch.
        context: Extra words for the message (e.g. the loss parts).
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return loss
    if policy == "skip":
        return None
    value = loss.detach().float().item() if loss.numel() == 1 else float("nan")
    kind = "NaN" if math.isnan(value) else "infinite"
    raise NonFiniteLossError(
        f"training loss is {kind} ({value}) at global step {step}{' (' + context + ')' if context else ''}. "
        "Common causes: a learning rate that is too high, fp16 overflow (try precision='bf16-mixed' or "
        "a lower LR), or NaN/inf in the input data. Set `nonfinite_loss: skip` in the model config to "
        "drop such batches instead of stopping"
    )
