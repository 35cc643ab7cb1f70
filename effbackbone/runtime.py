"""Whole models as ONNX files for ONNX Runtime, with the metadata that running them needs.

:func:`export_for_runtime` exports an encoder, a classifier, an smp model or an EfficientDet with BN
folded, and :class:`OnnxModel` runs the file and returns the float model's kind of output (a logits
tensor, a ``{"C1": ...}`` dict, effdet's ``([class per level], [box per level])``). Nested outputs
are flattened to named ONNX outputs and the nesting is kept as JSON in the file's ``metadata_props``
next to the input rules (channels, size divisibility or fixed size, mean/std), so a file is
self-describing: ``load_onnx_model(path)(images)`` needs nothing else. :mod:`effbackbone.quantize`
builds its int8 files on this.

Torch only at import; ``onnx`` and ``onnxruntime`` are imported when needed (``effbackbone[deploy]``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effbackbone.arch import VARIANTS
from effbackbone.export import _require, export_module_onnx, fold_pads
from effbackbone.fuse import fuse_bn
from effbackbone.model import EfficientNet

META = "effbackbone."  # prefix of every metadata key we write
# Each runtime's file format, by suffix: quantize_int8's backends write them, load_runtime_file and predict read them.
FILE_RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino"}
SUFFIX_OF = {runtime: suffix for suffix, runtime in FILE_RUNTIMES.items()}


def runtime_of(path: str | Path) -> str | None:
    """``onnxruntime`` or ``openvino`` by the file's suffix (:data:`FILE_RUNTIMES`); ``None`` for any other."""
    return FILE_RUNTIMES.get(Path(path).suffix.lower())

Outputs = Tensor | dict[str, Any] | list[Any] | tuple[Any, ...]


@dataclass(frozen=True)
class InputRules:
    """What an input batch must look like.

    Attributes:
        channels: ``C`` of ``(N, C, H, W)``.
        size_divisibility: ``H`` and ``W`` must be multiples of this (1 = any size).
        fixed_size: ``(H, W)`` when the model only runs at one size (EfficientDet's anchors), else ``None``.
        mean: Per-channel mean the images were normalised with (``None``: not recorded).
        std: Per-channel std, likewise.
    """

    channels: int
    size_divisibility: int = 1
    fixed_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def expected(self) -> str:
        """The rule in words, for error messages."""
        if self.fixed_size is not None:
            size = f"H x W = {self.fixed_size[0]} x {self.fixed_size[1]}"
        elif self.size_divisibility > 1:
            size = f"H and W multiples of {self.size_divisibility}"
        else:
            size = "any H and W"
        return f"a 4-D float batch (N, {self.channels}, H, W) with {size}"

    def check(self, x: Any, what: str = "input") -> None:
        """Raise ``ValueError``/``TypeError`` naming ``what`` unless ``x`` is such a batch."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} is a {type(x).__name__}; expected {self.expected()} as a torch.Tensor")
        shape = tuple(x.shape)
        if x.dim() != 4:
            fix = " (add the batch dimension: x[None])" if x.dim() == 3 else ""
            raise ValueError(f"{what} has shape {shape}; expected {self.expected()}{fix}")
        if not x.is_floating_point():
            raise TypeError(
                f"{what} has dtype {x.dtype}; expected {self.expected()}, normalised as for the float model "
                "(e.g. x.float() / 255, then mean/std)"
            )
        if shape[1] != self.channels:
            raise ValueError(f"{what} has {shape[1]} channels (shape {shape}); expected {self.expected()}")
        h, w = shape[2], shape[3]
        if self.fixed_size is not None and (h, w) != tuple(self.fixed_size):
            raise ValueError(f"{what} has shape {shape}; expected {self.expected()} (resize or pad the images)")
        d = self.size_divisibility
        if h % d or w % d:
            raise ValueError(f"{what} has shape {shape}; expected {self.expected()} (pad to the next multiple)")


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`describe_model` found.

    Attributes:
        kind: ``encoder``, ``classifier``, ``segmentation`` (smp), ``efficientdet`` or ``module``.
        variant: The EfficientNet variant inside (``"b0"``, ``"lite0"``, ``"custom"``) or ``None``.
        rules: The input rules.
        padding: ``"same"`` (TF) or ``"symmetric"``, of the EfficientNet inside (``None`` if none).
    """

    kind: str
    variant: str | None
    rules: InputRules
    padding: str | None = None


