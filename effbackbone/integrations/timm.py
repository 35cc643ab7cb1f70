"""timm adapter: our encoders as timm models (``timm.create_model("effbackbone_b0", ...)``).

Importing this module registers ``effbackbone_b0`` .. ``effbackbone_b7``, ``effbackbone_lite0`` ..
``effbackbone_lite4`` and ``effbackbone_v2_s|m|l`` (idempotent; :func:`register` does the same).
Models are built through timm's ``build_model_with_cfg``, so ``features_only``/``out_indices``,
``pretrained=True`` (the variant's ``"imagenet"`` weights, resolved by :mod:`effbackbone.hub`: local
folder, caches, then one download) or with ``pretrained_cfg_overlay=dict(file=...)`` (timm-, torchvision-
or efficientnet-pytorch-layout keys), ``in_chans`` stem adaptation and ``num_classes`` head resets behave
as for timm's own EfficientNets. Module names equal timm's, so state dicts are interchangeable.

Extra keyword arguments are :func:`effbackbone.create_model` options: ``tf_compat=True`` (TF "same"
padding and BN eps 1e-3, for ``tf_*`` weights), ``bn_eps``, ``padding``, ``phi``, ``output_stride``,
``frozen_stages``, ``norm_eval``, ``grad_checkpointing``, ``memory_efficient``, ``channels_last``.

(No ``from __future__ import annotations``, as in :mod:`effbackbone.model`: FX-traced graphs of these
models must script.)
"""

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import FeatureInfo, build_model_with_cfg, is_model, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from effbackbone.arch import VARIANTS
from effbackbone.factory import ANY_MODULE_POST_OPTIONS, POST_OPTIONS, apply_post_options, make_config, weights_bn_eps
from effbackbone.hub import resolve_weights
from effbackbone.model import EfficientNet, ModelConfig
from effbackbone.weights import (
    LAYOUT_TF_COMPAT,
    check_state_dict,
    detect_layout,
    efficientnet_pytorch_to_timm,
    to_tf_compat,
    torchvision_to_timm,
)

PREFIX = "effbackbone_"
MODEL_NAMES: tuple[str, ...] = tuple(PREFIX + key for key in VARIANTS)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HEAD_KEYS = ("conv_head.", "bn2.", "classifier.")


def _default_cfg(key: str) -> dict[str, Any]:
    """The timm pretrained cfg of one variant: its native resolution and ImageNet preprocessing.

    ``crop_pct = res / (res + 32)`` is the TF reference's center-crop padding (timm's ``tf_*``
    values); the pooled map is ``ceil(res / 32)`` for both paddings. Lite weights exist only from
    TF, which normalised to [-1, 1].
    """
    res = VARIANTS[key].resolution
    lite = VARIANTS[key].family == "lite"
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, res, res),
        "pool_size": (math.ceil(res / 32),) * 2,
        "crop_pct": round(res / (res + 32), 3),
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5) if lite else _IMAGENET_MEAN,
        "std": (0.5, 0.5, 0.5) if lite else _IMAGENET_STD,
        "first_conv": "conv_stem",
        "classifier": "classifier",
        "license": "apache-2.0",
        "paper_ids": "arXiv:1905.11946" if not key.startswith("v2") else "arXiv:2104.00298",
    }


# Read by timm's ``register_model`` (it looks up ``default_cfgs`` in the entrypoint's module).
default_cfgs: dict[str, dict[str, Any]] = {PREFIX + key: _default_cfg(key) for key in VARIANTS}


def _feature_info(model: EfficientNet) -> list[dict[str, Any]]:
    """The timm feature-info dicts (num_chs, reduction, module, stage) of every level C1..C5."""
    return [
        # timm counts the stem as stage 0.
        {"num_chs": s.channels, "reduction": s.stride, "module": s.module, "stage": s.stage + 1}
        for s in model.all_feature_specs
    ]


