"""Regularisation strengths that can change during training without touching parameters or optimizer state.

Stochastic depth (Huang et al. 2016) is a :class:`~effbackbone.layers.DropPath` on the residual branch of each
effbackbone block; blocks built with rate 0 hold an ``nn.Identity`` there, which is swapped for a ``DropPath``
(neither has parameters or buffers, so the optimizer and checkpoints see the same tensors). Rates ramp linearly
over the blocks, ``rate * i / n_blocks``, as when the encoder is built (timm and the TF reference do the same).
"""

from __future__ import annotations

from torch import nn

from effbackbone.layers import DropPath


def residual_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The effbackbone blocks of ``encoder`` in order (each has ``has_skip`` and a ``drop_path`` module)."""
    return [m for m in encoder.modules() if hasattr(m, "has_skip") and isinstance(getattr(m, "drop_path", None),
                                                                                 (DropPath, nn.Identity))]  # fmt: skip


def set_drop_path_rate(encoder: nn.Module, rate: float) -> int:
    """Set the stochastic-depth rate of ``encoder``'s last block to ``rate`` (earlier blocks ramp from 0).

    Returns:
        The number of blocks.

    Raises:
        ValueError: ``rate`` outside [0, 1), or an encoder without effbackbone blocks.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    blocks = residual_blocks(encoder)
    if not blocks:
        raise ValueError(f"{type(encoder).__name__} has no effbackbone blocks whose drop-path rate could be set")
    for i, block in enumerate(blocks):
        block_rate = rate * i / len(blocks)
        if isinstance(block.drop_path, DropPath):
            block.drop_path.rate = block_rate
        elif block_rate > 0:
            block.drop_path = DropPath(block_rate)
    return len(blocks)


def drop_path_rates(encoder: nn.Module) -> list[float]:
    """The current stochastic-depth rate of each block (0 for an ``nn.Identity``)."""
    return [b.drop_path.rate if isinstance(b.drop_path, DropPath) else 0.0 for b in residual_blocks(encoder)]


def count_dropout(network: nn.Module) -> int:
    """Number of dropout layers (``nn.Dropout``, ``nn.Dropout2d``, ...) in ``network``."""
    return sum(isinstance(m, nn.modules.dropout._DropoutNd) for m in network.modules())


def set_dropout(network: nn.Module, p: float) -> int:
    """Set the probability of every dropout layer of ``network`` to ``p``; returns how many there are."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    layers = [m for m in network.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for layer in layers:
        layer.p = p
    return len(layers)


__all__ = ["count_dropout", "drop_path_rates", "residual_blocks", "set_drop_path_rate", "set_dropout"]
