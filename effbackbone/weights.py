"""Loading published weights: timm, torchvision and efficientnet-pytorch layouts.

Our module names are timm's, so a timm state dict loads as it is; torchvision's positional keys
(``features.3.1.block.2.fc1.weight``) go through the short rename table :data:`TORCHVISION_RENAMES`,
applied block by block, and efficientnet-pytorch's flat ``_blocks.N._depthwise_conv`` keys through
:data:`EFFICIENTNET_PYTORCH_RENAMES`. This module reads files and state dicts; finding or
downloading a published file is :mod:`effbackbone.hub`'s job.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from effbackbone.layers import Conv2dSame, adapt_stem_weight
from effbackbone.model import EfficientNet

Layout = Literal["timm", "torchvision", "efficientnet_pytorch"]
StateDict = dict[str, Tensor]
# Padding a layout implies (True: TF "same" + BN eps 1e-3). efficientnet-pytorch (lukemelas) only holds
# TF ports; torchvision runs every checkpoint with symmetric padding; timm has both, so the source decides.
LAYOUT_TF_COMPAT: dict[str, bool] = {"efficientnet_pytorch": True, "torchvision": False}

# torchvision block-internal key -> ours (timm's), per block class. Stem, head and classifier are
# handled by TORCHVISION_OUTER.
TORCHVISION_RENAMES: dict[str, dict[str, str]] = {
    "DepthwiseSeparable": {
        "block.0.0": "conv_dw", "block.0.1": "bn1", "block.1.fc1": "se.conv_reduce",
        "block.1.fc2": "se.conv_expand", "block.2.0": "conv_pw", "block.2.1": "bn2",
    },
    "MBConv": {
        "block.0.0": "conv_pw", "block.0.1": "bn1", "block.1.0": "conv_dw", "block.1.1": "bn2",
        "block.2.fc1": "se.conv_reduce", "block.2.fc2": "se.conv_expand", "block.3.0": "conv_pwl",
        "block.3.1": "bn3",
    },
    "FusedMBConv": {"block.0.0": "conv_exp", "block.0.1": "bn1", "block.1.0": "conv_pwl", "block.1.1": "bn2"},
    "ConvBlock": {"block.0.0": "conv", "block.0.1": "bn1"},
}
# Lite-style MBConv without SE shifts torchvision's indices; not needed: torchvision has no Lite.

# efficientnet-pytorch (github.com/lukemelas/EfficientNet-PyTorch) block-internal names -> ours, per
# block class; its blocks are numbered flat (``_blocks.0`` .. ``_blocks.15`` for B0).
EFFICIENTNET_PYTORCH_RENAMES: dict[str, dict[str, str]] = {
    "DepthwiseSeparable": {
        "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pw", "_bn2": "bn2",
    },
    "MBConv": {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
        "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3",
    },
}
EFFICIENTNET_PYTORCH_OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                              "_fc": "classifier"}


class WeightsError(ValueError):
    """A checkpoint does not fit the model; the message lists the keys and the fix."""


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file, safely.

    Pickle files are read with ``weights_only=True``: a file that would run code is refused.
    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"state_dict_ema": ...}``) are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p} (pass a local .safetensors or .pth path)")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {p} needs safetensors: pip install safetensors") from e
        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"could not read {p} as a weights-only checkpoint ({type(e).__name__}: {e}). "
            "Files that need arbitrary pickled objects are refused; save with "
            "torch.save(model.state_dict()) or as .safetensors"
        ) from e
    return unwrap_state_dict(obj, str(p))


def unwrap_state_dict(obj: object, source: str = "state dict") -> StateDict:
    """Return the tensor mapping inside a checkpoint object."""
    if isinstance(obj, Mapping):
        for key in ("state_dict_ema", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {str(k).removeprefix("module."): v for k, v in obj.items()}
    raise WeightsError(f"{source} holds no state dict (a mapping of names to tensors)")


def detect_layout(sd: Mapping[str, Tensor]) -> Layout:
    """Tell the layout of a state dict by its key names: timm (and ours), torchvision or efficientnet-pytorch."""
    if "conv_stem.weight" in sd:
        return "timm"
    if "features.0.0.weight" in sd:
        return "torchvision"
    if "_conv_stem.weight" in sd:
        return "efficientnet_pytorch"
    sample = ", ".join(list(sd)[:5])
    raise WeightsError(
        f"unrecognised weight layout (first keys: {sample}); expected timm/effbackbone keys "
        "('conv_stem.weight', 'blocks.0.0...'), torchvision keys ('features.0.0.weight', ...) or "
        "efficientnet-pytorch keys ('_conv_stem.weight', '_blocks.0._depthwise_conv.weight', ...)"
    )


def torchvision_to_timm(sd: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """Rename a torchvision EfficientNet / EfficientNetV2 state dict to our (timm) names.

    Stages map one to one (torchvision ``features.{s+1}.{j}`` is our ``blocks.{s}.{j}``); inside a
    block, :data:`TORCHVISION_RENAMES` for the block's class does the rest.
    """
    blocks = model.blocks  # type: ignore[attr-defined]
    head = f"features.{len(blocks) + 1}."
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("features.0.0."):
            out["conv_stem." + key[len("features.0.0.") :]] = value
        elif key.startswith("features.0.1."):
            out["bn1." + key[len("features.0.1.") :]] = value
        elif key.startswith(head + "0."):
            out["conv_head." + key[len(head) + 2 :]] = value
        elif key.startswith(head + "1."):
            out["bn2." + key[len(head) + 2 :]] = value
        elif key.startswith("classifier.1."):
            out["classifier." + key[len("classifier.1.") :]] = value
        elif m := re.match(r"features\.(\d+)\.(\d+)\.(block\.\d+\.(?:\d+|fc1|fc2))\.(.+)", key):
            stage, idx, inner, param = int(m[1]) - 1, int(m[2]), m[3], m[4]
            if stage >= len(blocks) or idx >= len(blocks[stage]):
                out[key] = value  # reported as unexpected by the strict check
                continue
            table = TORCHVISION_RENAMES[type(blocks[stage][idx]).__name__]
            out[f"blocks.{stage}.{idx}.{table.get(inner, inner)}.{param}"] = value
        else:
            out[key] = value
    return out


def _full_blocks(model: nn.Module) -> nn.Module:
    """Every stage of ``model``'s configuration (a meta-device copy when stages were dropped)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return model.blocks  # type: ignore[attr-defined,no-any-return]
    with torch.device("meta"):
        return EfficientNet(cfg, features_only=True).blocks


