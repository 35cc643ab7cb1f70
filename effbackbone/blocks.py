"""EfficientNet blocks with timm's sub-module names, so timm weights load with no renaming.

=================  ==========================================  ==================================
block              paper                                       sub-modules (forward order)
=================  ==========================================  ==================================
DepthwiseSeparable MBConv1 (expand ratio 1)                    conv_dw bn1 se conv_pw bn2
MBConv             MBConv6 (inverted residual)                 conv_pw bn1 conv_dw bn2 se conv_pwl bn3
FusedMBConv        Fused-MBConv (V2)                           conv_exp bn1 se conv_pwl bn2
ConvBlock          Fused-MBConv with expand ratio 1 (V2)        conv bn1
=================  ==========================================  ==================================

The projection conv has no activation (linear bottleneck, MobileNetV2), and the residual is added
only when stride is 1 and the widths match; stochastic depth drops the residual branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from effbackbone.layers import DropPath, Padding, SqueezeExcite, conv_like, create_act, create_conv
from effbackbone.scaling import make_divisible

NormFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class BlockConfig:
    """Everything one block needs.

    Attributes:
        in_channels: Input width.
        out_channels: Output width.
        kernel: Kernel of the depthwise / fused conv.
        stride: Stride of that conv.
        dilation: Dilation of that conv (for output_stride < 32).
        expand_ratio: Expansion of the input width.
        se_ratio: SE width as a fraction of ``in_channels`` (0 = no SE).
        act: Activation name.
        padding: ``"symmetric"`` or TF ``"same"``.
        drop_path: Stochastic depth rate of this block.
    """

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    dilation: int
    expand_ratio: int
    se_ratio: float
    act: str
    padding: Padding
    drop_path: float

    @property
    def has_skip(self) -> bool:
        """Whether the block adds its input back (identity shortcut)."""
        return self.stride == 1 and self.in_channels == self.out_channels

    @property
    def mid_channels(self) -> int:
        """The expanded width."""
        return make_divisible(self.in_channels * self.expand_ratio)

    def se(self, channels: int) -> nn.Module:
        """The SE module (or identity), reduced from the block *input* width."""
        if self.se_ratio <= 0:
            return nn.Identity()
        return SqueezeExcite(channels, max(1, round(self.in_channels * self.se_ratio)), self.act)


class _Residual(nn.Module):
    """Shared tail: drop path + identity shortcut.

    Subclasses set ``self.has_skip`` in ``__init__``; there is deliberately no class-level annotation,
    because with postponed annotations TorchScript sees the string ``'bool'`` and cannot script the model.
    """

    def _finish(self, x: Tensor, shortcut: Tensor) -> Tensor:
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class DepthwiseSeparable(_Residual):
    """MBConv with expand ratio 1: depthwise conv, SE, 1x1 projection."""

    def __init__(self, cfg: BlockConfig, norm: NormFactory) -> None:
        super().__init__()
        c_in = cfg.in_channels
        self.has_skip = cfg.has_skip
        self.conv_dw = create_conv(c_in, c_in, cfg.kernel, cfg.stride, cfg.dilation, c_in, cfg.padding)
        self.bn1 = norm(c_in)
        self.act1 = create_act(cfg.act)
        self.se = cfg.se(c_in)
        self.conv_pw = create_conv(c_in, cfg.out_channels, 1)
        self.bn2 = norm(cfg.out_channels)
        self.drop_path = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Run the block."""
        shortcut = x
        x = self.act1(self.bn1(self.conv_dw(x)))
        x = self.bn2(self.conv_pw(self.se(x)))
        return self._finish(x, shortcut)