class TimmEfficientNet(EfficientNet):
    """The classifier with timm's model API (pooling choice, pre-logits, intermediates).

    Same modules and state-dict keys as :class:`~effbackbone.model.EfficientNet` (timm's), plus a
    parameter-free ``global_pool``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        num_classes: int = 1000,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(cfg, features_only=False, num_classes=num_classes, device=device, dtype=dtype)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features
        self.drop_rate = cfg.drop_rate
        self.feature_info = _feature_info(self)
        self.stage_ends = [f["stage"] for f in self.feature_info]

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm API)."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0 = none); pooling ``global_pool`` ('' = none), kept when ``None``.

        As timm's own models: a model built with ``global_pool="max"`` keeps max pooling through
        ``reset_classifier(5)``. New modules follow the model's device, dtype and train mode.
        """
        if global_pool is not None:
            pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
            self.global_pool = pool.train(self.training)
        super().reset_classifier(num_classes)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and (unless ``pre_logits``) classify."""
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (pooled features when ``num_classes=0``; unpooled with ``global_pool=''``)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay: stem, each block (or stage), head."""
        return {
            "stem": r"^conv_stem|bn1",
            "blocks": [(r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)", None), (r"conv_head|bn2", (99999,))],
        }

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The timm intermediate-features API: levels C1..C5 selected by ``indices`` (feature_info order).

        Args:
            x: Input images.
            indices: Last ``n`` levels if int, all if ``None``, else the given level indices.
            norm: Unused (the levels have no separate norm); accepted for API compatibility.
            stop_early: Skip the blocks after the last requested level.
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list of levels.

        Returns:
            The levels, or ``(forward_features output, levels)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_stages = [self.stage_ends[i] - 1 for i in take]
        last = self.stage_ends[max_index] if stop_early else len(self.blocks)
        out: list[Tensor] = []
        x = self.stem(x)
        for i, stage in enumerate(self.blocks):
            if i >= last:
                break
            x = stage(x)
            if i in take_stages:
                out.append(x)
        if intermediates_only:
            return out
        if last == len(self.blocks):
            x = self.act2(self.bn2(self.conv_head(x)))
        return x, out

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last level in ``indices`` (and the head); return the kept indices."""
        take, max_index = feature_take_indices(len(self.stage_ends), indices)
        if self.stage_ends[max_index] < len(self.blocks) or prune_head or prune_norm:
            self.truncate(max_index)
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take


class TimmEfficientNetFeatures(EfficientNet):
    """The ``features_only`` encoder as timm returns it: a list of maps and a ``FeatureInfo``."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(cfg, features_only=True, out_indices=out_indices, device=device, dtype=dtype)
        self.feature_info = FeatureInfo(_feature_info(self), self.out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        """The levels selected by ``out_indices``, shallowest first."""
        return list(self.forward_pyramid(x).values())


def _build(
    key: str,
    *,
    features: bool,
    in_chans: int = 3,
    num_classes: int = 1000,
    global_pool: str = "avg",
    out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    output_stride: int = 32,
    drop_path_rate: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> EfficientNet:
    if "stem_adapt" in options:
        raise TypeError("stem_adapt is not used through timm: timm adapts the stem to in_chans when loading")
    cfg = make_config(key, in_channels=in_chans, output_stride=output_stride, drop_path_rate=drop_path_rate, **options)
    # timm passes device= and dtype= to every entrypoint (its models take them as torch modules do).
    if features:
        return TimmEfficientNetFeatures(cfg, out_indices=out_indices, device=device, dtype=dtype)
    return TimmEfficientNet(cfg, num_classes=num_classes, global_pool=global_pool, device=device, dtype=dtype)


def _filter_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module, *, key: str, bn_eps: float | None, set_padding: bool = False
) -> dict[str, Tensor]:
    """Make a checkpoint fit: torchvision / efficientnet-pytorch keys renamed to ours, head dropped for feature models.

    torchvision trained some variants with BatchNorm eps 1e-3, which no state dict records; unless
    the caller chose ``bn_eps``, the model takes that eps when it receives torchvision weights. With
    ``set_padding`` (no ``tf_compat``/``padding`` given), a layout that implies TF padding switches the model to it.
    """
    sd = dict(state_dict)
    layout = detect_layout(sd)
    if set_padding and LAYOUT_TF_COMPAT.get(layout) and isinstance(model, EfficientNet):
        to_tf_compat(model)
    if layout == "efficientnet_pytorch":
        sd = efficientnet_pytorch_to_timm(sd, model)
    if layout == "torchvision":
        sd = torchvision_to_timm(sd, model)
        if isinstance(model, EfficientNet):
            model.set_bn_eps(weights_bn_eps(key, "torchvision", bn_eps=bn_eps))
    if not hasattr(model, "conv_head"):
        sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_KEYS)}
    # Fail with our key/shape report rather than torch's list of hundreds of keys. timm adapts the
    # stem to in_chans and drops a classifier of another size after this filter: skip those two.
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    found = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    if "conv_stem.weight" in found and "conv_stem.weight" in target:
        found["conv_stem.weight"] = target["conv_stem.weight"]
    check_state_dict(found, target, layout=layout)
    return sd


