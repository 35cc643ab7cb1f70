"""Stop (or skip) on a non-finite loss instead of silently training on garbage."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

NonFinitePolicy = Literal["raise", "skip"]
BufferSnapshot = list[tuple[Tensor, Tensor]]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def snapshot_buffers(module: nn.Module) -> BufferSnapshot:
    """Copies of ``module``'s buffers (BatchNorm running statistics), to undo a skipped batch's forward.

    A forward pass in training mode updates the running statistics before the loss is known; a
    NaN batch would leave them NaN (and every later evaluation NaN) even though its optimizer
    step is skipped.
    """
    return [(b, b.detach().clone()) for b in module.buffers()]


def check_loss(
    loss: Tensor, step: int, policy: NonFinitePolicy, context: str = "", restore: BufferSnapshot | None = None
) -> Tensor | None:
    """Return ``loss`` when finite; otherwise raise (``raise``) or return ``None`` (``skip``).

    Returning ``None`` from ``training_step`` makes Lightning skip the optimizer step for that
    batch, so no NaN reaches the weights; ``restore`` (from :func:`snapshot_buffers`, taken before
    the forward) puts the buffers back, so none reaches the running statistics either.

    Args:
        loss: The scalar training loss.
        step: The global step (named in the message).
        policy: ``"raise"`` stops the run; ``"skip"`` drops the batch with a warning naming the step.
        context: Extra words for the message (e.g. the loss parts).
        restore: Buffers to put back when the batch is skipped.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return loss
    value = loss.detach().float().item() if loss.numel() == 1 else float("nan")
    kind = "NaN" if math.isnan(value) else "infinite"
    where = f"at global step {step}{' (' + context + ')' if context else ''}"
    if policy == "skip":
        with torch.no_grad():
            for buffer, saved in restore or []:
                buffer.copy_(saved)
        warnings.warn(f"skipped a batch: training loss is {kind} ({value}) {where}", UserWarning, stacklevel=2)
        return None
    raise NonFiniteLossError(
        f"training loss is {kind} ({value}) {where}. "
        "Common causes: a learning rate that is too high, fp16 overflow (try precision='bf16-mixed' or "
        "a lower LR), or NaN/inf in the input data. Set `nonfinite_loss: skip` in the model config to "
        "drop such batches instead of stopping"
    )