def efficientnet_pytorch_to_timm(sd: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """Rename an efficientnet-pytorch ("lukemelas") state dict to our (timm) names.

    Its flat ``_blocks.N`` are numbered stage after stage, as ours; the block class at each position
    picks the rename table (:data:`EFFICIENTNET_PYTORCH_RENAMES`). Stages come from ``model.cfg``, so
    an encoder whose last stages were dropped (smp ``encoder_depth`` < 5) maps the same way.
    """
    flat = [(s, j, type(b).__name__) for s, stage in enumerate(_full_blocks(model)) for j, b in enumerate(stage)]
    out: StateDict = {}
    for key, value in sd.items():
        outer, _, rest = key.partition(".")
        if outer in EFFICIENTNET_PYTORCH_OUTER:
            out[f"{EFFICIENTNET_PYTORCH_OUTER[outer]}.{rest}"] = value
        elif m := re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)", key):
            n, inner, param = int(m[1]), m[2], m[3]
            table = EFFICIENTNET_PYTORCH_RENAMES.get(flat[n][2], {}) if n < len(flat) else {}
            if inner not in table:
                out[key] = value  # reported as unexpected by the strict check
                continue
            out[f"blocks.{flat[n][0]}.{flat[n][1]}.{table[inner]}.{param}"] = value
        else:
            out[key] = value
    return out


