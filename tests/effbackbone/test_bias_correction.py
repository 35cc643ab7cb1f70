"""Bias correction of int8 models: the mean per-channel error that weight rounding leaves is removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from effbackbone.quantize import quantize_int8  # noqa: E402


def test_bias_correction_removes_the_mean_channel_error() -> None:
    # A depthwise then a pointwise convolution, as in an MBConv block. Inputs with a mean of 3 make the
    # rounding shift (W_q - W) E[x] large next to the activations' own (unbiased) rounding noise.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 32, 1)).eval()
    calibration = [3 + torch.randn(4, 8, 32, 32) for _ in range(4)]
    corrected = quantize_int8(model, calibration)
    plain = quantize_int8(model, calibration, bias_correction=False)
    assert corrected.quantization["bias_correction"] is True
    assert corrected.quantization["bias_corrected_layers"] == 2
    assert plain.quantization["bias_corrected_layers"] == 0
    x = 3 + torch.randn(8, 8, 32, 32)  # new images from the calibration's distribution
    with torch.no_grad():
        ref = model(x)

    def channel_mean_error(out: torch.Tensor) -> float:
        """Mean over channels of |mean over images and pixels of (int8 - fp32)|, relative to the fp32 spread."""
        return float((out - ref).mean((0, 2, 3)).abs().mean() / ref.std())

    # Measured: 0.0003 corrected against 0.008 plain (seeds 0-2).
    assert channel_mean_error(corrected(x)) < 0.2 * channel_mean_error(plain(x))
    # The correction moves the biases only: the int8 outputs stay as close to fp32 as before, or closer.
    assert float((corrected(x) - ref).abs().mean()) <= float((plain(x) - ref).abs().mean())
