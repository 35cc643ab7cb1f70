"""An exponential moving average (EMA) of a task's weights, used for validation, test and prediction.

EfficientNet (Tan & Le, 2019, §5) and EfficientDet (Tan et al., 2020, §5.1) evaluate an EMA of the weights with decay
0.9998; a short fine-tune wants a lower decay (0.99-0.999). The average includes the BatchNorm buffers.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def _ema_update_fn(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """EMA for ``AveragedModel(multi_avg_fn=...)`` with TF's warm-up ``min(decay, (1 + n) / (10 + n))``.

    The warm-up keeps the average from being dominated by the random initial weights in short runs.
    """

    def update(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if ema[0].is_floating_point():
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): copy
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)

    return update


def build_ema(network: nn.Module, decay: float) -> AveragedModel:
    """A frozen ``AveragedModel`` copy of ``network`` (parameters and buffers) updated with :func:`_ema_update_fn`."""
    ema = AveragedModel(network, multi_avg_fn=_ema_update_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def check_ema_decay(decay: float | None) -> None:
    """Raise ``ValueError`` unless ``decay`` is ``None`` or in (0, 1)."""
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) or None, got {decay}")


def match_ema_state(state: MutableMapping[str, Tensor], ema_enabled: bool, network_prefix: str) -> None:
    """Fit a checkpoint's ``state_dict`` in place to whether the task loading it keeps an EMA.

    A checkpoint trained with EMA loads into a task without it (its ``ema.*`` weights are dropped: the raw
    weights are evaluated), and one trained without EMA into a task with it (the EMA starts from the raw weights).

    Args:
        state: The checkpoint's ``state_dict``.
        ema_enabled: The loading task has an ``ema`` submodule.
        network_prefix: The state-dict prefix of the averaged network (``"detector."``, ``"model."``).
    """
    has_ema = any(k.startswith("ema.") for k in state)
    if not ema_enabled and has_ema:
        for key in [k for k in state if k.startswith("ema.")]:
            del state[key]
    elif ema_enabled and not has_ema:
        for key in [k for k in state if k.startswith(network_prefix)]:
            state["ema.module." + key.removeprefix(network_prefix)] = state[key].clone()
        state["ema.n_averaged"] = torch.tensor(0, dtype=torch.long)