def to_tf_compat(model: nn.Module) -> nn.Module:
    """Switch a built model to what TF-ported weights need, in place: TF "same" padding, BN eps 1e-3.

    Equal to building it with ``tf_compat=True``: strided convolutions become :class:`Conv2dSame`
    (sharing their parameters), every BatchNorm takes eps 1e-3 and momentum 0.01, and ``model.cfg``
    records it. Used where a model exists before its weights are known (smp builds the encoder first).
    """
    for parent in list(model.modules()):
        for child_name, conv in list(parent.named_children()):
            if type(conv) is nn.Conv2d and conv.stride[0] > 1:
                with torch.device("meta"):
                    same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                                      conv.dilation[0], conv.groups, conv.bias is not None)
                same.weight, same.bias = conv.weight, conv.bias
                same.train(conv.training)
                setattr(parent, child_name, same)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.01
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        model.cfg = replace(cfg, padding="same", bn_eps=1e-3, bn_momentum=0.01)
    return model


def to_timm_layout(sd: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """Rename a torchvision or efficientnet-pytorch state dict to ours (a timm one is returned as it is)."""
    layout = detect_layout(sd)
    if layout == "torchvision":
        return torchvision_to_timm(sd, model)
    if layout == "efficientnet_pytorch":
        return efficientnet_pytorch_to_timm(sd, model)
    return dict(sd)


def load_weights(
    model: nn.Module, weights: str | os.PathLike[str] | Mapping[str, Tensor], stem_adapt: str = "repeat",
    *, adapt_padding: bool = True,
) -> list[str]:
    """Load timm-, torchvision- or efficientnet-pytorch-layout weights into ``model``, strictly.

    Head and classifier weights are dropped for a ``features_only`` model; a classifier of another
    size is skipped with a warning (fine-tuning to new classes); a 3-channel stem is adapted to the
    model's ``in_channels`` with ``stem_adapt`` (see :func:`effbackbone.layers.adapt_stem_weight`).
    With ``adapt_padding``, a layout that implies TF padding (efficientnet-pytorch) switches a
    symmetric-padding model to it (:func:`to_tf_compat`).

    Returns:
        The keys of the checkpoint that were deliberately not loaded.

    Raises:
        WeightsError: Keys are missing or unexpected, or shapes differ; the message lists them and
            names the detected layout.
    """
    sd = read_state_dict(weights) if isinstance(weights, (str, os.PathLike)) else unwrap_state_dict(weights)
    layout = detect_layout(sd)
    sd = to_timm_layout(sd, model)
    cfg = getattr(model, "cfg", None)
    if adapt_padding and LAYOUT_TF_COMPAT.get(layout) and cfg is not None and cfg.padding != "same":
        to_tf_compat(model)
    target = model.state_dict()
    skipped: list[str] = []
    for key in list(sd):
        if key not in target and key.split(".")[0] in ("conv_head", "bn2", "classifier"):
            skipped.append(key)  # a features_only model has no head
            del sd[key]
    head = ("classifier.weight", "classifier.bias")
    mismatched = [k for k in head if k in sd and k in target and sd[k].shape != target[k].shape]
    if mismatched:
        key = mismatched[0]
        warnings.warn(  # one warning for weight and bias
            f"classifier of the checkpoint has shape {tuple(sd[key].shape)}, the model "
            f"{tuple(target[key].shape)}: keeping the model's fresh classifier",
            stacklevel=2,
        )
        for key in mismatched:
            skipped.append(key)
            sd[key] = target[key]
    stem = sd.get("conv_stem.weight")
    if stem is not None and stem.shape[1] != target["conv_stem.weight"].shape[1]:
        want = target["conv_stem.weight"].shape[1]
        sd["conv_stem.weight"] = target["conv_stem.weight"] if stem_adapt == "random" else adapt_stem_weight(
            stem, want, stem_adapt
        )
    check_state_dict(sd, target, layout=layout)
    model.load_state_dict(sd, strict=True)
    return skipped


def check_state_dict(sd: Mapping[str, Tensor], target: Mapping[str, Tensor], *, layout: str | None = None) -> None:
    """Raise :class:`WeightsError` listing missing/unexpected keys and shape mismatches.

    ``layout`` (the checkpoint's detected layout) is named in the message.
    """
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    if not (missing or unexpected or shapes):
        return

    def fmt(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {fmt(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {fmt(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {fmt(shapes)}")
    found = f" ({layout} layout)" if layout else ""
    raise WeightsError(
        f"weights{found} do not fit this model: " + "; ".join(parts)
        + ". Check that the variant name matches the checkpoint (e.g. b3 weights need create_model('b3'))"
    )
