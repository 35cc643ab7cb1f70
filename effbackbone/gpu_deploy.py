"""GPU deployment: TensorRT through torch-tensorrt or ONNX Runtime's TensorRT / CUDA execution providers.

Two routes, both behind one function each and both needing an NVIDIA GPU:

* :func:`tensorrt_compile`: ``torch_tensorrt.compile`` (its ``torch.export``-based ``dynamo`` front end) of the
  model with BN folded, fp16 or fp32, for one input shape. Install the torch-tensorrt release that matches
  torch (``pip install "torch-tensorrt==2.14.*"`` for torch 2.14; it brings TensorRT).
* :func:`onnxruntime_gpu`: the exported ONNX file (:func:`effbackbone.runtime.export_for_runtime`) in ONNX
  Runtime with the TensorRT provider (fp16, or int8 from the QDQ file of :func:`effbackbone.quantize.quantize_int8`,
  whose scales TensorRT reads) or the CUDA provider (fp32). Needs ``onnxruntime-gpu`` instead of
  ``onnxruntime`` (and TensorRT's libraries for the TensorRT provider).

Written against the documented APIs and run only where a GPU is lent (``tests/effbackbone/test_gpu_deploy.py``,
marker ``gpu``; ``benchmarks/gpu_rows.sh``). Torch only at import.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from effbackbone.export import _require
from effbackbone.fuse import optimize_for_inference
from effbackbone.runtime import OnnxModel, export_for_runtime

_PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}


def _need_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")


def tensorrt_compile(
    model: nn.Module, example: Tensor, *, precision: Literal["fp16", "fp32"] = "fp16"
) -> Callable[[Tensor], Any]:
    """Compile ``model`` with torch-tensorrt for the shape of ``example``; returns ``fn(images) -> outputs``.

    Args:
        model: An encoder, classifier, smp model or EfficientDet network (not changed).
        example: An input batch of the shape to build the engine for (other shapes rebuild or fail).
        precision: ``fp16`` (the model and inputs in half precision: TensorRT's fp16 kernels) or ``fp32``.

    Returns:
        A callable taking float images on any device and returning the model's outputs, as float32 on the GPU.
    """
    _need_cuda("TensorRT")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    trt = _torch_tensorrt()
    dtype = _PRECISIONS[precision]
    fused = optimize_for_inference(model).to("cuda", dtype).eval()
    x = example.to("cuda", dtype)
    try:  # releases with weak typing take the precisions to allow; later ones follow the model's dtype
        compiled = trt.compile(fused, ir="dynamo", inputs=[x], enabled_precisions={dtype})
    except TypeError:
        compiled = trt.compile(fused, ir="dynamo", inputs=[x])

    def run(images: Tensor) -> Any:  # noqa: ANN401 - the model's kind of output
        with torch.inference_mode():
            return _to_float(compiled(images.to("cuda", dtype)))

    return run


def onnxruntime_gpu(
    model: nn.Module,
    example: Tensor,
    *,
    precision: Literal["fp32", "fp16", "int8"] = "fp16",
    calibration: Iterable[Any] | None = None,
    cache_dir: str | Path | None = None,
) -> OnnxModel:
    """The model in ONNX Runtime on the GPU: CUDA provider (fp32) or TensorRT provider (fp16, int8).

    Args:
        model: As :func:`effbackbone.runtime.export_for_runtime` takes.
        example: An example input batch (export shape check).
        precision: ``fp32`` (CUDA provider), ``fp16`` (TensorRT, fp16 kernels allowed) or ``int8`` (TensorRT
            running the int8 QDQ file of :func:`~effbackbone.quantize.quantize_int8`, calibrated on ``calibration``).
        calibration: Batches for ``int8`` (as ``quantize_int8`` takes them).
        cache_dir: Where TensorRT keeps its built engines (building one takes minutes); default: a temporary folder.

    Returns:
        An :class:`~effbackbone.runtime.OnnxModel` (inputs and outputs are CPU tensors, as on the CPU).

    Raises:
        RuntimeError: No GPU, or the installed ONNX Runtime lacks the provider (``pip install onnxruntime-gpu``).
    """
    _need_cuda("ONNX Runtime on the GPU")
    ort = _require("onnxruntime")
    wanted = "CUDAExecutionProvider" if precision == "fp32" else "TensorrtExecutionProvider"
    if wanted not in ort.get_available_providers():
        raise RuntimeError(
            f"this ONNX Runtime has no {wanted} (it has {ort.get_available_providers()}); install onnxruntime-gpu "
            "in place of onnxruntime" + (" and TensorRT's libraries" if wanted.startswith("Tensorrt") else "")
        )
    cache = str(cache_dir or tempfile.mkdtemp(prefix="effbackbone-trt-"))
    trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                   "trt_fp16_enable": precision != "fp32", "trt_int8_enable": precision == "int8"}  # fmt: skip
    providers: list[Any] = [("CUDAExecutionProvider", {})]
    if wanted == "TensorrtExecutionProvider":
        providers.insert(0, ("TensorrtExecutionProvider", trt_options))
    if precision == "int8":
        if calibration is None:
            raise ValueError("precision='int8' needs calibration batches (as quantize_int8 takes them)")
        from effbackbone.quantize import quantize_int8

        data = quantize_int8(copy.deepcopy(model).cpu(), calibration)._bytes
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_for_runtime(copy.deepcopy(model).cpu(), Path(tmp) / "m.onnx", example.cpu())
            data = path.read_bytes()
    return OnnxModel(data, providers=providers)


def _torch_tensorrt() -> Any:  # noqa: ANN401 - the module
    import importlib.util

    if importlib.util.find_spec("torch_tensorrt") is None:
        release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        raise ImportError(f"TensorRT compilation needs torch-tensorrt matching torch {torch.__version__}: "
                          f'pip install "torch-tensorrt=={release}.*"')  # fmt: skip
    import torch_tensorrt

    return torch_tensorrt


def _to_float(out: Any) -> Any:  # noqa: ANN401 - tensors, or dicts/lists/tuples of them
    if isinstance(out, Tensor):
        return out.float()
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out


__all__ = ["onnxruntime_gpu", "tensorrt_compile"]
