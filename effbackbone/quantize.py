"""int8 post-training quantization: ONNX Runtime static QDQ (or OpenVINO + NNCF), calibrated on the user's images.

``quantize_int8(model, calibration)`` exports the float model with BN folded
(:func:`effbackbone.runtime.export_for_runtime`), calibrates activation ranges on the given batches,
stores weights as per-output-channel int8 and activations as uint8 in QuantizeLinear/DequantizeLinear
(QDQ) pairs, and returns an :class:`Int8Model` that ONNX Runtime runs with int8 kernels and that is
called like the float model. docs/deploy.md has the measurements behind each default (backend,
calibration method, weight range). ``backend="openvino"`` converts the model with OpenVINO and quantizes it
with NNCF instead (:mod:`effbackbone.ov_runtime`): faster on x86 CPUs for SiLU/SE networks (B0, U-Net-B0,
EfficientDet-D0), saved as OpenVINO IR (``.xml`` + ``.bin``).

Weights use 7 bits of the int8 range by default (``reduce_range=True``): on x86 CPUs without VNNI,
ONNX Runtime's u8 x s8 kernels sum pairs of products in int16 (``vpmaddubsw``), which saturates with
full-range weights; on Lite0 that cost 0.23 of top-1 agreement with fp32 (docs/deploy.md). The mean
error that rounding the weights leaves in every channel is then removed from the biases
(:mod:`effbackbone.bias_correction`, Nagel et al. 2019): on Lite0 it raised top-1 agreement with fp32
from 0.80 to 0.93.

Torch only at import; ``onnx``/``onnxruntime`` are imported when needed (``effbackbone[deploy]``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from effbackbone.bias_correction import correct_biases
from effbackbone.export import INPUT_NAME, _require, graph_constants
from effbackbone.runtime import (
    FILE_RUNTIMES,
    SUFFIX_OF,
    InputRules,
    OnnxModel,
    describe_model,
    export_for_runtime,
    input_rules,
    read_metadata,
    runtime_of,
    write_metadata,
)  # fmt: skip

if TYPE_CHECKING:
    import numpy as np

    from effbackbone.ov_runtime import OpenVinoModel

Calibration = Literal["minmax", "percentile", "entropy"]
Backend = Literal["onnxruntime", "openvino"]
BACKENDS = tuple(FILE_RUNTIMES.values())
_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


class Int8Model(OnnxModel):
    """An int8 ONNX file run by ONNX Runtime (see :class:`~effbackbone.runtime.OnnxModel`).

    ``metadata["quantization"]`` records how it was made (backend, calibration, weight range).
    """

    @property
    def quantization(self) -> dict[str, Any]:
        """How the model was quantized."""
        return dict(self.metadata["quantization"])


def quantize_int8(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    output_path: str | Path | None = None,
    method: Calibration = "minmax",
    per_channel: bool = True,
    reduce_range: bool = True,
    bias_correction: bool = True,
    max_batches: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    num_threads: int | None = None,
    size_divisibility: int | None = None,
    backend: Backend = "onnxruntime",
) -> Int8Model | OpenVinoModel:
    """Quantize a float model to int8 with ONNX Runtime static QDQ quantization (or OpenVINO + NNCF).

    Args:
        model: An encoder or classifier (:func:`effbackbone.create_model`), an smp model on our
            encoder, or an effdet ``EfficientDet`` (not a bench). It is not changed.
        calibration: Batches of images ``(N, C, H, W)``, float and normalised exactly as for the
            float model (tensors or arrays; ``(image, ...)`` tuples and ``{"image": ...}`` dicts from a
            DataLoader work). 64 training images were enough for Lite0 (docs/deploy.md).
        output_path: Also save the file there (``.onnx``; ``.xml`` with ``backend="openvino"``).
        method: Activation ranges from the calibration ``minmax`` (default; as good as the histogram
            methods on Lite0 and much faster), ``percentile`` (99.999%) or ``entropy`` (KL). ONNX Runtime only.
        per_channel: One weight scale per output channel (needed for depthwise convolutions). OpenVINO's
            weights are always per channel.
        reduce_range: 7-bit weights; see the module docstring. ``False`` is for VNNI-only targets. ONNX
            Runtime only: NNCF handles the int16 overflow of non-VNNI CPUs itself.
        bias_correction: Subtract each layer's mean weight-rounding error from its bias, measured on
            the calibration batches (:func:`effbackbone.bias_correction.correct_biases`).
        max_batches: Use at most this many batches of ``calibration``.
        mean: Per-channel mean the images are normalised with, stored in the file for ``predict``.
        std: Per-channel std, likewise.
        metadata: More JSON-serialisable entries for the file (e.g. ``{"classes": [...]}``).
        num_threads: ONNX Runtime intra-op threads of the returned model.
        size_divisibility: The file accepts only heights and widths that are multiples of this
            (:func:`effbackbone.runtime.export_for_runtime`); 32 lets a TF-padded encoder or classifier
            fold its padding into the convolutions (Lite0 int8: 1.3x faster). smp models and
            EfficientDet do so by themselves.
        backend: ``"onnxruntime"`` (an ``.onnx`` file that runs everywhere ONNX Runtime does) or
            ``"openvino"`` (OpenVINO IR for x86 CPUs; ``effbackbone[openvino]``). docs/deploy.md compares them.

    Returns:
        The int8 model (:class:`Int8Model`, or :class:`~effbackbone.ov_runtime.OpenVinoModel` for OpenVINO);
        ``model(x)`` has the float model's kind of output (tensor, dict or tuple of lists).

    Raises:
        ValueError: ``calibration`` is empty or a batch is not what the model takes (the message
            says which batch, what it was and what is expected).
        TypeError: A batch is not a float tensor/array, or ``model`` is an effdet bench.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    _check_backend(backend, method, per_channel, output_path)
    rules = input_rules(describe_model(model), size_divisibility)
    batches = calibration_batches(calibration, rules, max_batches)
    if backend == "openvino":
        from effbackbone.ov_runtime import quantize_openvino

        result = quantize_openvino(
            model, batches, mean=mean, std=std, metadata=metadata, size_divisibility=size_divisibility,
            bias_correction=bias_correction, num_threads=num_threads,
        )  # fmt: skip
        if output_path is not None:
            result.save(output_path)
        return result
    ort_q = _require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="effbackbone-int8-") as tmp:
        fp32, pre, int8 = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        export_for_runtime(
            model, fp32, torch.from_numpy(batches[0][:1]), mean=mean, std=std, metadata=metadata,
            size_divisibility=size_divisibility,
        )  # fmt: skip
        # ORT's recommended pre-processing (graph optimisation, shape inference); the symbolic pass
        # cannot follow our dynamic height/width and is not needed for CPU QDQ.
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        ort_q.quantize_static(
            str(pre), str(int8), _reader(batches), quant_format=ort_q.QuantFormat.QDQ,
            activation_type=ort_q.QuantType.QUInt8, weight_type=ort_q.QuantType.QInt8,
            per_channel=per_channel, reduce_range=reduce_range, nodes_to_exclude=_infinite_pads(pre),
            calibrate_method=getattr(ort_q.CalibrationMethod, _METHODS[method]),
        )  # fmt: skip
        corrected = correct_biases(pre, int8, batches) if bias_correction else 0
        # quantize_static keeps the graph but not always the metadata: write it again, with the recipe.
        entries = read_metadata(_require("onnx").load(str(fp32)))
        entries.pop("version", None)
        entries["quantization"] = {
            "backend": "onnxruntime-qdq", "weights": "int8, per channel" if per_channel else "int8, per tensor",
            "reduce_range": reduce_range, "activations": "uint8", "calibration": method,
            "bias_correction": bool(bias_correction), "bias_corrected_layers": corrected,
            "calibration_batches": len(batches), "calibration_images": int(sum(b.shape[0] for b in batches)),
        }  # fmt: skip
        write_metadata(int8, entries)
        result = Int8Model(int8.read_bytes(), num_threads=num_threads)
    if output_path is not None:
        result.save(output_path)
    return result


