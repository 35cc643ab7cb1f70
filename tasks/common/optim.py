"""Optimizer parameter groups shared by the Lightning tasks."""

from __future__ import annotations

from typing import Any

from torch import nn


def build_param_groups(
    module: nn.Module, weight_decay: float | None, *, trainable_only: bool = True
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Weight decay is meant to shrink weight matrices and conv kernels; applied to normalisation
    scales/shifts and biases it only pulls them towards zero and hurts accuracy (the convention of
    nanoGPT, timm's ``param_groups_weight_decay`` and the EfficientNet reference). A parameter is
    exempt when it has fewer than two dimensions (every norm weight/bias and every bias is 1-D).
    Frozen parameters are left out unless ``trainable_only=False`` (needed when they are unfrozen
    later: an optimizer only ever updates the parameters it was built with, and skips those whose
    ``grad`` is None meanwhile). Empty groups are dropped so optimizers never see ``params=[]``.

    Args:
        module: The model whose ``named_parameters()`` are grouped.
        weight_decay: Decay for the weight group; the other group always gets 0. ``None`` leaves the
            weight group without a ``weight_decay`` key, so it takes the optimizer's own setting
            (the value in a config's ``optimizer.init_args``).
        trainable_only: Skip parameters with ``requires_grad=False``.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``
        (fewer entries when a group is empty). Pass it straight to ``torch.optim.AdamW(groups, lr=...)``:
        the per-group ``weight_decay`` overrides the optimizer's default.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    decay_group: dict[str, Any] = {"params": decay}
    if weight_decay is not None:
        decay_group["weight_decay"] = weight_decay
    groups = [decay_group, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
