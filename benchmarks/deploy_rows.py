"""The rows of bench_deploy: each a callable ``fn(images) -> outputs`` built from the float model.

CPU rows: the peer (reference, A/A copy), our eager fp32, fast mode, ``torch.compile``, bf16 autocast,
ONNX Runtime fp32 and int8, pruned in fast mode and in int8. CUDA rows: the same in fp32, AMP fp16/bf16,
compiled with and without AMP, TensorRT (torch-tensorrt, or ONNX Runtime's TensorRT/CUDA providers) where
installed. A row that cannot be built is kept with its error (the table says why it is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from effbackbone.fuse import optimize_for_inference
from effbackbone.prune import prune_expansion

Fn = Callable[[Tensor], Any]
EAGER = "ours eager fp32"


@dataclass
class Row:
    """One way to run the model."""

    name: str
    fn: Fn | None
    size_mb: float | None = None
    note: str = ""
    peer: bool = False
    accuracy: dict[str, float] = field(default_factory=dict)
    error: str = ""


def param_mb(model: nn.Module) -> float:
    """Parameter and buffer bytes (the weights a process holds), in MB."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def timed_call(fn: Fn, x: Tensor, device: torch.device) -> Callable[[], Any]:
    """A no-argument call for the timer (waits for the GPU to finish on CUDA)."""

    def call() -> Any:  # noqa: ANN401
        out = fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def torch_fn(model: nn.Module, device: torch.device, channels_last: bool, amp: torch.dtype | None = None) -> Fn:
    """``model`` under ``inference_mode`` (and autocast to ``amp``), inputs moved to its device and layout."""
    model = model.to(device).eval()

    def fn(x: Tensor) -> Any:  # noqa: ANN401
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return model(x)

    return fn


def _build(name: str, make: Callable[[], Row]) -> Row:
    """``make()``, or a row that carries the error."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - a missing backend or failed compile is reported, not fatal
        traceback.print_exc()
        print(f"[row failed] {name}: {type(e).__name__}: {e}")
        return Row(name, None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def _compiled(model: nn.Module, example: Tensor, device: torch.device, amp: torch.dtype | None = None) -> Row:
    """``torch.compile`` (inductor, default mode) of the fast model; the first call compiles (timed)."""
    fast = optimize_for_inference(model, channels_last=True).to(device)
    compiled = torch.compile(fast)
    fn = torch_fn(compiled, device, True, amp)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    fn(example)
    fn(example)
    name = "ours fast + torch.compile" + (f" + AMP {_dtype_name(amp)}" if amp is not None else "")
    return Row(name, fn, param_mb(fast), f"compiled in {time.perf_counter() - t0:.0f} s")


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32") if dtype is not None else "fp32"


def peer_rows(build: Callable[[], nn.Module], name: str, device: torch.device) -> list[Row]:
    """The timm peer in channels_last (the reference) and an A/A copy built the same way."""
    rows = []
    for label in (f"{name} channels_last (reference)", f"{name} channels_last (A/A copy)"):

        def make(label: str = label) -> Row:
            model = build().to(memory_format=torch.channels_last)
            return Row(label, torch_fn(model, device, True), param_mb(model), peer=True)

        rows.append(_build(label, make))
    return rows


def float_rows(
    model: nn.Module, example: Tensor, device: torch.device, args: argparse.Namespace, bf16: bool = True
) -> list[Row]:
    """Our model: eager fp32, fast mode, compiled; bf16 autocast (CPU, when ``bf16``) or AMP fp16/bf16 (CUDA)."""
    eager = copy.deepcopy(model) if device.type == "cuda" else model  # the float model stays on the CPU
    rows = [Row(EAGER, torch_fn(eager, device, False), param_mb(model))]
    fast = optimize_for_inference(model, channels_last=True)
    rows.append(Row("ours fast (BN folded, channels_last)", torch_fn(fast, device, True), param_mb(fast)))
    amps = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.bfloat16] if bf16 else []
    for amp in amps:
        label = "autocast" if device.type == "cpu" else "AMP"
        rows.append(Row(f"ours fast, {label} {_dtype_name(amp)}", torch_fn(fast, device, True, amp), param_mb(fast)))
    if args.compile:
        rows.append(_build("ours fast + torch.compile", lambda: _compiled(model, example, device)))
        if device.type == "cuda":
            rows.append(_build("ours fast + torch.compile + AMP fp16",
                               lambda: _compiled(model, example, device, torch.float16)))  # fmt: skip
    return rows


def runtime_rows(
    model: nn.Module, example: Tensor, calibration: list[Tensor], device: torch.device, args: argparse.Namespace
) -> list[Row]:
    """ONNX Runtime fp32 and int8 (CPU); TensorRT and ONNX Runtime's GPU providers (CUDA)."""
    if device.type == "cuda":
        return gpu_runtime_rows(model, example, calibration, args)
    from effbackbone.quantize import quantize_int8
    from effbackbone.runtime import to_runtime

    multiple = deploy_multiple(model, example)

    def fp32() -> Row:
        ort = to_runtime(model, example[:1], num_threads=args.threads, size_divisibility=multiple)
        return Row("ONNX Runtime fp32", ort, ort.size_bytes / 1e6, _multiple_note(multiple))

    def int8() -> Row:
        t0 = time.perf_counter()
        q = quantize_int8(model, calibration, num_threads=args.threads, size_divisibility=multiple)
        note = ", ".join(filter(None, [f"quantized in {time.perf_counter() - t0:.0f} s", _multiple_note(multiple)]))
        return Row("ONNX Runtime int8", q, q.size_bytes / 1e6, note)

    def int8_full() -> Row:
        q = quantize_int8(model, calibration, num_threads=args.threads, size_divisibility=multiple, reduce_range=False)
        note = ", ".join(filter(None, ["reduce_range=False", _multiple_note(multiple)]))
        return Row(VNNI_ROW, q, q.size_bytes / 1e6, note)

    rows = [_build("ONNX Runtime fp32", fp32), _build("ONNX Runtime int8", int8)]
    if _has_vnni():  # full-range weights saturate the int16 pair sums of AVX2-only CPUs (docs/deploy.md)
        rows.append(_build(VNNI_ROW, int8_full))
    if args.openvino:
        rows.append(_build(OPENVINO_ROW, lambda: openvino_row(model, example, calibration, multiple, args.threads)))
    return rows


