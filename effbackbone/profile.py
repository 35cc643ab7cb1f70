"""Parameter and multiply-add (MAC) counts of any ``nn.Module``, with forward hooks; torch only.

Counting rule (the one the EfficientNet papers' "FLOPs" use, and fvcore/thop agree on):

* ``nn.Conv2d`` (and subclasses such as TF "same" :class:`~effbackbone.layers.Conv2dSame`):
  ``output elements x in_channels / groups x kh x kw``.
* ``nn.Linear``: ``in_features x out_features`` per output row.
* Nothing else: BatchNorm, activations, SE gating products, pooling, residual adds and biases
  are ignored (they are a fraction of a percent of the total).

Because only output shapes are needed, the model may live on the ``meta`` device: build it with
``with torch.device("meta"): ...`` and a count of B7 at 600 px takes well under a second, with no
memory for weights or activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Cost:
    """Size and compute of a model at one input size.

    Attributes:
        params: Number of parameters (each shared parameter counted once).
        macs: Multiply-adds of one forward pass at batch size 1.
        input_size: ``(channels, height, width)`` the MACs were counted at.
    """

    params: int
    macs: int
    input_size: tuple[int, int, int]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (``trainable_only``: only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Conv2d, out: Tensor) -> int:
    kh, kw = module.kernel_size
    return out.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, out: Tensor) -> int:
    return out.numel() * module.in_features


def _first_tensor(out: object) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _input_shape(input_size: int | Sequence[int], in_channels: int) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        return (in_channels, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (in_channels, size[0], size[1])
    if len(size) == 3:
        return (size[0], size[1], size[2])
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def count_macs(model: nn.Module, input_size: int | Sequence[int], in_channels: int = 3) -> int:
    """Multiply-adds of one forward pass of ``model`` on a batch of one image.

    The model runs once in eval mode under ``torch.no_grad`` on its own device (use the ``meta``
    device for a shape-only pass) and is put back in its previous train/eval mode afterwards.

    Args:
        model: Any module whose ``forward`` takes one ``(1, C, H, W)`` tensor.
        input_size: ``S`` (square), ``(H, W)`` or ``(C, H, W)``.
        in_channels: Channels when ``input_size`` does not give them.

    Returns:
        Multiply-adds of the ``Conv2d`` and ``Linear`` layers (see the module docstring).
    """
    shape = _input_shape(input_size, in_channels)
    total = 0

    def hook(module: nn.Module, _inputs: tuple[object, ...], out: object) -> None:
        nonlocal total
        t = _first_tensor(out)
        if t is None:
            return
        if isinstance(module, nn.Conv2d):
            total += _conv_macs(module, t)
        elif isinstance(module, nn.Linear):
            total += _linear_macs(module, t)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=_model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def profile(model: nn.Module, input_size: int | Sequence[int], in_channels: int = 3) -> Cost:
    """Parameters and multiply-adds of ``model`` at ``input_size`` (see :func:`count_macs`).

    Example:
        >>> import torch, effbackbone
        >>> with torch.device("meta"):
        ...     model = effbackbone.create_model("b0", features_only=False)
        >>> cost = profile(model, 224)
        >>> round(cost.params / 1e6, 2), round(cost.macs / 1e9, 2)
        (5.29, 0.39)
    """
    shape = _input_shape(input_size, in_channels)
    return Cost(params=count_params(model), macs=count_macs(model, shape), input_size=shape)


__all__ = ["Cost", "count_macs", "count_params", "profile"]
