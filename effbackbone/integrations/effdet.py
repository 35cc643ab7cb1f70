"""EfficientDet D0-D7 (effdet's BiFPN, class/box heads and anchors) on our encoder.

:func:`create_efficientdet` takes effdet's ``tf_efficientdet_dN`` config (paper compound scaling:
input ``512 + 128 * phi``, BiFPN width/depth, head depth; D7 keeps D6's B6 backbone at 1536 px, D7x
uses B7) and swaps the backbone name for our timm entrypoint ``effbackbone_bN`` built with
``tf_compat=True`` (TF "same" padding, BN eps 1e-3), exactly as effdet builds ``tf_efficientnet_bN``.
The result is effdet's own ``EfficientDet`` module with identical state-dict keys and parameter
counts, so effdet's COCO checkpoints load unchanged and ``DetBenchTrain``/``DetBenchPredict`` work.
``pretrained="coco"`` fetches effdet's published checkpoint of the model (its config's ``url``, hash-checked,
cached by torch.hub; base URL ``$EFFBACKBONE_EFFDET_BASE_URL``) through :mod:`effbackbone.hub`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from effdet import DetBenchPredict, DetBenchTrain, EfficientDet, get_efficientdet_config
from omegaconf import DictConfig
from torch import Tensor, nn

import effbackbone.integrations.timm as _timm
from effbackbone.arch import VARIANTS
from effbackbone.hub import read_weights, resolve_source
from effbackbone.sources import Source, base_url
from effbackbone.weights import WeightsError, check_state_dict, load_weights, read_state_dict

EFFICIENTDET_NAMES = ("d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d7x")
# EfficientDet-Lite (TF model garden): Lite backbones, ReLU6, unweighted BiFPN sums, inputs in [-1, 1].
EFFICIENTDET_LITE_NAMES = ("lite0", "lite1", "lite2", "lite3", "lite3x", "lite4")
# Paper (Tan et al., CVPR 2020, Table 2) parameter counts in millions, for reference.
PAPER_PARAMS_M = {"d0": 3.9, "d1": 6.6, "d2": 8.1, "d3": 12.0, "d4": 21.0, "d5": 34.0, "d6": 52.0, "d7": 52.0}
_HEAD = "class_net.predict.conv_pw."


def _key(name: str) -> str:
    key = re.sub(r"^(tf_)?efficientdet_", "", name.lower())
    if key not in EFFICIENTDET_NAMES + EFFICIENTDET_LITE_NAMES:
        valid = ", ".join(EFFICIENTDET_NAMES + EFFICIENTDET_LITE_NAMES)
        raise ValueError(f"unknown EfficientDet {name!r}; valid names: {valid}")
    return key


def efficientdet_config(
    name: str = "d0", *, num_classes: int = 90, image_size: int | tuple[int, int] | None = None,
    tf_compat: bool = True, backbone: str | None = None, **overrides: Any,
) -> DictConfig:
    """The effdet ``tf_efficientdet_<name>`` config with our backbone substituted.

    Args:
        name: ``d0``..``d7``, ``d7x`` or ``lite0``..``lite4``, ``lite3x`` (``efficientdet_`` /
            ``tf_efficientdet_`` prefixes accepted).
        num_classes: Classes of the class head.
        image_size: Input size override (int or (H, W); multiples of 128 keep every level exact).
        tf_compat: TF "same" padding in backbone and BiFPN (what the COCO checkpoints need); ``False``
            uses symmetric padding everywhere (for PyTorch-trained backbone weights).
        backbone: Another encoder for this detector's BiFPN and heads (e.g. ``"v2_s"``; any
            :func:`effbackbone.list_models` name). The BiFPN adapts to its channels; the COCO
            checkpoints then no longer fit.
        **overrides: Any other effdet config field (``max_det_per_image``, ``soft_nms``, ...).
    """
    config = get_efficientdet_config(f"tf_efficientdet_{_key(name)}")
    variant = config.backbone_name.removeprefix("tf_efficientnet_") if backbone is None else backbone
    if variant not in VARIANTS:
        raise ValueError(f"unknown backbone {variant!r}; valid: {', '.join(VARIANTS)}")
    config.backbone_name = _timm.PREFIX + variant
    config.backbone_args = dict(config.backbone_args or {}, tf_compat=tf_compat)
    config.num_classes = num_classes
    if not tf_compat:
        config.pad_type = ""
    if image_size is not None:
        config.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for field, value in overrides.items():
        if field not in config:
            raise TypeError(f"unknown EfficientDet config field {field!r}; valid: {sorted(config)}")
        config[field] = value
    return config


def _detection_state_dict(path: str | os.PathLike[str] | dict[str, Tensor]) -> dict[str, Tensor]:
    """Read an effdet checkpoint (model or bench keys) as ``EfficientDet`` keys."""
    sd = read_state_dict(path) if isinstance(path, (str, os.PathLike)) else dict(path)
    if sd and all(k.startswith("model.") for k in sd if not k.startswith("anchors.")):
        # Saved from a DetBenchTrain/DetBenchPredict: strip the bench prefix, drop its anchor buffers.
        sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.startswith("anchors.")}
    return sd


def coco_checkpoint(name: str = "d0") -> Path:
    """The local file of effdet's COCO checkpoint for EfficientDet-``name``, downloaded once if needed.

    The file name (with its SHA-256 prefix, e.g. ``tf_efficientdet_d0_34-f153e0cf.pth``) is the one in
    effdet's ``tf_efficientdet_<name>`` config; it is looked for in ``$EFFBACKBONE_WEIGHTS_DIR``, then in
    torch.hub's cache, then downloaded from ``$EFFBACKBONE_EFFDET_BASE_URL`` (effdet's release by default)
    with its hash checked.
    """
    key = _key(name)
    filename = get_efficientdet_config(f"tf_efficientdet_{key}").url.rsplit("/", 1)[-1]
    return resolve_source(Source("coco", f"EfficientDet-{key}", filename, url=base_url("effdet") + filename))


def _load_backbone(model: nn.Module, weights: str | os.PathLike[str] | dict[str, Tensor], tf_compat: bool) -> None:
    """ImageNet weights for the encoder: a file, a state dict or a source name (``"imagenet"`` picks the padding)."""
    variant = model.config.backbone_name.removeprefix(_timm.PREFIX)
    sd, label, implied = read_weights(variant, weights, tf_compat)
    if implied is not None and implied != tf_compat:
        raise ValueError(
            f"{label} needs tf_compat={implied} ({'TF' if implied else 'symmetric'} padding); "
            f"build the detector with tf_compat={implied}"
        )
    try:
        load_weights(model.backbone, sd, adapt_padding=False)
    except WeightsError as e:
        raise WeightsError(f"{label} does not fit the {variant} backbone: {e}") from None


def create_efficientdet(
    name: str = "d0",
    num_classes: int = 90,
    *,
    pretrained: Literal["coco"] | None = None,
    backbone_weights: str | os.PathLike[str] | dict[str, Tensor] | None = None,
    pretrained_path: str | os.PathLike[str] | dict[str, Tensor] | None = None,
    bench_task: Literal["train", "predict"] | None = None,
    image_size: int | tuple[int, int] | None = None,
    tf_compat: bool = True,
    backbone: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build EfficientDet-``name`` on our encoder, optionally with weights and a train/predict bench.

    Args:
        name: ``d0``..``d7``, ``d7x``, or EfficientDet-Lite ``lite0``..``lite4``, ``lite3x``.
        num_classes: Detection classes; a checkpoint with another class count is loaded first and
            the class head then re-initialised (BiFPN and box head kept), with a warning.
        pretrained: ``"coco"``: effdet's published COCO checkpoint of this model (:func:`coco_checkpoint`);
            needs the default backbone and ``tf_compat=True``.
        backbone_weights: ImageNet weights for the encoder: a source name (``"imagenet"`` takes the
            TF port with ``tf_compat=True``, the PyTorch-trained weights with ``tf_compat=False``; see
            :mod:`effbackbone.sources`), a local file or a state dict (timm, torchvision or
            efficientnet-pytorch layout; the padding must match ``tf_compat``).
        pretrained_path: A whole-detector effdet checkpoint (e.g. ``tf_efficientdet_d0_34-f153e0cf.pth``),
            plain or saved from a bench.
        bench_task: ``"train"`` wraps in ``DetBenchTrain`` (forward(images, target) -> losses),
            ``"predict"`` in ``DetBenchPredict`` (forward(images) -> [B, N, 6] detections
            ``x_min, y_min, x_max, y_max, score, class``), ``None`` returns the bare ``EfficientDet``.
        image_size: Input size override (default: the paper's ``512 + 128 * phi``).
        tf_compat: See :func:`efficientdet_config`.
        backbone: Encoder override, see :func:`efficientdet_config`.
        **overrides: effdet config fields.

    Returns:
        ``EfficientDet``, ``DetBenchTrain`` or ``DetBenchPredict``.
    """
    if bench_task not in (None, "train", "predict"):
        raise ValueError(f"bench_task must be None, 'train' or 'predict', got {bench_task!r}")
    if pretrained is not None:
        if pretrained != "coco":
            raise ValueError(f"pretrained must be None or 'coco', got {pretrained!r}")
        if pretrained_path is not None or backbone is not None or not tf_compat:
            raise ValueError(
                "pretrained='coco' loads effdet's checkpoint of this exact model: drop pretrained_path, backbone and "
                "tf_compat=False (or pass pretrained_path= for another checkpoint)"
            )
        pretrained_path = coco_checkpoint(name)
    sd = _detection_state_dict(pretrained_path) if pretrained_path is not None else None
    config = efficientdet_config(
        name, num_classes=num_classes, image_size=image_size, tf_compat=tf_compat, backbone=backbone, **overrides
    )
    if sd is not None and _HEAD + "weight" in sd:
        anchors = config.num_scales * len(config.aspect_ratios)
        config.num_classes = sd[_HEAD + "weight"].shape[0] // anchors
    model = EfficientDet(config, pretrained_backbone=False)
    if backbone_weights is not None:
        _load_backbone(model, backbone_weights, tf_compat)
    if sd is not None:
        try:
            check_state_dict(sd, model.state_dict())
        except WeightsError as e:
            raise WeightsError(f"{e}. The checkpoint must be an effdet tf_efficientdet_{_key(name)} one") from None
        model.load_state_dict(sd, strict=True)
    if model.config.num_classes != num_classes:
        warnings.warn(
            f"EfficientDet-{_key(name)}: the checkpoint's class head has {model.config.num_classes} classes; "
            f"re-initialised it for num_classes={num_classes} (BiFPN and box head kept)",
            stacklevel=2,
        )
        model.reset_head(num_classes=num_classes)
    if bench_task == "train":
        return DetBenchTrain(model, create_labeler=True)
    if bench_task == "predict":
        return DetBenchPredict(model)
    return model


__all__ = [
    "EFFICIENTDET_LITE_NAMES", "EFFICIENTDET_NAMES", "PAPER_PARAMS_M", "coco_checkpoint", "create_efficientdet",
    "efficientdet_config",
]