def _check_backend(backend: str, method: str, per_channel: bool, output_path: str | Path | None) -> None:
    """Refuse a backend, option or file name that does not go with the backend, before any work."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    suffix = SUFFIX_OF[backend]
    if output_path is not None and runtime_of(output_path) != backend:
        raise ValueError(f"output_path {output_path}: backend={backend!r} writes a {suffix} file; name it "
                         f"<something>{suffix}")  # fmt: skip
    if backend == "openvino" and (method != "minmax" or not per_channel):
        option = f"method={method!r}" if method != "minmax" else "per_channel=False"
        raise ValueError(f"{option} is an ONNX Runtime option; OpenVINO's NNCF calibrates with min/max and "
                         "per-channel weights. Leave it out, or use backend='onnxruntime'")  # fmt: skip


def load_int8(path: str | Path, **kwargs: Any) -> Int8Model | OpenVinoModel:
    """Load a file saved by :func:`quantize_int8`: ``.onnx``, or OpenVINO's ``.xml``.

    ``kwargs``: ``num_threads``, and ``providers`` for ONNX Runtime.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no int8 model file at {path}")
    if runtime_of(path) == "openvino":
        from effbackbone.ov_runtime import load_openvino_model

        model: Int8Model | OpenVinoModel = load_openvino_model(path, **kwargs)
    else:
        model = Int8Model(path, **kwargs)
    if "quantization" not in model.metadata:
        raise ValueError(f"{path} is not an int8 file from quantize_int8 (no quantization metadata)")
    return model


