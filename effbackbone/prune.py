"""Structured pruning of MBConv expansion channels, and loading pruned checkpoints.

An MBConv block expands its input ``e`` times (1x1 ``conv_pw``), filters depthwise, gates with SE and
projects back (1x1 ``conv_pwl``). The expanded channels are internal to the block: removing channel
``c`` takes away row ``c`` of ``conv_pw`` (and of ``bn1``), the depthwise filter ``c`` (and ``bn2``),
input ``c`` of the SE reduce conv, output ``c`` of the SE expand conv and input ``c`` of ``conv_pwl``.
The block's input and output widths, and so every level's channels (``feature_specs``), the
residual adds and any decoder built on the encoder, stay as they are; the SE bottleneck width stays
too. Fused-MBConv (V2) blocks prune ``conv_exp`` rows the same way.

Channels are ranked per block by ``|gamma|`` of the BN before the projection (Liu et al., "Learning
Efficient Convolutional Networks through Network Slimming", ICCV 2017), whose removed channels' mean
output is folded into the next BN, or by the L1 / L2 norm of their ``conv_pw`` filter (Li et al.,
"Pruning Filters for Efficient ConvNets", ICLR 2017). Each block keeps a multiple of 8 channels
(vector width of the CPU kernels).

The pruned architecture is the per-block expanded widths, which the state dict's shapes carry:
:func:`load_pruned_state_dict` resizes a freshly built model to match a checkpoint and loads it, and
:func:`expansion_widths` gives the same record as a small dict (e.g. for a config file).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from effbackbone.blocks import FusedMBConv, MBConv

M = TypeVar("M", bound=nn.Module)
_EXPAND = {MBConv: "conv_pw", FusedMBConv: "conv_exp"}


def expandable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every MBConv / Fused-MBConv with an expansion, by module path (anywhere inside ``model``)."""
    return {name: m for name, m in model.named_modules() if type(m) in _EXPAND}


def expansion_widths(model: nn.Module) -> dict[str, int]:
    """The expanded width of every prunable block, ``{"blocks.1.0": 96, ...}`` (the architecture record)."""
    return {name: _expand_conv(m).out_channels for name, m in expandable_blocks(model).items()}


