"""``create_model``: the public way to build an encoder or classifier."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from effbackbone.activations import set_memory_efficient
from effbackbone.arch import FAMILIES, VARIANTS, Variant
from effbackbone.hub import read_weights
from effbackbone.model import EfficientNet, ModelConfig
from effbackbone.scaling import ALPHA, BETA, GAMMA, compound
from effbackbone.weights import Layout, WeightsError, detect_layout, load_weights

M = TypeVar("M", bound=nn.Module)

# BatchNorm eps the torchvision models were trained with (not stored in the state dict); 1e-5 for the others.
TORCHVISION_BN_EPS = {"b5": 1e-3, "b6": 1e-3, "b7": 1e-3, "v2_s": 1e-3, "v2_m": 1e-3, "v2_l": 1e-3}
_FAMILY_BASE = {"efficientnet": "b0", "lite": "lite0", "v2_s": "v2_s", "v2_m": "v2_m", "v2_l": "v2_l"}
# Options applied to the built model (apply_post_options), not part of its ModelConfig. The last two
# work on any module tree (timm's feature wrappers too); the others need an EfficientNet.
POST_OPTIONS = ("frozen_stages", "norm_eval", "grad_checkpointing", "memory_efficient", "channels_last")
ANY_MODULE_POST_OPTIONS = ("memory_efficient", "channels_last")
_OPTIONS = frozenset(
    {"phi", "alpha", "beta", "gamma", "tf_compat", "padding", "bn_eps", "bn_momentum", "drop_rate", "stem_adapt"}
    | set(POST_OPTIONS)
)


def list_models() -> list[str]:
    """Names ``create_model`` accepts."""
    return list(VARIANTS)


def _key(name: str) -> str:
    """The ``VARIANTS`` key of an accepted spelling (``B3``, ``efficientnet-b3`` -> ``b3``)."""
    return name.lower().replace("-", "_").removeprefix("efficientnet_")


def weights_bn_eps(
    name: str, layout: Layout | None = None, *, tf_compat: bool = False, bn_eps: float | None = None
) -> float:
    """The BatchNorm eps a model of ``name`` should use: ``bn_eps`` when given, else the weights' own.

    No state dict records eps: torchvision trained B5-B7 and V2 with 1e-3 (:data:`TORCHVISION_BN_EPS`),
    the TF reference used 1e-3 (``tf_compat``), PyTorch-trained timm weights 1e-5.
    """
    if bn_eps is not None:
        return bn_eps
    if layout == "torchvision":
        return TORCHVISION_BN_EPS.get(_key(name), 1e-5)
    return 1e-3 if tf_compat else 1e-5


def apply_post_options(model: M, options: Mapping[str, Any]) -> M:
    """Apply the :data:`POST_OPTIONS` in ``options`` to a built model (others are ignored).

    ``create_model`` and the framework adapters that build the model class themselves call this, so
    each option means the same everywhere.
    """
    if isinstance(model, EfficientNet):
        if options.get("frozen_stages") or options.get("norm_eval"):
            model.freeze(int(options.get("frozen_stages", 0)), bool(options.get("norm_eval", False)))
        model.set_grad_checkpointing(bool(options.get("grad_checkpointing", False)))
    else:
        need = [k for k in POST_OPTIONS if k not in ANY_MODULE_POST_OPTIONS and options.get(k)]
        if need:
            raise TypeError(f"{need} need an effbackbone EfficientNet, not a {type(model).__name__}")
    if options.get("memory_efficient"):
        set_memory_efficient(model)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model


def resolve_variant(
    name: str, phi: float | None = None, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA
) -> Variant:
    """The scaling coefficients for ``name``, or for the family's base scaled by compound ``phi``.

    ``resolve_variant("b0", phi=2.5)`` is B0's table scaled by width ``beta^2.5`` and depth
    ``alpha^2.5`` (paper eq. 3); the named B1-B7 use the reference's hand-rounded coefficients.
    """
    key = _key(name)
    if key not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)}")
    variant = VARIANTS[key]
    if phi is None:
        return variant
    base = VARIANTS[_FAMILY_BASE[variant.family]]
    c = compound(phi, alpha, beta, gamma)
    # Dropout follows the reference table's steps: 0.2 at B0-B1, +0.1 every two phi, 0.1..0.5.
    dropout = round(min(0.5, max(0.1, 0.2 + 0.1 * (phi // 2))), 2)
    return Variant(base.family, base.width * c.width, base.depth * c.depth, c.resolution, dropout)


def make_config(
    name: str,
    *,
    in_channels: int = 3,
    output_stride: int = 32,
    drop_path_rate: float = 0.0,
    layout: Layout | None = None,
    **options: Any,
) -> ModelConfig:
    """Resolve ``create_model``'s arguments into a :class:`ModelConfig` (no model is built).

    Used by ``create_model`` and by framework adapters that construct the model class themselves.

    Args:
        name: Variant name (see :func:`list_models`).
        in_channels: Input channels.
        output_stride: 32, 16 or 8.
        drop_path_rate: Stochastic depth rate at the last block.
        layout: Layout of the weights that will be loaded (``"torchvision"`` weights of some variants
            were trained with BatchNorm eps 1e-3), or ``None``.
        **options: As for :func:`create_model`.
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; valid options: {sorted(_OPTIONS)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    variant = resolve_variant(
        name,
        options.get("phi"),
        options.get("alpha", ALPHA),
        options.get("beta", BETA),
        options.get("gamma", GAMMA),
    )
    tf = bool(options.get("tf_compat", False))
    return ModelConfig(
        variant=variant,
        in_channels=in_channels,
        output_stride=output_stride,
        drop_path_rate=drop_path_rate,
        drop_rate=options.get("drop_rate", variant.dropout),
        padding=options.get("padding", "same" if tf else "symmetric"),
        bn_eps=weights_bn_eps(name, layout, tf_compat=tf, bn_eps=options.get("bn_eps")),
        bn_momentum=options.get("bn_momentum", 0.01 if tf else 0.1),
    )


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | Mapping[str, Tensor] | None = None,
    features_only: bool = True,
    out_indices: Sequence[int] | None = None,
    in_channels: int = 3,
    output_stride: int = 32,
    drop_path_rate: float = 0.0,
    num_classes: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> EfficientNet:
    """Build an EfficientNet encoder (or classifier), optionally with published weights.

    Args:
        name: ``b0``..``b7``, ``lite0``..``lite4``, ``v2_s``, ``v2_m``, ``v2_l``.
        weights: A local ``.safetensors``/``.pth`` path or a state dict, in timm, torchvision or
            efficientnet-pytorch layout (detected from the keys); or a published source:
            ``"imagenet"``, ``"timm/<arch>.<tag>"``, ``"hf-hub:<org>/<repo>"``, ``"torchvision"``,
            ``"efficientnet-pytorch"``, looked for in ``$EFFBACKBONE_WEIGHTS_DIR`` and the caches, then
            downloaded once (:mod:`effbackbone.hub`). TF-ported weights (``tf_*`` tags, the
            efficientnet-pytorch layout) switch on ``tf_compat`` unless it is given.
        features_only: Return the pyramid levels (``dict[str, Tensor]``) instead of logits.
        out_indices: Which levels to return, 0..4 for C1..C5 (strides 2..32). Default: all.
        in_channels: Input channels; pretrained stems are adapted (option ``stem_adapt``).
        output_stride: 32, 16 or 8 (dilated last stages).
        drop_path_rate: Stochastic depth rate at the last block.
        num_classes: Classifier size (``features_only=False``); 0 for pooled features.
        device: Where the parameters are created (``"meta"``: shapes only, no memory).
        dtype: Floating-point dtype of the parameters (initialised in float32, then cast).
        **options: ``phi`` (compound coefficient; scales the family's base model) with ``alpha``,
            ``beta``, ``gamma``; ``tf_compat=True`` for TF-ported weights (timm ``tf_*``: "same"
            padding and BN eps 1e-3); ``padding``, ``bn_eps``, ``bn_momentum``, ``drop_rate``;
            ``frozen_stages`` (0-5: freeze stem and levels up to C{n}), ``norm_eval`` (BN in eval mode),
            ``grad_checkpointing``, ``channels_last``, ``stem_adapt`` (``repeat``, ``mean``,
            ``rgb_zero``, ``random``); ``memory_efficient=True`` stores less for backward (BN + activation
            recomputed, identical results; :func:`effbackbone.activations.set_memory_efficient`).

    Returns:
        The model, in train mode like any freshly built ``nn.Module``.
    """
    sd, label = None, ""
    if weights is not None:
        sd, label, tf_compat = read_weights(name, weights, options.get("tf_compat"))
        if tf_compat and "tf_compat" not in options:
            options["tf_compat"] = True
    cfg = make_config(
        name,
        in_channels=in_channels,
        output_stride=output_stride,
        drop_path_rate=drop_path_rate,
        layout=detect_layout(sd) if sd is not None else None,
        **options,
    )
    model = EfficientNet(
        cfg, features_only=features_only, out_indices=out_indices, num_classes=num_classes, device=device, dtype=dtype
    )
    if sd is not None:
        try:
            load_weights(model, sd, options.get("stem_adapt", "repeat"), adapt_padding=False)
        except WeightsError as e:
            raise WeightsError(f"{label} does not fit create_model({name!r}): {e}") from None
    return apply_post_options(model, options)


__all__ = [
    "FAMILIES",
    "POST_OPTIONS",
    "TORCHVISION_BN_EPS",
    "apply_post_options",
    "create_model",
    "list_models",
    "make_config",
    "resolve_variant",
    "weights_bn_eps",
]