def _resolve_pretrained(key: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``pretrained=True`` without a weights location: the variant's ``"imagenet"`` file, its padding and mean/std."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        return kwargs
    resolved = resolve_weights(key, "imagenet", tf_compat=kwargs.get("tf_compat"))
    source = resolved.source
    assert source is not None  # "imagenet" is a source name
    overlay.update(file=str(resolved.path), mean=source.mean, std=source.std)
    kwargs = {**kwargs, "pretrained_cfg_overlay": overlay}
    if source.tf_compat and "tf_compat" not in kwargs:
        kwargs["tf_compat"] = True
    return kwargs


def _create(key: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build through timm's builder (pretrained cfg, local weight files, feature wrappers)."""
    if pretrained:
        kwargs = _resolve_pretrained(key, kwargs)
    post = {k: kwargs.pop(k) for k in POST_OPTIONS if k in kwargs}
    mode = ""
    if kwargs.pop("features_only", False):
        mode = "cfg" if ("feature_cfg" in kwargs or "feature_cls" in kwargs) else "cls"
    ours_only = sorted(set(post) - set(ANY_MODULE_POST_OPTIONS))
    if mode == "cfg" and ours_only:
        raise TypeError(
            f"{ours_only} apply to our own model classes: use features_only=True "
            "without feature_cls/feature_cfg, or set them on the model before wrapping"
        )
    if mode == "cfg":
        # Our levels are outputs of stages inside ``blocks``; timm's list/dict wrappers find them only
        # when that Sequential is flattened (timm's own EfficientNet fails here without it).
        kwargs["feature_cfg"] = {"flatten_sequential": True, **(kwargs.get("feature_cfg") or {})}
    model = build_model_with_cfg(
        partial(_build, key, features=mode == "cls"),
        PREFIX + key,
        pretrained,
        features_only=mode == "cfg",
        pretrained_filter_fn=partial(
            _filter_state_dict, key=key, bn_eps=kwargs.get("bn_eps"),
            set_padding=not {"tf_compat", "padding"} & set(kwargs),
        ),
        kwargs_filter=("num_classes", "global_pool") if mode == "cls" else None,
        **kwargs,
    )
    if mode == "cls":
        # As timm's own features_only models: no classifier fields in the cfg of a feature extractor.
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return apply_post_options(model, post)


def _entrypoint(key: str) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(key, pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = PREFIX + key
    fn.__module__ = __name__
    fn.__doc__ = f"EfficientNet {key} from effbackbone (timm entrypoint)."
    return fn


def register() -> list[str]:
    """Register every ``effbackbone_*`` name with timm (no-op for names already registered).

    Returns:
        The registered names.
    """
    for name in MODEL_NAMES:
        if not is_model(name):
            fn = _entrypoint(name.removeprefix(PREFIX))
            globals()[name] = fn
            register_model(fn)
    return list(MODEL_NAMES)


register()

__all__ = ["MODEL_NAMES", "TimmEfficientNet", "TimmEfficientNetFeatures", "default_cfgs", "register"]