def describe_model(model: nn.Module) -> ModelInfo:
    """Kind, variant and input rules of an encoder, classifier, smp model or EfficientDet.

    Raises:
        TypeError: ``model`` is an effdet bench (its NMS output is not a network output): pass ``bench.model``.
    """
    inner = next((m for m in model.modules() if isinstance(m, EfficientNet)), None)
    variant = None if inner is None else next((k for k, v in VARIANTS.items() if v == inner.cfg.variant), "custom")
    padding = None if inner is None else inner.cfg.padding
    channels = inner.cfg.in_channels if inner is not None else _first_conv_channels(model)
    if isinstance(model, EfficientNet):
        kind = "encoder" if model.features_only else "classifier"
        return ModelInfo(kind, variant, InputRules(channels, 1), padding)
    if _is_effdet(getattr(model, "model", None)) and hasattr(model, "anchors"):
        raise TypeError(
            f"{type(model).__name__} is an effdet bench (anchors, NMS); pass the network, bench.model, "
            "and decode its class/box outputs with effdet's post-processing"
        )
    if _is_effdet(model):
        config = model.config
        size = tuple(int(s) for s in config.image_size)
        rules = InputRules(channels, 2 ** int(config.max_level), (size[0], size[1]))
        return ModelInfo("efficientdet", variant, rules, padding)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(model, "decoder") and hasattr(model, "segmentation_head"):
        stride = int(getattr(encoder, "output_stride", 32))
        return ModelInfo("segmentation", variant, InputRules(channels, stride), padding)
    return ModelInfo("module", variant, InputRules(channels, 1), padding)


def _is_effdet(model: object) -> bool:
    return type(model).__name__ == "EfficientDet" and hasattr(model, "config") and hasattr(model, "class_net")


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise TypeError(f"{type(model).__name__} has no Conv2d; expected an image model taking (N, C, H, W)")
    return conv.in_channels


# -- nested outputs <-> flat named outputs -----------------------------------------------------------


def flatten_outputs(out: Outputs, names: Any) -> list[Tensor]:
    """The tensors of ``out`` in the order of the name tree ``names`` (see :func:`output_tree`)."""
    if isinstance(names, str):
        return [out]  # type: ignore[list-item]
    ((kind, sub),) = names.items()
    items = [out[k] for k in sub] if kind == "dict" else list(out)  # type: ignore[index, arg-type]
    children = list(sub.values()) if kind == "dict" else sub
    return [t for item, child in zip(items, children, strict=True) for t in flatten_outputs(item, child)]


def unflatten_outputs(flat: Mapping[str, Tensor], names: Any) -> Outputs:
    """Rebuild the nested outputs from ``{name: tensor}`` and the name tree."""
    if isinstance(names, str):
        return flat[names]
    ((kind, sub),) = names.items()
    if kind == "dict":
        return {k: unflatten_outputs(flat, v) for k, v in sub.items()}
    items = [unflatten_outputs(flat, v) for v in sub]
    return tuple(items) if kind == "tuple" else items


def output_tree(out: Outputs, info: ModelInfo, model: nn.Module) -> Any:
    """A JSON name tree for the outputs: a name per tensor, ``{"dict"|"list"|"tuple": ...}`` around them."""
    if info.kind == "efficientdet":
        levels = [f"P{i}" for i in range(int(model.config.min_level), int(model.config.max_level) + 1)]
        return {"tuple": [{"list": [f"{head}_{lv}" for lv in levels]} for head in ("class", "box")]}
    return _names(out, "logits" if info.kind == "classifier" else "output")