OPENVINO_ROW = "OpenVINO int8 (backend='openvino')"


def openvino_row(
    model: nn.Module, example: Tensor, calibration: list[Tensor], multiple: int | None, threads: int | None
) -> Row:
    """``quantize_int8(..., backend="openvino")``: converted from PyTorch, NNCF int8, an ``.xml`` for ``predict``.

    OpenVINO fuses SiLU and the SE gates into its int8 kernels, where ONNX Runtime runs them as separate int8 ops.
    """
    from effbackbone.quantize import quantize_int8

    t0 = time.perf_counter()
    q = quantize_int8(model, calibration, num_threads=threads, size_divisibility=multiple, backend="openvino")
    note = ", ".join(filter(None, [f"quantized in {time.perf_counter() - t0:.0f} s", _multiple_note(multiple)]))
    return Row(OPENVINO_ROW, q, q.size_bytes / 1e6, note)


VNNI_ROW = "ONNX Runtime int8, 8-bit weights (VNNI CPUs only)"


def _has_vnni() -> bool:
    from deploy_eval import cpu_flags

    flags = cpu_flags()
    return bool(flags.get("avx512_vnni") or flags.get("avx_vnni"))


def deploy_multiple(model: nn.Module, example: Tensor) -> int | None:
    """32 for a TF-padded encoder/classifier timed at multiples of 32 (its pads then fold into the convs).

    A deployment that feeds fixed-size images declares it (``size_divisibility=32``); smp models
    and EfficientDet have such a rule already, so they fold by themselves (``None`` here).
    """
    from effbackbone.model import EfficientNet

    same = isinstance(model, EfficientNet) and model.cfg.padding == "same"
    return 32 if same and not (example.shape[-1] % 32 or example.shape[-2] % 32) else None


def _multiple_note(multiple: int | None) -> str:
    return "" if multiple is None else f"size_divisibility={multiple}"


def gpu_runtime_rows(
    model: nn.Module, example: Tensor, calibration: list[Tensor], args: argparse.Namespace
) -> list[Row]:
    """torch-tensorrt fp16, and ONNX Runtime with the TensorRT (fp16, and int8 from our QDQ file) and CUDA providers."""
    from effbackbone.gpu_deploy import onnxruntime_gpu, tensorrt_compile

    rows = [_build("torch-tensorrt fp16", lambda: Row("torch-tensorrt fp16", tensorrt_compile(model, example)))]

    def ort(precision: str) -> Row:
        label = f"ONNX Runtime GPU {precision}"
        run = onnxruntime_gpu(model, example, precision=precision, calibration=calibration)  # type: ignore[arg-type]
        return Row(label, run, run.size_bytes / 1e6, ", ".join(run.session.get_providers()))

    for precision in ("fp32", "fp16", "int8"):
        rows.append(_build(f"ONNX Runtime GPU {precision}", lambda p=precision: ort(p)))
    return rows


def pruned_rows(
    model: nn.Module, example: Tensor, calibration: list[Tensor], device: torch.device, args: argparse.Namespace
) -> list[Row]:
    """Structured pruning of the expansion channels (not fine-tuned), in fast mode and in int8 / AMP fp16."""
    ratio = args.prune_ratio
    pruned = prune_expansion(model, ratio).eval()
    fast = optimize_for_inference(pruned, channels_last=True)
    note = "not fine-tuned"
    rows = [Row(f"pruned {ratio:g}, fast", torch_fn(fast, device, True), param_mb(fast), note)]
    if device.type == "cuda":
        rows.append(Row(f"pruned {ratio:g}, fast, AMP fp16", torch_fn(fast, device, True, torch.float16),
                        param_mb(fast), note))  # fmt: skip
        return rows
    from effbackbone.quantize import quantize_int8

    def int8() -> Row:
        multiple = deploy_multiple(model, example)
        q = quantize_int8(pruned, calibration, num_threads=args.threads, size_divisibility=multiple)
        return Row(f"pruned {ratio:g}, ONNX Runtime int8", q, q.size_bytes / 1e6, note)

    rows.append(_build(f"pruned {ratio:g}, ONNX Runtime int8", int8))
    return rows


__all__ = ["EAGER", "Row", "float_rows", "param_mb", "peer_rows", "pruned_rows", "runtime_rows", "timed_call"]
