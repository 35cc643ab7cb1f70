"""Quantized models shared by test_quantize.py and test_quantize_openvino.py (each quantized once per session)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import effbackbone

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="session")
def tf_encoder() -> nn.Module:
    """B0 with TF "same" padding cut after C3, BatchNorm statistics from one random batch."""
    from tests.effbackbone.test_quantize import _calibrate_bn

    torch.manual_seed(0)
    return _calibrate_bn(effbackbone.create_model("b0", tf_compat=True, out_indices=(0, 1, 2)), 64)


@pytest.fixture(scope="session")
def tf_encoder_int8(tf_encoder: nn.Module):  # noqa: ANN201 - an Int8Model
    """``tf_encoder`` quantized by ONNX Runtime, with mean/std in its metadata."""
    from effbackbone.quantize import quantize_int8
    from tests.effbackbone.test_quantize import _calibration

    torch.manual_seed(1)
    return quantize_int8(tf_encoder, _calibration(), mean=MEAN, std=STD)


@pytest.fixture(scope="session")
def tf_encoder_ov(tf_encoder: nn.Module):  # noqa: ANN201 - an OpenVinoModel
    """``tf_encoder`` quantized by OpenVINO + NNCF, with mean/std in its metadata."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from effbackbone.quantize import quantize_int8
    from tests.effbackbone.test_quantize import _calibration

    torch.manual_seed(1)
    return quantize_int8(tf_encoder, _calibration(), mean=MEAN, std=STD, backend="openvino", num_threads=1)
