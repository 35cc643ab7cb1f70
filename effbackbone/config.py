"""What a model is built from: :class:`ModelConfig`, and the per-block plan it gives.

:func:`plan_stages` is the single place where strides, dilations, shortcuts, stochastic-depth rates
and the pyramid levels are derived; ``EfficientNet`` builds its blocks from it and
``EfficientNet.set_output_stride`` re-strides a built model from it, so both always agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from effbackbone.arch import FAMILIES, Variant
from effbackbone.blocks import BlockConfig
from effbackbone.layers import Padding
from effbackbone.scaling import level_stages, round_filters, scale_stages
from effbackbone.spec import FeatureSpec

LEVEL_NAMES = ("C1", "C2", "C3", "C4", "C5")


@dataclass(frozen=True)
class ModelConfig:
    """Resolved construction options of an :class:`~effbackbone.model.EfficientNet` (see ``create_model``).

    Attributes:
        variant: Scaling coefficients.
        in_channels: Input channels.
        output_stride: 32, 16 or 8; lower values dilate the last stages instead of striding.
        drop_path_rate: Stochastic depth rate of the last block (ramps linearly from 0).
        drop_rate: Dropout before the classifier.
        padding: ``"symmetric"`` (PyTorch) or ``"same"`` (TF-ported weights).
        bn_eps: BatchNorm epsilon (1e-3 for TF-ported weights, 1e-5 otherwise).
        bn_momentum: BatchNorm momentum (PyTorch convention).
    """

    variant: Variant
    in_channels: int = 3
    output_stride: int = 32
    drop_path_rate: float = 0.0
    drop_rate: float = 0.2
    padding: Padding = "symmetric"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1


def stem_channels(cfg: ModelConfig) -> int:
    """Output channels of the stem (scaled by width in the families that scale it)."""
    family = FAMILIES[cfg.variant.family]
    return round_filters(family.stem_channels, cfg.variant.width) if family.scale_stem else family.stem_channels


def plan_stages(
    cfg: ModelConfig, stem: int
) -> tuple[list[tuple[str, tuple[BlockConfig, ...]]], tuple[FeatureSpec, ...]]:
    """Every block's configuration and the pyramid levels of a model built from ``cfg`` (no module built).

    Args:
        cfg: The model configuration.
        stem: Output channels of the stem.

    Returns:
        ``[(block kind, block configs), ...]`` per stage, and the levels C1..C5.
    """
    family = FAMILIES[cfg.variant.family]
    stages = scale_stages(family.stages, cfg.variant.width, cfg.variant.depth, family.fix_first_last)
    ends = level_stages([s.stride for s in stages])
    total = sum(s.repeats for s in stages)
    in_ch, stride, dilation, idx = stem, 2, 1, 0
    plan: list[tuple[str, tuple[BlockConfig, ...]]] = []
    specs: list[FeatureSpec] = []
    for si, stage in enumerate(stages):
        blocks: list[BlockConfig] = []
        for bi in range(stage.repeats):
            s, d = (stage.stride, dilation) if bi == 0 else (1, dilation)
            if s > 1 and stride * s > cfg.output_stride:
                # Dilate instead of striding; like timm and DeepLab, the first block of the stage
                # keeps the previous dilation and the following blocks take the new one.
                dilation *= s
                s = 1
            elif s > 1:
                stride *= s
            blocks.append(
                BlockConfig(
                    in_channels=in_ch,
                    out_channels=stage.out_channels,
                    kernel=stage.kernel,
                    stride=s,
                    dilation=d,
                    expand_ratio=stage.expand_ratio,
                    se_ratio=stage.se_ratio,
                    act=family.activation,
                    padding=cfg.padding,
                    # Stochastic depth ramps linearly over all blocks (timm, TF reference).
                    drop_path=cfg.drop_path_rate * idx / total,
                )
            )
            in_ch, idx = stage.out_channels, idx + 1
        plan.append((stage.block, tuple(blocks)))
        if si in ends:
            level = len(specs)
            specs.append(FeatureSpec(LEVEL_NAMES[level], in_ch, stride, level, f"blocks.{si}", si))
    return plan, tuple(specs)


__all__ = ["LEVEL_NAMES", "ModelConfig", "plan_stages", "stem_channels"]
