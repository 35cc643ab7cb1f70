"""Small building layers: convolutions with symmetric or TF "same" padding, SE, drop path."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Padding = Literal["symmetric", "same"]


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding for strided convolutions.

    TF pads ``total = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)`` with the odd pixel on the
    bottom/right, so the padding depends on the input size. It is computed from the input's shape
    with integer arithmetic only (no ``math.ceil``, no data-dependent branch), which keeps ONNX
    export with dynamic height/width, TorchScript and ``torch.compile`` working.
    State-dict keys equal ``nn.Conv2d``'s (and timm's ``Conv2dSame``).

    With :attr:`static_pad` set (:meth:`effbackbone.model.EfficientNet.set_static_padding`) the pad is
    the constant it takes for inputs whose size is a multiple of the stride, ``k_eff - s``: an exported
    graph then has a constant Pad that runtimes fold into the convolution, instead of a shape
    computation and a Pad node per strided conv (which an int8 graph runs in float).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        # Only valid when the pad can never be negative, i.e. the receptive field exceeds the
        # stride; every strided conv of EfficientNet (k >= 3, s = 2) satisfies this.
        if (kernel_size - 1) * dilation + 1 <= stride:
            raise ValueError("Conv2dSame needs (k - 1) * d + 1 > stride")
        self.static_pad = False

    def forward(self, x: Tensor) -> Tensor:
        """Pad as TF "SAME" would, then convolve."""
        ih, iw = x.shape[-2], x.shape[-1]
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        if self.static_pad:  # what the formula below gives for multiples of the stride, as a constant
            if not torch.jit.is_scripting():
                _check_static_pad(ih, iw, s)
            pad_h = pad_w = max((k - 1) * d + 1 - s, 0)
        else:
            pad_h = ((ih + s - 1) // s - 1) * s + (k - 1) * d + 1 - ih
            pad_w = ((iw + s - 1) // s - 1) * s + (k - 1) * d + 1 - iw
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _check_static_pad(ih: int, iw: int, stride: int) -> None:
    """Eager guard of the static pad: it equals TF "same" only for sizes that are multiples of the stride."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return  # the exporter's contract (size_divisibility) guards the traced sizes
    if ih % stride or iw % stride:
        raise ValueError(
            f"a {ih}x{iw} input reached a stride-{stride} conv with static padding, which is TF 'same' only for "
            f"multiples of the stride; pad the image to a multiple of the model's size_divisibility, "
            "or call set_static_padding(False)"
        )


def create_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    padding: Padding = "symmetric",
    bias: bool = False,
) -> nn.Conv2d:
    """A Conv2d with symmetric padding, or TF "same" padding.

    For stride 1 and odd kernels, "same" is symmetric and static, so a plain Conv2d serves both;
    only strided "same" convolutions need the dynamic :class:`Conv2dSame`.
    """
    if padding == "same" and stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride, dilation, groups, bias)
    pad = (kernel_size - 1) // 2 * dilation
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, dilation, groups, bias)


def conv_like(
    conv: nn.Conv2d,
    padding: Padding,
    *,
    stride: int | None = None,
    dilation: int | None = None,
    weight: Tensor | None = None,
) -> nn.Conv2d:
    """``conv`` rebuilt with another stride, dilation or weight, as :func:`create_conv` would build it.

    The result shares ``conv``'s bias and (unless ``weight`` is given) its weight ``Parameter``, so
    device, dtype, ``requires_grad`` and optimizer references are kept; its input width follows
    ``weight``. The swap matters because the padding differs: a strided TF "same" conv pads
    dynamically (:class:`Conv2dSame`), a dilated one symmetrically. Hooks on ``conv`` are not copied.
    """
    source = conv.weight if weight is None else weight
    with torch.device("meta"):  # shapes only: the parameters come from ``conv`` / ``weight``
        new = create_conv(
            source.shape[1] * conv.groups,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0] if stride is None else stride,
            conv.dilation[0] if dilation is None else dilation,
            conv.groups,
            padding,
            conv.bias is not None,
        )
    new.weight = (
        source if isinstance(source, nn.Parameter) else nn.Parameter(source, requires_grad=conv.weight.requires_grad)
    )
    new.bias = conv.bias
    return new.train(conv.training)


def create_act(name: str) -> nn.Module:
    """The activation module for a family (``silu`` or ``relu6``)."""
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {name!r}; expected 'silu' or 'relu6'")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as EfficientNet uses it.

    The reduced width is ``se_ratio`` times the *block input* channels (paper; TF reference
    ``num_reduced_filters = max(1, int(input_filters * se_ratio))``), not of the expanded width the
    SE is applied to. The inner activation is the block's (SiLU), the gate a sigmoid.
    """

    def __init__(self, channels: int, reduced: int, act: str = "silu") -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = create_act(act)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel of ``x`` by a gate computed from its global average."""
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * s.sigmoid()


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample while training."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        """Zero whole samples with probability ``rate`` and rescale the rest by ``1 / (1 - rate)``."""
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        """Show the rate in ``print(model)``."""
        return f"rate={self.rate:.3f}"


def adapt_stem_weight(weight: Tensor, in_channels: int, mode: str = "repeat") -> Tensor:
    """Adapt a pretrained 3-channel stem kernel to ``in_channels`` input channels.

    Modes:
        ``repeat`` (default, timm's rule): cycle the R, G, B filters over the new channels and scale
        by ``3 / in_channels``; for one channel this is the sum of R, G, B, i.e. exactly what a
        grayscale image copied to RGB would give.
        ``mean``: every channel gets the mean RGB filter times ``3 / in_channels``.
        ``rgb_zero``: the first three channels keep R, G, B, the others start at zero, so the model
        behaves exactly as the RGB one until it learns to use the extra channels.
        ``random``: keep the freshly initialised stem.
    """
    out_c, src_c, kh, kw = weight.shape
    if in_channels == src_c:
        return weight
    if mode == "repeat":
        if in_channels == 1:
            return weight.sum(1, keepdim=True)  # as documented (timm, smp): gray = R + G + B filters
        idx = torch.arange(in_channels) % src_c
        return weight[:, idx] * (src_c / in_channels)
    if mode == "mean":
        return weight.mean(1, keepdim=True).expand(out_c, in_channels, kh, kw) * (src_c / in_channels)
    if mode == "rgb_zero":
        new = weight.new_zeros(out_c, in_channels, kh, kw)
        n = min(in_channels, src_c)
        new[:, :n] = weight[:, :n]
        return new
    raise ValueError(f"unknown stem_adapt {mode!r}; expected 'repeat', 'mean', 'rgb_zero' or 'random'")
