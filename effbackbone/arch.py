"""Architectures as data: the paper's stage tables and the named variants.

Nothing here computes anything. :mod:`effbackbone.scaling` turns a family's base table and a
variant's coefficients into concrete channels and repeats; :mod:`effbackbone.model` builds them.

References:
    EfficientNet: Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019 (Table 1).
    EfficientNetV2: Tan & Le, "EfficientNetV2: Smaller Models and Faster Training", ICML 2021
    (Table 4 gives V2-S; M and L follow the reference implementation, as timm and torchvision do).
    EfficientNet-Lite: the TF reference ``efficientnet/lite`` (no SE, ReLU6, fixed stem and head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BlockKind = Literal["mbconv", "fused"]
Activation = Literal["silu", "relu6"]


@dataclass(frozen=True)
class StageSpec:
    """One row of a stage table (one "stage" of identical blocks).

    Attributes:
        block: ``"mbconv"`` (1x1 expand, depthwise kxk, SE, 1x1 project) or ``"fused"``
            (Fused-MBConv of EfficientNetV2: one kxk expand conv, SE, 1x1 project).
        expand_ratio: Expansion of the block input width (1 = no expansion conv).
        kernel: Kernel size of the depthwise (mbconv) or fused (fused) convolution.
        stride: Stride of the first block of the stage; later blocks use stride 1.
        out_channels: Output width before width scaling.
        repeats: Number of blocks before depth scaling.
        se_ratio: Squeeze-and-excitation width as a fraction of the block *input* channels
            (paper: 0.25; 0 disables SE).
    """

    block: BlockKind
    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    repeats: int
    se_ratio: float = 0.25


def _mb(e: int, k: int, s: int, c: int, n: int, se: float = 0.25) -> StageSpec:
    return StageSpec("mbconv", e, k, s, c, n, se)


def _fused(e: int, k: int, s: int, c: int, n: int) -> StageSpec:
    return StageSpec("fused", e, k, s, c, n, 0.0)


# Paper Table 1 (EfficientNet-B0), stages 2-8; stage 1 is the 3x3 stride-2 stem and
# stage 9 the 1x1 head conv + pooling + FC.
#            e  k  s  c_out  L       Table 1 stage, input resolution at 224
B0_STAGES = (
    _mb(1, 3, 1, 16, 1),  # 2  MBConv1, k3x3   112x112
    _mb(6, 3, 2, 24, 2),  # 3  MBConv6, k3x3   112x112
    _mb(6, 5, 2, 40, 2),  # 4  MBConv6, k5x5    56x56
    _mb(6, 3, 2, 80, 3),  # 5  MBConv6, k3x3    28x28
    _mb(6, 5, 1, 112, 3),  # 6  MBConv6, k5x5    14x14
    _mb(6, 5, 2, 192, 4),  # 7  MBConv6, k5x5    14x14
    _mb(6, 3, 1, 320, 1),  # 8  MBConv6, k3x3     7x7
)

# EfficientNet-Lite: B0's table without SE (SE is unfriendly to mobile accelerators).
LITE_STAGES = tuple(
    StageSpec(s.block, s.expand_ratio, s.kernel, s.stride, s.out_channels, s.repeats, 0.0)
    for s in B0_STAGES
)

# EfficientNetV2-S, paper Table 4 (stage 0 is the stem). The first stage has expand ratio 1:
# a single fused conv, with a residual when shapes allow.
V2_S_STAGES = (
    _fused(1, 3, 1, 24, 2),
    _fused(4, 3, 2, 48, 4),
    _fused(4, 3, 2, 64, 4),
    _mb(4, 3, 2, 128, 6),
    _mb(6, 3, 1, 160, 9),
    _mb(6, 3, 2, 256, 15),
)
V2_M_STAGES = (
    _fused(1, 3, 1, 24, 3),
    _fused(4, 3, 2, 48, 5),
    _fused(4, 3, 2, 80, 5),
    _mb(4, 3, 2, 160, 7),
    _mb(6, 3, 1, 176, 14),
    _mb(6, 3, 2, 304, 18),
    _mb(6, 3, 1, 512, 5),
)
V2_L_STAGES = (
    _fused(1, 3, 1, 32, 4),
    _fused(4, 3, 2, 64, 7),
    _fused(4, 3, 2, 96, 7),
    _mb(4, 3, 2, 192, 10),
    _mb(6, 3, 1, 224, 19),
    _mb(6, 3, 2, 384, 25),
    _mb(6, 3, 1, 640, 7),
)


@dataclass(frozen=True)
class Family:
    """A base network that variants scale.

    Attributes:
        name: Family name.
        stages: Base stage table.
        stem_channels: Stem width before scaling.
        head_channels: Width of the final 1x1 conv before scaling.
        activation: Activation used everywhere (SE keeps the block's activation).
        scale_stem: Whether width scaling applies to the stem (Lite fixes it at 32).
        scale_head: Whether width scaling applies to the head (Lite fixes it at 1280).
        fix_first_last: Do not depth-scale the first and last stages (Lite).
    """

    name: str
    stages: tuple[StageSpec, ...]
    stem_channels: int = 32
    head_channels: int = 1280
    activation: Activation = "silu"
    scale_stem: bool = True
    scale_head: bool = True
    fix_first_last: bool = False


FAMILIES: dict[str, Family] = {
    "efficientnet": Family("efficientnet", B0_STAGES),
    "lite": Family(
        "lite", LITE_STAGES, activation="relu6", scale_stem=False, scale_head=False, fix_first_last=True
    ),
    "v2_s": Family("v2_s", V2_S_STAGES, stem_channels=24),
    "v2_m": Family("v2_m", V2_M_STAGES, stem_channels=24),
    "v2_l": Family("v2_l", V2_L_STAGES, stem_channels=32),
}


@dataclass(frozen=True)
class Variant:
    """Scaling coefficients of one named model.

    Attributes:
        family: Key into :data:`FAMILIES`.
        width: Channel multiplier (paper: w = beta^phi).
        depth: Repeat multiplier (paper: d = alpha^phi).
        resolution: Native (evaluation) input resolution.
        dropout: Dropout before the classifier.
    """

    family: str
    width: float
    depth: float
    resolution: int
    dropout: float


# (width, depth, resolution, dropout) of the reference implementation (efficientnet_builder.py);
# these are *not* exactly beta^phi / alpha^phi / 224 gamma^phi: the authors rounded them by hand.
VARIANTS: dict[str, Variant] = {
    "b0": Variant("efficientnet", 1.0, 1.0, 224, 0.2),
    "b1": Variant("efficientnet", 1.0, 1.1, 240, 0.2),
    "b2": Variant("efficientnet", 1.1, 1.2, 260, 0.3),
    "b3": Variant("efficientnet", 1.2, 1.4, 300, 0.3),
    "b4": Variant("efficientnet", 1.4, 1.8, 380, 0.4),
    "b5": Variant("efficientnet", 1.6, 2.2, 456, 0.4),
    "b6": Variant("efficientnet", 1.8, 2.6, 528, 0.5),
    "b7": Variant("efficientnet", 2.0, 3.1, 600, 0.5),
    "lite0": Variant("lite", 1.0, 1.0, 224, 0.2),
    "lite1": Variant("lite", 1.0, 1.1, 240, 0.2),
    "lite2": Variant("lite", 1.1, 1.2, 260, 0.3),
    "lite3": Variant("lite", 1.2, 1.4, 280, 0.3),
    "lite4": Variant("lite", 1.4, 1.8, 300, 0.3),
    "v2_s": Variant("v2_s", 1.0, 1.0, 384, 0.2),
    "v2_m": Variant("v2_m", 1.0, 1.0, 480, 0.3),
    "v2_l": Variant("v2_l", 1.0, 1.0, 480, 0.4),
}

# The paper's reported size and cost (Table 2): parameters (millions), FLOPs (billions,
# counted as multiply-adds) at the native resolution.
PAPER_COST: dict[str, tuple[float, float]] = {
    "b0": (5.3, 0.39),
    "b1": (7.8, 0.70),
    "b2": (9.2, 1.0),
    "b3": (12.0, 1.8),
    "b4": (19.0, 4.2),
    "b5": (30.0, 9.9),
    "b6": (43.0, 19.0),
    "b7": (66.0, 37.0),
    "v2_s": (22.0, 8.8),
    "v2_m": (54.0, 24.0),
    "v2_l": (120.0, 53.0),
}