class MBConv(_Residual):
    """Mobile inverted bottleneck (MBConv): 1x1 expand, depthwise kxk, SE, 1x1 projection."""

    def __init__(self, cfg: BlockConfig, norm: NormFactory) -> None:
        super().__init__()
        mid = cfg.mid_channels
        self.has_skip = cfg.has_skip
        self.conv_pw = create_conv(cfg.in_channels, mid, 1)
        self.bn1 = norm(mid)
        self.act1 = create_act(cfg.act)
        self.conv_dw = create_conv(mid, mid, cfg.kernel, cfg.stride, cfg.dilation, mid, cfg.padding)
        self.bn2 = norm(mid)
        self.act2 = create_act(cfg.act)
        self.se = cfg.se(mid)
        self.conv_pwl = create_conv(mid, cfg.out_channels, 1)
        self.bn3 = norm(cfg.out_channels)
        self.drop_path = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Run the block."""
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(self.se(x)))
        return self._finish(x, shortcut)


class FusedMBConv(_Residual):
    """Fused-MBConv (EfficientNetV2): one kxk expansion conv replaces 1x1 expand + depthwise."""

    def __init__(self, cfg: BlockConfig, norm: NormFactory) -> None:
        super().__init__()
        mid = cfg.mid_channels
        self.has_skip = cfg.has_skip
        self.conv_exp = create_conv(cfg.in_channels, mid, cfg.kernel, cfg.stride, cfg.dilation, 1, cfg.padding)
        self.bn1 = norm(mid)
        self.act1 = create_act(cfg.act)
        self.se = cfg.se(mid)
        self.conv_pwl = create_conv(mid, cfg.out_channels, 1)
        self.bn2 = norm(cfg.out_channels)
        self.drop_path = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Run the block."""
        shortcut = x
        x = self.act1(self.bn1(self.conv_exp(x)))
        x = self.bn2(self.conv_pwl(self.se(x)))
        return self._finish(x, shortcut)


class ConvBlock(_Residual):
    """Fused-MBConv with expand ratio 1 (EfficientNetV2 stage 1): a single kxk conv + BN + act."""

    def __init__(self, cfg: BlockConfig, norm: NormFactory) -> None:
        super().__init__()
        self.has_skip = cfg.has_skip
        self.conv = create_conv(cfg.in_channels, cfg.out_channels, cfg.kernel, cfg.stride, cfg.dilation, 1, cfg.padding)
        self.bn1 = norm(cfg.out_channels)
        self.act1 = create_act(cfg.act)
        self.drop_path = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Run the block."""
        shortcut = x
        x = self.act1(self.bn1(self.conv(x)))
        return self._finish(x, shortcut)


def create_block(kind: str, cfg: BlockConfig, norm: NormFactory) -> nn.Module:
    """Pick the block class for a stage-table row."""
    if kind == "mbconv":
        return MBConv(cfg, norm) if cfg.expand_ratio != 1 else DepthwiseSeparable(cfg, norm)
    if kind == "fused":
        return FusedMBConv(cfg, norm) if cfg.expand_ratio != 1 else ConvBlock(cfg, norm)
    raise ValueError(f"unknown block kind {kind!r}")


# The one conv of each block that strides or dilates (the others are 1x1).
_SPATIAL_CONV: tuple[tuple[type[nn.Module], str], ...] = (
    (DepthwiseSeparable, "conv_dw"),
    (MBConv, "conv_dw"),
    (FusedMBConv, "conv_exp"),
    (ConvBlock, "conv"),
)


def set_block_geometry(block: nn.Module, cfg: BlockConfig) -> None:
    """Give a built block the stride, dilation and shortcut of ``cfg``, in place; weights are kept.

    The spatial conv is rebuilt only when its stride or dilation changes (see
    :func:`~effbackbone.layers.conv_like`); the shortcut follows the stride as at construction.
    """
    name = next((n for cls, n in _SPATIAL_CONV if isinstance(block, cls)), None)
    if name is None:
        raise TypeError(f"{type(block).__name__} is not an EfficientNet block")
    conv = getattr(block, name)
    if (conv.stride[0], conv.dilation[0]) != (cfg.stride, cfg.dilation):
        setattr(block, name, conv_like(conv, cfg.padding, stride=cfg.stride, dilation=cfg.dilation))
    block.has_skip = cfg.has_skip
