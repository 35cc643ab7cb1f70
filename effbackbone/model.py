"""EfficientNet as a multi-scale encoder (and, optionally, the ImageNet classifier).

(No ``from __future__ import annotations``: ``torch.fx`` copies the root ``forward``'s annotations into
the code it generates, where a postponed one is the string ``'Tensor'``, written ``_Tensor_``, which
TorchScript cannot compile; the real annotations script.)
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from effbackbone.arch import FAMILIES
from effbackbone.blocks import create_block, set_block_geometry
from effbackbone.config import LEVEL_NAMES, ModelConfig, plan_stages, stem_channels
from effbackbone.layers import Conv2dSame, adapt_stem_weight, conv_like, create_act, create_conv
from effbackbone.scaling import round_filters
from effbackbone.spec import FeatureSpec


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNetV2 / EfficientNet-Lite encoder.

    With ``features_only=True`` (the default) ``forward`` returns ``dict[str, Tensor]`` with the
    levels named in :attr:`feature_specs` (``C1``..``C5`` = strides 2..32); each level is the output
    of the last block before the next stride-2 block (the same tensors as timm's ``features_only``).
    With ``features_only=False`` it is the classifier and ``forward`` returns logits.

    Attributes:
        feature_specs: The levels ``forward`` returns, in order.
        all_feature_specs: Every level the network has (C1..C5).
        size_divisibility: Input sizes should be multiples of this (32 at output stride 32).
    """

    # No class-level annotation: with postponed annotations TorchScript would see the string 'int'.
    size_divisibility = 32
    # Python-only metadata (FeatureSpec tuples); TorchScript must not try to compile these properties.
    __jit_unused_properties__ = ["feature_channels", "feature_strides", "in_chans"]
    # A constant lets TorchScript compile only the branch of ``forward`` this model has modules for.
    __constants__ = ["features_only"]

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        features_only: bool = True,
        out_indices: Sequence[int] | None = None,
        num_classes: int = 1000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cfg.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {cfg.output_stride}")
        self.cfg = cfg
        self.features_only = features_only
        self.grad_checkpointing = False
        self.norm_eval = False
        self.frozen_levels = 0
        family = FAMILIES[cfg.variant.family]
        norm = partial(nn.BatchNorm2d, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        # ``device`` as torch modules take it: parameters are created there (meta = shapes only).
        with torch.device(device) if device is not None else contextlib.nullcontext():
            stem = stem_channels(cfg)
            self.conv_stem = create_conv(cfg.in_channels, stem, 3, 2, padding=cfg.padding)
            self.bn1 = norm(stem)
            self.act1 = create_act(family.activation)
            self.blocks, self.all_feature_specs = self._build_stages(stem, norm)
            self._set_out_indices(out_indices)
            self.num_features = 0
            self.num_classes = num_classes if not features_only else 0
            if not features_only:
                last = self.all_feature_specs[-1].channels
                head = family.head_channels
                self.num_features = round_filters(head, cfg.variant.width) if family.scale_head else head
                self.conv_head = create_conv(last, self.num_features, 1)
                self.bn2 = norm(self.num_features)
                self.act2 = create_act(family.activation)
                self.dropout = nn.Dropout(cfg.drop_rate)
                self.classifier: nn.Module = (
                    nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
                )
        self.size_divisibility = cfg.output_stride
        _init_weights(self)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build_stages(self, stem: int, norm: partial[nn.BatchNorm2d]) -> tuple[nn.Sequential, tuple[FeatureSpec, ...]]:
        plan, specs = plan_stages(self.cfg, stem)
        built = [nn.Sequential(*(create_block(kind, block_cfg, norm) for block_cfg in blocks)) for kind, blocks in plan]
        return nn.Sequential(*built), specs

    def _set_out_indices(self, out_indices: Sequence[int] | None) -> None:
        n = len(self.all_feature_specs)
        indices = tuple(range(n)) if out_indices is None else tuple(out_indices)
        bad = [i for i in indices if not -n <= i < n]
        if bad or not indices:
            raise ValueError(f"out_indices {indices} must be non-empty and in [0, {n - 1}] ({_level_range(n)})")
        indices = tuple(sorted({i % n for i in indices}))
        self.out_indices = indices
        self.feature_specs = tuple(self.all_feature_specs[i] for i in indices)
        stage_of = {s.stage: s.name for s in self.feature_specs}
        # A list indexed by stage (TorchScript-friendly): "" where a stage is not returned.
        self._stage_out: list[str] = [stage_of.get(i, "") for i in range(len(self.blocks))]

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the returned levels, in order."""
        return [s.channels for s in self.feature_specs]

    @property
    def feature_strides(self) -> list[int]:
        """Strides of the returned levels, in order."""
        return [s.stride for s in self.feature_specs]

    @property
    def in_chans(self) -> int:
        """Input channels (timm's attribute name; follows :meth:`set_in_channels`)."""
        return self.cfg.in_channels

    def stem(self, x: Tensor) -> Tensor:
        """Stem conv 3x3 / 2 + BN + activation."""
        return self.act1(self.bn1(self.conv_stem(x)))

    def forward_pyramid(self, x: Tensor) -> dict[str, Tensor]:
        """The requested pyramid levels as ``{name: tensor}`` (see :attr:`feature_specs`)."""
        x = self.stem(x)
        out: dict[str, Tensor] = {}
        for i, stage in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_stage(stage, x)
            else:
                x = stage(x)
            name = self._stage_out[i]
            if name != "":
                out[name] = x
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """Classifier trunk: stem, all stages, head conv (before pooling)."""
        x = self.stem(x)
        for stage in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_stage(stage, x)
            else:
                x = stage(x)
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        """Global average pool, dropout, linear classifier."""
        x = x.mean((2, 3))
        return self.classifier(self.dropout(x))

    def forward(self, x: Tensor) -> dict[str, Tensor] | Tensor:
        """Pyramid levels (``features_only=True``) or class logits."""
        if self.features_only:
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))

    # -- training-time options -------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in backward instead of storing its activations (timm's API)."""
        self.grad_checkpointing = enable

    def freeze(self, levels: int = 5, norm_eval: bool | None = None) -> None:
        """Freeze the stem and every block up to and including level ``C{levels}``.

        Args:
            levels: 0 unfreezes everything; 1..5 freeze the stem and the stages producing C1..C{levels}.
            norm_eval: Also keep every BatchNorm in eval mode (frozen statistics) while training.
                ``None`` leaves the current setting.
        """
        if not 0 <= levels <= len(self.all_feature_specs):
            raise ValueError(f"levels must be in [0, {len(self.all_feature_specs)}], got {levels}")
        self.frozen_levels = levels
        if norm_eval is not None:
            self.norm_eval = norm_eval
        last_stage = self.all_feature_specs[levels - 1].stage if levels else -1
        for m in (self.conv_stem, self.bn1):
            m.requires_grad_(levels == 0)
        for i, stage in enumerate(self.blocks):
            stage.requires_grad_(i > last_stage)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules whose weights are frozen (kept in eval mode while training)."""
        if self.frozen_levels == 0:
            return []
        last_stage = self.all_feature_specs[self.frozen_levels - 1].stage
        return [self.conv_stem, self.bn1, *list(self.blocks)[: last_stage + 1]]

    def train(self, mode: bool = True) -> "EfficientNet":
        """Like ``nn.Module.train``, but frozen parts and (with ``norm_eval``) all BN stay in eval."""
        super().train(mode)
        if mode:
            for m in self.frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` classes (0 = none).

        The new layer is on the model's device and dtype, in the model's train/eval mode.
        """
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier")
        self.num_classes = num_classes
        like = self.conv_stem.weight
        classifier = (
            nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.classifier = classifier.train(self.training)

    # -- changes after construction (used by the framework adapters) ---------------------------------
    def set_output_stride(self, output_stride: int) -> None:
        """Re-stride in place to ``output_stride`` 32, 16 or 8, exactly as building with it would.

        Strides, dilations, paddings, shortcuts, :attr:`feature_specs` and :attr:`size_divisibility`
        become those of ``EfficientNet(replace(cfg, output_stride=...))``; weights, device, dtype,
        ``requires_grad`` and train mode are kept. The convs whose stride changes are rebuilt around
        the same parameters (forward hooks on them are not kept).
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        cfg = replace(self.cfg, output_stride=output_stride)
        plan, specs = plan_stages(cfg, self.conv_stem.out_channels)
        for stage, (_, block_cfgs) in zip(self.blocks, plan, strict=False):  # truncated models have fewer
            for block, block_cfg in zip(stage, block_cfgs, strict=True):
                set_block_geometry(block, block_cfg)
        self.cfg = cfg
        self.all_feature_specs = specs[: len(self.all_feature_specs)]
        self._set_out_indices(self.out_indices)
        self.size_divisibility = output_stride

    def set_in_channels(self, in_channels: int, stem_adapt: str = "repeat") -> None:
        """Change the stem to ``in_channels`` inputs, in place.

        Args:
            in_channels: New input channels.
            stem_adapt: ``"random"`` re-initialises the stem conv (the model's own init); ``repeat``,
                ``mean`` or ``rgb_zero`` derive it from the current filters (pretrained stems; see
                :func:`~effbackbone.layers.adapt_stem_weight`). ``create_model(in_channels=n,
                weights=w, stem_adapt=m)`` gives the same model as loading ``w`` and calling this.
        """
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if in_channels == self.cfg.in_channels:
            return
        old = self.conv_stem.weight
        if stem_adapt == "random":
            weight = torch.empty(old.shape[0], in_channels, *old.shape[2:], device=old.device, dtype=old.dtype)
            if not weight.is_meta:
                _init_conv_weight(weight, groups=1)
        else:
            weight = adapt_stem_weight(old.detach(), in_channels, stem_adapt)
        if old.is_contiguous(memory_format=torch.channels_last) and not old.is_contiguous():
            weight = weight.contiguous(memory_format=torch.channels_last)
        else:
            weight = weight.contiguous()
        self.conv_stem = conv_like(self.conv_stem, self.cfg.padding, weight=weight)
        self.cfg = replace(self.cfg, in_channels=in_channels)

    def truncate(self, index: int | None = None) -> None:
        """Drop the stages after level ``index`` (default: the deepest level returned), in place.

        Stages that feed no returned level cost memory and never get a gradient (DDP's
        unused-parameter error). Levels after ``index`` leave :attr:`all_feature_specs` and
        :attr:`feature_specs`. A classifier also loses its head conv: :meth:`forward_features` then
        ends at that level, ``num_features`` becomes its channels and the classifier is rebuilt.
        """
        n = len(self.all_feature_specs)
        index = self.out_indices[-1] if index is None else index
        if not -n <= index < n:
            raise ValueError(f"index must be in [0, {n - 1}] ({_level_range(n)}), got {index}")
        index %= n
        spec = self.all_feature_specs[index]
        self.blocks = self.blocks[: spec.stage + 1]
        self.all_feature_specs = self.all_feature_specs[: index + 1]
        self._set_out_indices([i for i in self.out_indices if i <= index] or [index])
        self.frozen_levels = min(self.frozen_levels, index + 1)
        if not self.features_only:
            self.conv_head, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = spec.channels
            self.reset_classifier(self.num_classes)

    def set_static_padding(self, enabled: bool = True) -> None:
        """Pad strided TF "same" convs by constants: exact for sizes that are multiples of :attr:`size_divisibility`.

        TF "same" padding depends on the input size, so an exported graph computes it from the
        input's shape and pads in a separate node before every strided conv; for sizes that are
        multiples of the stride it is a constant (``k_eff - s``, odd pixel bottom/right), which an
        exporter writes into the convolution itself (:func:`effbackbone.export.fold_pads`). ONNX
        Runtime's int8 Lite0 runs those Pad nodes in float, between a dequantize and a quantize:
        folded, it is 1.3x faster (docs/deploy.md). Other sizes raise in eager mode. Symmetric
        ("symmetric" padding) models have nothing to change.
        """
        for m in self.modules():
            if isinstance(m, Conv2dSame):
                m.static_pad = bool(enabled)

    def set_bn_eps(self, eps: float) -> None:
        """Set every BatchNorm's epsilon (weights trained with another eps; see ``factory.weights_bn_eps``)."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = eps
        self.cfg = replace(self.cfg, bn_eps=eps)


@torch.jit.unused
def checkpoint_stage(stage: nn.Module, x: Tensor) -> Tensor:
    """Gradient-checkpoint one stage without updating BatchNorm statistics twice.

    Backward re-runs the stage in train mode, which would update every BN's running statistics
    (and ``num_batches_tracked``) a second time with the same batch (effective momentum 0.19
    instead of 0.1); the recompute context restores them, so checkpointing changes memory only.
    """
    if torch.compiler.is_compiling():
        # Compiled recomputation is functional (BN buffer updates are not replayed in backward),
        # and under torch.compile context_fn may only return TorchDispatchModes.
        return checkpoint(stage, x, use_reentrant=False)
    return checkpoint(stage, x, use_reentrant=False, context_fn=partial(_recompute_contexts, stage))


def _recompute_contexts(stage: nn.Module) -> tuple[contextlib.AbstractContextManager[None], ...]:
    return contextlib.nullcontext(), _restore_bn_buffers(stage)


@contextlib.contextmanager
def _restore_bn_buffers(module: nn.Module) -> Iterator[None]:
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _level_range(n: int) -> str:
    return "C1" if n == 1 else f"C1..C{n}"


def _init_conv_weight(weight: Tensor, groups: int) -> None:
    """TF reference conv init: normal with std ``sqrt(2 / fan_out)``."""
    fan_out = weight.shape[0] * weight.shape[2] * weight.shape[3] // groups
    nn.init.normal_(weight, 0.0, (2.0 / fan_out) ** 0.5)


def _init_weights(model: nn.Module) -> None:
    """TF reference initialisation (as timm's ``_init_weight_goog``)."""
    if any(p.is_meta for p in model.parameters()):
        return  # shapes only (profiling): random init on meta tensors costs time and means nothing
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _init_conv_weight(m.weight, m.groups)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / (m.weight.shape[0] ** 0.5)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


__all__ = ["LEVEL_NAMES", "EfficientNet", "ModelConfig"]