def _names(out: Outputs, prefix: str) -> Any:
    if isinstance(out, Tensor):
        return prefix
    if isinstance(out, Mapping):
        return {"dict": {str(k): (str(k) if isinstance(v, Tensor) else _names(v, str(k))) for k, v in out.items()}}
    if isinstance(out, (list, tuple)):
        kind = "tuple" if isinstance(out, tuple) else "list"
        return {kind: [_names(v, f"{prefix}_{i}") for i, v in enumerate(out)]}
    raise TypeError(f"model output of type {type(out).__name__} cannot be exported; expected tensors, dicts, lists")


def leaf_names(names: Any) -> list[str]:
    """The flat output names of a name tree, in order."""
    if isinstance(names, str):
        return [names]
    ((kind, sub),) = names.items()
    return [n for child in (sub.values() if kind == "dict" else sub) for n in leaf_names(child)]


class _Flat(nn.Module):
    """The model with its outputs flattened to a tuple (what ONNX export needs)."""

    def __init__(self, model: nn.Module, names: Any) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Run the model and flatten its outputs."""
        return tuple(flatten_outputs(self.model(x), self.names))


# -- export ------------------------------------------------------------------------------------------


def export_for_runtime(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dynamo: bool = False,
    size_divisibility: int | None = None,
) -> Path:
    """Export ``model`` (BN folded, eval mode) to an ONNX file that :class:`OnnxModel` runs.

    Batch is dynamic, and so are height and width unless the model has a fixed size (EfficientDet).
    When every input size the file accepts is a multiple of the encoder's stride (smp models,
    EfficientDet, or ``size_divisibility`` given), TF "same" padding is exported as constants folded
    into the convolutions (:meth:`~effbackbone.model.EfficientNet.set_static_padding`), which ONNX
    Runtime runs faster, most of all in int8.

    Args:
        model: An encoder/classifier, an smp model or an effdet ``EfficientDet`` (not changed).
        path: Destination ``.onnx`` file.
        example: An example batch ``(N, C, H, W)``, checked against the model's input rules.
        mean: Per-channel mean of the input normalisation, stored for ``predict``.
        std: Per-channel std, likewise.
        metadata: More JSON-serialisable entries for the file (e.g. ``{"classes": [...]}``).
        dynamo: Use torch's ``torch.export``-based exporter instead of the legacy one (slower to
            export: about 45 s against 1 s for Lite0; the two files run the same).
        size_divisibility: Only accept heights and widths that are multiples of this (a multiple of
            the model's own rule; e.g. 32 for an encoder or classifier deployed at 224 or 512). With
            a multiple of the encoder's stride, TF padding becomes constant (see above). ``None``:
            the model's own rule (any size for encoders and classifiers).

    Returns:
        The path written.
    """
    prepared = prepare_for_runtime(model, example, mean=mean, std=std, size_divisibility=size_divisibility)
    dims = (0,) if prepared.rules.fixed_size is not None else (0, 2, 3)
    path = Path(path)
    export_module_onnx(prepared.flat, path, example, prepared.output_names, dynamic_dims=dims, dynamo=dynamo)
    fold_pads(path)
    write_metadata(path, prepared.metadata(metadata))
    return path


@dataclass
class Prepared:
    """A model made ready for a runtime: BN folded, outputs flattened, its input rules and metadata.

    Attributes:
        flat: The network (eval mode, BN folded, static TF padding where exact) returning a tuple of tensors.
        info: What :func:`describe_model` found.
        rules: The input rules of the file (with mean/std when given).
        outputs: The name tree of the outputs (:func:`output_tree`).
    """

    flat: nn.Module
    info: ModelInfo
    rules: InputRules
    outputs: Any

    @property
    def output_names(self) -> list[str]:
        """The flat output names, in the order ``flat`` returns them."""
        return leaf_names(self.outputs)

    def metadata(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``effbackbone.*`` entries every runtime file carries, plus ``extra``."""
        info = self.info
        meta = {"kind": info.kind, "variant": info.variant, "padding": info.padding, "input": asdict(self.rules)}
        return {**meta, "outputs": self.outputs, **dict(extra or {})}


def prepare_for_runtime(
    model: nn.Module,
    example: Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size_divisibility: int | None = None,
) -> Prepared:
    """A copy of ``model`` ready to export or convert (see :func:`export_for_runtime` for the arguments)."""
    info = describe_model(model)
    base = input_rules(info, size_divisibility)
    base.check(example, "example")
    fused = fuse_bn(copy.deepcopy(model).float(), inplace=True)  # eval mode, BN folded
    set_static_padding_where_exact(fused, base)
    with torch.no_grad():
        names = output_tree(fused(example), info, fused)
    rules = replace(
        base, mean=None if mean is None else tuple(float(v) for v in mean),
        std=None if std is None else tuple(float(v) for v in std),
    )  # fmt: skip
    return Prepared(_Flat(fused, names).eval(), info, rules, names)


def input_rules(info: ModelInfo, size_divisibility: int | None = None) -> InputRules:
    """The model's input rules, made stricter by a requested ``size_divisibility``.

    Raises:
        ValueError: ``size_divisibility`` is not a positive multiple of the model's own rule, or the
            model has a fixed input size.
    """
    rules = info.rules
    if size_divisibility is None:
        return rules
    own = rules.size_divisibility
    if rules.fixed_size is not None:
        raise ValueError(
            f"size_divisibility={size_divisibility} for a model with a fixed input size {rules.fixed_size}: "
            "leave it out (None)"
        )
    if size_divisibility < 1 or size_divisibility % own:
        raise ValueError(
            f"size_divisibility must be a positive multiple of the model's own {own}, got {size_divisibility}; "
            f"e.g. {max(own, 32)}"
        )
    return replace(rules, size_divisibility=int(size_divisibility))


def set_static_padding_where_exact(model: nn.Module, rules: InputRules) -> bool:
    """Switch the encoders in ``model`` to static TF padding when every size ``rules`` allow keeps it exact.

    Exact when each size is a multiple of the encoder's own stride (``size_divisibility``): then
    every strided conv sees an even size. Returns whether it was switched.
    """
    encoders = [m for m in model.modules() if isinstance(m, EfficientNet) and m.cfg.padding == "same"]
    if not encoders:
        return False
    sizes = rules.fixed_size if rules.fixed_size is not None else (rules.size_divisibility,)
    if any(size % enc.size_divisibility for enc in encoders for size in sizes):
        return False
    for enc in encoders:
        enc.set_static_padding(True)
    return True


def write_metadata(path: str | Path, entries: Mapping[str, Any]) -> None:
    """Set ``effbackbone.<key>`` = JSON(value) in an ONNX file's ``metadata_props`` (in place)."""
    onnx = _require("onnx")
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    from effbackbone import __version__

    props.update({META + "version": __version__, **{META + k: json.dumps(v) for k, v in entries.items()}})
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def read_metadata(proto: Any) -> dict[str, Any]:
    """Our ``effbackbone.*`` entries of an ONNX ``ModelProto``, JSON-decoded, without the prefix."""
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        if p.key.startswith(META):
            key = p.key.removeprefix(META)
            out[key] = p.value if key == "version" else json.loads(p.value)
    return out


# -- running ------------------------------------------------------------------------------------------


def rules_of(metadata: Mapping[str, Any]) -> InputRules:
    """The input rules stored in a file's metadata (its ``input`` entry)."""
    raw = dict(metadata["input"])
    for key in ("fixed_size", "mean", "std"):
        raw[key] = None if raw.get(key) is None else tuple(raw[key])
    return InputRules(**raw)


class OnnxModel:
    """An exported (or quantized) file run by ONNX Runtime, called like the float model.

    Args:
        model: The ``.onnx`` file's bytes, or its path.
        num_threads: ONNX Runtime intra-op threads (``None``: its default, the physical cores).
        providers: ONNX Runtime execution providers.

    Attributes:
        metadata: The file's ``effbackbone.*`` entries (``kind``, ``variant``, ``input``, ``outputs``, ...).
        rules: The input rules every call is checked against.
    """

    def __init__(
        self, model: bytes | str | Path, *, num_threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:  # fmt: skip
        onnx = _require("onnx")
        ort = _require("onnxruntime")
        self._bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.metadata = read_metadata(onnx.load_from_string(self._bytes))
        if "outputs" not in self.metadata or "input" not in self.metadata:
            raise ValueError(
                "the ONNX file has no effbackbone metadata (outputs, input rules); "
                "export it with effbackbone.runtime.export_for_runtime or effbackbone.quantize.quantize_int8"
            )
        self.rules = rules_of(self.metadata)
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(self._bytes, options, providers=list(providers))
        self._names = leaf_names(self.metadata["outputs"])
        self._input = self.session.get_inputs()[0].name  # ``input``; ``image`` in a segmentation task's export

    @property
    def kind(self) -> str:
        """``encoder``, ``classifier``, ``segmentation``, ``efficientdet`` or ``module``."""
        return str(self.metadata["kind"])

    @property
    def size_bytes(self) -> int:
        """Size of the file."""
        return len(self._bytes)

    def __call__(self, x: Tensor, what: str = "input") -> Outputs:
        """Run a batch ``(N, C, H, W)``; returns the float model's kind of output, as CPU float tensors.

        ``what`` names the input in the error a wrong batch raises.
        """
        self.rules.check(x, what)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        results = self.session.run(self._names, {self._input: array})
        flat = {n: torch.from_numpy(r) for n, r in zip(self._names, results, strict=True)}
        return unflatten_outputs(flat, self.metadata["outputs"])

    def save(self, path: str | Path) -> Path:
        """Write the ``.onnx`` file (metadata included); parent folders are created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._bytes)
        return path


def load_onnx_model(path: str | Path, **kwargs: Any) -> OnnxModel:
    """Load a file written by :func:`export_for_runtime` or ``quantize_int8`` (kwargs: see :class:`OnnxModel`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    return OnnxModel(path, **kwargs)


def load_runtime_file(path: str | Path, *, num_threads: int | None = None) -> Any:  # noqa: ANN401
    """An ``.onnx`` file as :class:`OnnxModel`, an OpenVINO ``.xml`` as :class:`~effbackbone.ov_runtime.OpenVinoModel`.

    Both are called like the float model and have ``metadata``, ``rules``, ``kind``, ``size_bytes`` and ``save``.
    """
    if runtime_of(path) == "openvino":
        from effbackbone.ov_runtime import load_openvino_model

        return load_openvino_model(path, num_threads=num_threads)
    return load_onnx_model(path, num_threads=num_threads)


def to_runtime(model: nn.Module, example: Tensor, *, num_threads: int | None = None, **kwargs: Any) -> OnnxModel:
    """Export ``model`` to a temporary file and load it: the fp32 ONNX Runtime model (the deployment row).

    ``kwargs`` go to :func:`export_for_runtime`; ``num_threads`` to :class:`OnnxModel`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = export_for_runtime(model, Path(tmp) / "model.onnx", example, **kwargs)
        return OnnxModel(path.read_bytes(), num_threads=num_threads)


__all__ = [
    "InputRules",
    "FILE_RUNTIMES",
    "SUFFIX_OF",
    "ModelInfo",
    "OnnxModel",
    "describe_model",
    "export_for_runtime",
    "load_onnx_model",
    "load_runtime_file",
    "prepare_for_runtime",
    "read_metadata",
    "rules_of",
    "runtime_of",
    "to_runtime",
    "write_metadata",
]
