"""Optimizer parameter groups shared by the Lightning tasks."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer


def build_param_groups(
    module: nn.Module,
    weight_decay: float | None,
    *,
    trainable_only: bool = True,
    encoder: nn.Module | None = None,
    encoder_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group (each split again by encoder).

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
        encoder: A submodule of ``module`` (the pretrained encoder) whose parameters get ``encoder_lr_mult``.
        encoder_lr_mult: Learning-rate multiplier of the encoder's groups (layer-wise lr: a pretrained encoder
            usually wants a smaller lr than the freshly initialised decoder/head). At 1.0 no encoder groups
            are made, so the result is the plain two groups.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``
        (fewer entries when a group is empty), then the same two for the encoder with ``"lr_mult"`` when
        ``encoder_lr_mult != 1``. Pass it straight to ``torch.optim.AdamW(groups, lr=...)``: the per-group
        ``weight_decay`` overrides the optimizer's default; then call :func:`apply_lr_mult`.
    """
    if encoder_lr_mult <= 0:
        raise ValueError(f"encoder_lr_mult must be > 0, got {encoder_lr_mult} (freeze the encoder instead of 0)")
    in_encoder = {id(p) for p in encoder.parameters()} if encoder is not None and encoder_lr_mult != 1.0 else set()
    # (decay, no_decay) for the rest, then for the encoder.
    buckets: list[list[nn.Parameter]] = [[], [], [], []]
    for _, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        buckets[(0 if param.ndim >= 2 else 1) + (2 if id(param) in in_encoder else 0)].append(param)
    groups: list[dict[str, Any]] = []
    for i, params in enumerate(buckets):
        group: dict[str, Any] = {"params": params}
        if i % 2:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        if i >= 2:
            group["lr_mult"] = encoder_lr_mult
        groups.append(group)
    return [g for g in groups if g["params"]]


def apply_lr_mult(optimizer: Optimizer) -> Optimizer:
    """Scale each param group's ``lr`` by its ``"lr_mult"`` (once, right after the optimizer is built).

    Done after construction because the base lr lives in the optimizer's own arguments (the config's
    ``optimizer.init_args.lr``). A scheduler built afterwards takes each group's scaled lr as its base.
    """
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
    return optimizer
