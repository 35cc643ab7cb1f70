"""GPU deployment paths: AMP, compile, TensorRT (torch-tensorrt) and ONNX Runtime's GPU providers.

Marked ``gpu`` and skipped without CUDA; the TensorRT and ONNX Runtime GPU tests also skip when their
packages (torch-tensorrt, onnxruntime-gpu) are not installed. The last test runs everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effbackbone
from effbackbone.fuse import optimize_for_inference

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")


def _encoder() -> nn.Module:
    """B0 cut after C3, BN statistics from one random batch (so activations are O(1))."""
    torch.manual_seed(0)
    model = effbackbone.create_model("b0", out_indices=(0, 1, 2))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    return model.eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1).float().cpu(), b.flatten(1).float().cpu()).min())


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_channels_last_close_to_fp32(dtype: torch.dtype) -> None:
    model, x = _encoder(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    fast = optimize_for_inference(model, channels_last=True).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        out = fast(x.cuda().contiguous(memory_format=torch.channels_last))
    for name in ref:
        assert _cos(out[name], ref[name]) > 0.99, name


@gpu
@needs_cuda
def test_compiled_matches_eager_on_gpu() -> None:
    model, x = _encoder(), torch.randn(2, 3, 64, 64)
    fast = optimize_for_inference(model, channels_last=True).cuda()
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, out = fast(xc), torch.compile(fast)(xc)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-3, atol=1e-3)


@gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None, reason="torch-tensorrt is not installed")
def test_tensorrt_fp16_close_to_fp32() -> None:
    from effbackbone.gpu_deploy import tensorrt_compile

    model, x = _encoder(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    out = tensorrt_compile(model, x, precision="fp16")(x)
    for name in ref:
        assert _cos(out[name], ref[name]) > 0.99, name


def _providers() -> list[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return onnxruntime.get_available_providers()


@gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "provider"), [("fp32", "CUDAExecutionProvider"),
                                                      ("fp16", "TensorrtExecutionProvider"),
                                                      ("int8", "TensorrtExecutionProvider")])  # fmt: skip
def test_onnxruntime_gpu_close_to_fp32(precision: str, provider: str) -> None:
    if provider not in _providers():
        pytest.skip(f"this ONNX Runtime has no {provider} (install onnxruntime-gpu)")
    from effbackbone.gpu_deploy import onnxruntime_gpu

    model, x = _encoder(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    run = onnxruntime_gpu(model, x, precision=precision, calibration=[torch.randn(2, 3, 64, 64) for _ in range(4)])
    assert provider in run.session.get_providers()
    out = run(x)
    for name in ref:
        assert _cos(out[name], ref[name]) > (0.98 if precision == "int8" else 0.99), name


def test_gpu_paths_fail_clearly_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from effbackbone.gpu_deploy import tensorrt_compile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        tensorrt_compile(_encoder(), torch.randn(1, 3, 64, 64))