def calibration_batches(
    calibration: Iterable[Any], rules: InputRules, max_batches: int | None = None
) -> list[np.ndarray]:
    """Check and collect calibration batches as float32 arrays (what the ORT calibrator reads).

    Raises:
        ValueError: No batch, or a batch of the wrong shape / channels / size, or non-finite values.
        TypeError: A batch that is not a float tensor/array.
    """
    import numpy as np

    if isinstance(calibration, (Tensor, np.ndarray)):
        raise TypeError(
            f"calibration is one {type(calibration).__name__} of shape {tuple(calibration.shape)}; expected an "
            "iterable of batches, e.g. [batch] or a DataLoader"
        )
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    out: list[np.ndarray] = []
    for i, item in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        x = _image_of(item)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        what = f"calibration batch {i}"
        rules.check(x, what)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what} has NaN or infinite values")
        out.append(x.detach().to("cpu", torch.float32).contiguous().numpy())
    if not out:
        raise ValueError(
            f"calibration gave no batches; quantize_int8 needs at least one {rules.expected()}, "
            "normalised as for the float model (e.g. 8 batches of 8 training images)"
        )
    return out


def _image_of(item: Any) -> Any:
    """The image tensor of a DataLoader item: the item itself, ``item[0]`` or ``item["image"]``."""
    if isinstance(item, Mapping):
        if "image" not in item:
            raise TypeError(f"calibration batch is a dict with keys {sorted(item)}; expected an 'image' key")
        return item["image"]
    if isinstance(item, (tuple, list)) and item and hasattr(item[0], "shape"):
        return item[0]
    return item


def _infinite_pads(path: Path) -> list[str]:
    """Keep -inf Pad nodes, and the pools that read them, in float; make their pad value finite.

    "Same" max-pooling pads with -inf. A fixed-size EfficientDet's pads fold into its MaxPools
    (:func:`effbackbone.export.fold_pads`); a Pad whose size depends on the input's stays. Quantized,
    -inf becomes NaN and poisons every later level; calibrated, its tensor's range starts at -inf,
    which gives an infinite scale and stops the histogram calibrators. So these nodes stay in float,
    and the pad value becomes float32's lowest number, which changes no max (``path`` is rewritten).

    Returns:
        The names of the nodes to keep in float.
    """
    import numpy as np

    onnx = _require("onnx")
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    tensors = graph_constants(graph)
    names, padded = [], set()
    for node in graph.node:
        if node.op_type == "Pad" and len(node.input) > 2 and node.input[2] in tensors:
            value = numpy_helper.to_array(tensors[node.input[2]])
            if not np.isfinite(value).all():
                lowest = np.full_like(value, np.finfo(value.dtype).min)
                tensors[node.input[2]].CopyFrom(numpy_helper.from_array(lowest, node.input[2]))
                names.append(node.name)
                padded.add(node.output[0])
    names += [n.name for n in graph.node if padded & set(n.input)]
    if names:
        onnx.save(proto, str(path))
    return names


def _reader(batches: list[np.ndarray]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` that feeds the collected batches once."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._iter: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._iter, None)
            return None if x is None else {INPUT_NAME: x}

    return _Reader()


__all__ = ["Int8Model", "calibration_batches", "load_int8", "quantize_int8"]