def prune_expansion(
    model: M,
    ratio: float,
    *,
    criterion: Literal["bn", "l1", "l2"] = "bn",
    divisor: int = 8,
    inplace: bool = False,
) -> M:
    """Remove the ``ratio`` least important expansion channels of every MBConv block.

    Args:
        model: An EfficientNet, or any model containing its blocks (an smp model, an EfficientDet).
        ratio: Fraction of each block's expanded channels to remove, in [0, 1).
        criterion: ``bn``: ``|gamma|`` of the BN before the projection (network slimming, Liu et al.
            2017), with the removed channels' mean output ``act(beta)`` folded into the projection's BN
            (blocks without SE); ``l1`` / ``l2``: norm of each channel's expansion filter (Li et al.
            2017). On trained weights ``bn`` keeps far more of the model (docs/deploy.md): trained
            filters include dead ones (norm ~0) whose channel still outputs the constant ``act(beta)``.
        divisor: Each block keeps a multiple of this many channels (at least ``divisor``).
        inplace: Change ``model`` instead of a deep copy.

    Returns:
        The pruned model (same mode). New parameters replace the pruned ones, so build the optimizer
        after pruning; BN statistics and the kept weights are preserved; fine-tune to recover.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if criterion not in ("bn", "l1", "l2"):
        raise ValueError(f"criterion must be 'bn', 'l1' or 'l2', got {criterion!r}")
    pruned = model if inplace else copy.deepcopy(model)
    for name, block in expandable_blocks(pruned).items():
        weight = _expand_conv(block).weight.detach()
        width = weight.shape[0]
        keep_n = max(divisor, int(round(width * (1.0 - ratio) / divisor)) * divisor)
        if keep_n >= width:
            continue
        if criterion == "bn":
            bn = _last_bn(block)
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError(f"criterion='bn' needs the BatchNorms of block {name} (prune before fusing BN)")
            score = bn.weight.detach().abs()
        else:
            flat = weight.flatten(1)
            score = flat.abs().sum(1) if criterion == "l1" else flat.pow(2).sum(1)
        keep = score.topk(keep_n).indices.sort().values  # keep the original channel order
        if criterion == "bn":
            _fold_removed_mean(block, keep)
        _select_channels(block, keep)
    return pruned


def resize_expansions(model: M, widths: Mapping[str, int]) -> M:
    """Give the named blocks these expanded widths (fresh weights, in place), to load a pruned checkpoint into.

    Raises:
        KeyError: A name in ``widths`` is not a prunable block of ``model``.
    """
    blocks = expandable_blocks(model)
    unknown = sorted(set(widths) - set(blocks))
    if unknown:
        raise KeyError(f"{unknown[:3]} are not MBConv blocks of this model (it has e.g. {list(blocks)[:3]})")
    for name, width in widths.items():
        block = blocks[name]
        current = _expand_conv(block).out_channels
        if width != current:
            if not 0 < width <= current:
                raise ValueError(f"block {name} has {current} expansion channels; cannot resize to {width}")
            _select_channels(block, torch.arange(width))
    return model


def widths_from_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """The expanded width of each of ``model``'s blocks in ``state_dict`` (its expansion conv's rows).

    Keys may carry a prefix (a Lightning checkpoint's ``model.``): each block is found by its path's suffix.
    """
    widths: dict[str, int] = {}
    for name, block in expandable_blocks(model).items():
        suffix = f"{name}.{_EXPAND[type(block)]}.weight"
        key = next((k for k in state_dict if k == suffix or k.endswith("." + suffix)), None)
        if key is not None:
            widths[name] = int(state_dict[key].shape[0])
    return widths


def load_pruned_state_dict(model: M, state_dict: Mapping[str, Tensor], *, strict: bool = True) -> M:
    """Resize ``model``'s blocks to the widths in ``state_dict``, then load it (in place).

    ``model`` is built as the unpruned one was (same ``create_model`` / smp / effdet arguments).
    """
    resize_expansions(model, widths_from_state_dict(model, state_dict))
    model.load_state_dict(state_dict, strict=strict)
    return model


# -- the surgery ---------------------------------------------------------------------------------


def _expand_conv(block: nn.Module) -> nn.Conv2d:
    return getattr(block, _EXPAND[type(block)])


def _last_bn(block: nn.Module) -> nn.Module:
    """The BN right before SE and the projection (``bn2`` of MBConv, ``bn1`` of Fused-MBConv)."""
    return block.bn2 if isinstance(block, MBConv) else block.bn1


@torch.no_grad()
def _fold_removed_mean(block: nn.Module, keep: Tensor) -> None:
    """Fold the removed channels' mean output into the projection BN's running mean.

    After BN a channel is about ``beta + gamma * N(0, 1)``; with small ``|gamma|`` it is about the constant
    ``act(beta)``, and its contribution ``W_pwl[:, c] * act(beta_c)`` to the projection can be kept as a
    shift of the next BN's mean. Blocks with SE are left alone: the gate varies per image.
    """
    bn_in, bn_out = _last_bn(block), (block.bn3 if isinstance(block, MBConv) else block.bn2)
    if not isinstance(block.se, nn.Identity) or not isinstance(bn_out, nn.BatchNorm2d):
        return
    removed = torch.ones(bn_in.num_features, dtype=torch.bool, device=keep.device)
    removed[keep] = False
    act = block.act2 if isinstance(block, MBConv) else block.act1
    mean_out = act(bn_in.bias.detach().clone())[removed]  # clone: the activations are in-place
    shift = block.conv_pwl.weight[:, removed, 0, 0].to(mean_out.dtype) @ mean_out
    bn_out.running_mean -= shift.to(bn_out.running_mean.dtype)


@torch.no_grad()
def _select_channels(block: nn.Module, keep: Tensor) -> None:
    """Keep expansion channels ``keep`` of ``block``: every tensor indexed by them is sliced."""
    if isinstance(block, MBConv):
        _slice_conv(block.conv_pw, keep, dim=0)
        _slice_bn(block.bn1, keep)
        _slice_conv(block.conv_dw, keep, dim=0)  # depthwise: one filter per channel
        block.conv_dw.in_channels = block.conv_dw.groups = len(keep)
        _slice_bn(block.bn2, keep)
    else:
        _slice_conv(block.conv_exp, keep, dim=0)
        _slice_bn(block.bn1, keep)
    se = block.se
    if not isinstance(se, nn.Identity):
        _slice_conv(se.conv_reduce, keep, dim=1)  # the SE width (its outputs) stays
        _slice_conv(se.conv_expand, keep, dim=0)
    _slice_conv(block.conv_pwl, keep, dim=1)


def _slice_conv(conv: nn.Conv2d, keep: Tensor, dim: int) -> None:
    conv.weight = nn.Parameter(conv.weight.index_select(dim, keep).clone(), conv.weight.requires_grad)
    if dim == 0:
        conv.out_channels = len(keep)
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[keep].clone(), conv.bias.requires_grad)
    else:
        conv.in_channels = len(keep) * conv.groups


def _slice_bn(bn: nn.Module, keep: Tensor) -> None:
    if not isinstance(bn, nn.BatchNorm2d):  # folded into the conv (fast mode): nothing to slice
        return
    bn.num_features = len(keep)
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, nn.Parameter(p[keep].clone(), p.requires_grad))
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(bn, name, getattr(bn, name)[keep].clone())


__all__ = [
    "expandable_blocks",
    "expansion_widths",
    "load_pruned_state_dict",
    "prune_expansion",
    "resize_expansions",
    "widths_from_state_dict",
]
