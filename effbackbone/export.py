"""Deployment: ONNX with dynamic batch/height/width, TorchScript, and a ``torch.compile`` check.

Everything here works for both paddings. TF "same" padding (:class:`~effbackbone.layers.Conv2dSame`)
is computed from the input's shape with integer arithmetic, so the exporters record it as shape
ops (ONNX ``Shape -> Div -> Mul -> Sub -> Pad``) instead of freezing the pad of the export size,
and ``torch.compile(dynamic=True)`` treats it symbolically instead of recompiling per size.
For inputs that are multiples of the stride, :meth:`~effbackbone.model.EfficientNet.set_static_padding`
makes that pad a constant and :func:`fold_pads` writes it into the convolutions.

This module imports torch only; ``onnx``, ``onnxscript`` and ``onnxruntime`` are imported when a
function needs them (``pip install effbackbone[export]``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from effbackbone.model import EfficientNet

INPUT_NAME = "input"
LOGITS_NAME = "logits"


def output_names(model: EfficientNet) -> list[str]:
    """Names of the model's outputs: the level names (``C1``..``C5``) or ``["logits"]``."""
    _check_model(model)
    if model.features_only:
        return [s.name for s in model.feature_specs]
    return [LOGITS_NAME]


def export_onnx(
    model: EfficientNet,
    path: str | Path,
    *,
    input_size: Sequence[int] = (1, 3, 224, 224),
    dynamic: bool = True,
    opset: int | None = None,
    dynamo: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file, with dynamic batch, height and width by default.

    The graph has one input named ``input`` (N, C, H, W) and one output per returned level, named
    after the level (``C3`` ...), or a single ``logits`` output for a classifier. The model is
    exported in eval mode (BatchNorm uses its running statistics) and its mode is restored after.

    Args:
        model: An :class:`~effbackbone.model.EfficientNet` (encoder or classifier).
        path: Destination ``.onnx`` file; parent folders are created.
        input_size: Example input ``(N, C, H, W)`` used for tracing. With ``dynamic=True`` any
            batch, height and width work at run time, including sizes of another parity.
        dynamic: Mark batch, height and width dynamic. ``False`` fixes them to ``input_size``.
        opset: ONNX opset; ``None`` uses the exporter's default (18+ for the dynamo exporter).
        dynamo: Use the ``torch.export``-based exporter (default since torch 2.9; needs
            ``onnxscript``). ``False`` uses the legacy TorchScript-based exporter, which torch
            deprecates but which runs an order of magnitude faster and handles the same model.

    Returns:
        The path written. Weights are stored inside the file unless the model exceeds 2 GB.

    Raises:
        ValueError: ``input_size`` is not ``(N, C, H, W)`` with the model's input channels.
        ImportError: ``dynamo=True`` and ``onnxscript`` is not installed.
    """
    example = _example_input(model, input_size)
    names = output_names(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = (0, 2, 3) if dynamic else ()
    with _eval_mode(model):
        if dynamo:
            _require("onnxscript")
            _export_dynamo(model, example, path, names, dims, opset)
        else:
            _export_legacy(model, example, path, names, dims, opset)
    return path


def export_module_onnx(
    module: nn.Module,
    path: str | Path,
    example: Tensor,
    output_names: Sequence[str],
    *,
    dynamic_dims: Sequence[int] = (0, 2, 3),
    opset: int | None = None,
    dynamo: bool = True,
) -> Path:
    """Export any module that maps one ``(N, C, H, W)`` tensor to a tensor or a tuple of tensors.

    :func:`export_onnx` is this for an :class:`~effbackbone.model.EfficientNet`; whole task models
    (an smp U-Net, an EfficientDet) go through here with their outputs flattened to a tuple
    (:mod:`effbackbone.runtime` does that). The input is named ``input``.

    Args:
        module: The module, exported in eval mode (its mode is restored after).
        path: Destination ``.onnx`` file; parent folders are created.
        example: An example input ``(N, C, H, W)``.
        output_names: One name per returned tensor, in order.
        dynamic_dims: Input dims left dynamic: ``(0, 2, 3)`` = batch, height and width; ``(0,)`` =
            batch only (models with a fixed input size, such as EfficientDet's anchors); ``()`` = none.
        opset: ONNX opset; ``None`` uses the exporter's default.
        dynamo: ``torch.export``-based exporter (default) or the legacy TorchScript-based one.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = tuple(sorted({int(d) for d in dynamic_dims}))
    if any(d not in (0, 2, 3) for d in dims):
        raise ValueError(f"dynamic_dims must be a subset of (0, 2, 3) (batch, height, width), got {dynamic_dims}")
    names = list(output_names)
    with _eval_mode(module):
        if dynamo:
            _require("onnxscript")
            _export_dynamo(module, example, path, names, dims, opset)
        else:
            with torch.no_grad():
                ranks = [t.dim() for t in _as_tuple(module(example))]
            _export_legacy(module, example, path, names, dims, opset, ranks)
    return path


def _export_dynamo(
    model: nn.Module, example: Tensor, path: Path, names: list[str], dims: tuple[int, ...], opset: int | None
) -> None:
    from torch.export import Dim

    shapes = None
    if dims:
        # min=2 for H/W: the exporter's size-oblivious tracing cannot prove anything for 1-pixel
        # inputs, which are useless for a stride-32 network anyway. Named dims show up in the graph.
        named = {0: Dim("batch", min=1), 2: Dim("height", min=2), 3: Dim("width", min=2)}
        shapes = ({d: named[d] for d in dims},)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=[INPUT_NAME],
        output_names=names,
        opset_version=opset,
        verbose=False,
    )
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    # save() keeps the weights inside the .onnx file unless the model is over 2 GB.
    program.save(str(path))


def _export_legacy(
    model: nn.Module,
    example: Tensor,
    path: Path,
    names: list[str],
    dims: tuple[int, ...],
    opset: int | None,
    ranks: Sequence[int] | None = None,
) -> None:
    axes: dict[str, dict[int, str]] | None = None
    if dims:
        labels = {0: "batch", 2: "height", 3: "width"}
        axes = {INPUT_NAME: {d: labels[d] for d in dims}}
        # Outputs: the batch dim, plus the spatial dims of 4-D outputs when the input's are dynamic.
        ranks = ranks if ranks is not None else [2 if n == LOGITS_NAME else 4 for n in names]
        for n, rank in zip(names, ranks, strict=True):
            axes[n] = {d: (labels[d] if d == 0 else f"{n}_{labels[d]}") for d in dims if d < rank}
    with warnings.catch_warnings():
        # A constant F.pad (static TF padding) exports its pads through a step -1 Slice, which torch's constant
        # folding skips with this warning; fold_pads evaluates that chain and writes the pads into the convs.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1 can be constant folded")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def fold_pads(path: str | Path) -> int:
    """Fold constant Pad nodes into the convolutions and max-pools they feed; rewrite ``path`` in place.

    ONNX ``Conv`` and ``MaxPool`` take asymmetric ``pads`` themselves (zeros for Conv, ignored
    positions, i.e. -inf, for MaxPool), so ``Pad(0) -> Conv`` and ``Pad(-inf) -> MaxPool`` are one
    node. ONNX Runtime's own Pad fusion does not run on these graphs (nor between an int8 graph's
    quantize nodes); an unfolded Pad costs a copy of the tensor per strided conv, and in an int8
    graph a dequantize, a float Pad and a quantize. A -inf Pad (effdet's "same" max-pooling) also
    cannot be calibrated: its range starts at -inf. Pads computed from shapes fold when the
    shapes are static apart from the batch (EfficientDet's fixed size).

    Returns:
        The number of Pad nodes folded.
    """
    onnx = _require("onnx")
    path = Path(path)
    proto = onnx.load(str(path))
    total = 0
    # Each round can make more shapes static (a folded pool's output size becomes known), so
    # the pads after it fold in the next round.
    while folded := _fold_pads_once(onnx, proto):
        total += folded
    if total:
        _drop_dead_nodes(proto.graph)
        onnx.save(proto, str(path))
    return total


def graph_constants(graph: Any) -> dict[str, Any]:
    """``{name: TensorProto}`` of a graph's initializers and ``Constant`` node values (the tensors, editable)."""
    tensors = {t.name: t for t in graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})  # fmt: skip
    return tensors


def _fold_pads_once(onnx: ModuleType, proto: Any) -> int:
    graph = proto.graph
    constant = _ConstantEvaluator(onnx, proto)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    removed = []
    for node in graph.node:
        if node.op_type != "Pad" or node.output[0] in outputs or (len(node.input) > 3 and node.input[3]):
            continue  # (explicit axes, opset 18: not what the exporters write for F.pad)
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        pads = constant.value(node.input[1]) if len(node.input) > 1 else None
        value = constant.value(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        users = consumers.get(node.output[0], [])
        if mode != "constant" or pads is None or value is None or len(pads) != 8 or pads[:2].any() or pads[4:6].any():
            continue
        target = "Conv" if float(value) == 0.0 else "MaxPool" if float(value) == float("-inf") else None
        if not users or any(u.op_type != target for u in users):
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for u in users for a in u.attribute):
            continue
        extra = [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]  # top, left, bottom, right
        for user in users:
            attr = next((a for a in user.attribute if a.name == "pads"), None)
            old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
            new = [a + b for a, b in zip(old, extra, strict=True)]
            if attr is None:
                user.attribute.append(onnx.helper.make_attribute("pads", new))
            else:
                del attr.ints[:]
                attr.ints.extend(new)
            user.input[0] = node.input[0]
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _drop_dead_nodes(graph: Any) -> None:
    """Remove nodes none of whose outputs is used (the shape arithmetic of the folded pads)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


class _ConstantEvaluator:
    """Values of a graph's tensors that constants and static shapes determine.

    The legacy exporter leaves a Concat/Reshape/Slice/Transpose/Cast chain for ``F.pad``'s pads,
    and timm's "same" padding computes them from ``Shape``. A ``Shape`` whose only unknown dim is
    the batch is evaluated with batch 1 and 2: a value that does not change depends on static dims only.
    """

    def __init__(self, onnx: ModuleType, proto: Any) -> None:
        from onnx import numpy_helper

        self.onnx, self.graph = onnx, proto.graph
        self.values = {name: numpy_helper.to_array(t) for name, t in graph_constants(self.graph).items()}
        self.shapes = _static_shapes(onnx, proto)
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.order = {n.output[0]: i for i, n in enumerate(self.graph.node)}

    def value(self, name: str) -> Any:  # noqa: ANN401 - a NumPy array or None
        """The value of ``name``, or ``None`` when it depends on the input or on the batch size (cached)."""
        if name in self.values:
            return self.values[name]
        import numpy as np
        from onnx.reference import ReferenceEvaluator

        helper = self.onnx.helper
        nodes, shape_leaves, stack, seen = [], {}, [name], set()
        while stack:
            current = stack.pop()
            if current in seen or current in self.values or not current:
                continue
            seen.add(current)
            node = self.producer.get(current)
            if node is None:
                return None  # a graph input
            if node.op_type == "Shape":
                dims = self.shapes.get(node.input[0])
                if node.attribute or dims is None or None in dims[1:]:
                    return None
                shape_leaves[node.output[0]] = dims
                continue
            nodes.append(node)
            stack.extend(node.input)
        nodes.sort(key=lambda n: self.order[n.output[0]])
        leaves = {i for n in nodes for i in n.input if i in self.values}
        results = []
        for batch in (1, 2):
            feeds = {
                k: np.array([batch if dims[0] is None else dims[0], *dims[1:]], dtype=np.int64)
                for k, dims in shape_leaves.items()
            }
            if name in feeds:
                results.append(feeds[name])
                continue
            inputs = [helper.make_tensor_value_info(k, self.onnx.TensorProto.INT64, [len(v)]) for k, v in feeds.items()]
            sub = helper.make_graph(
                nodes, "pads", inputs, [helper.make_tensor_value_info(name, self.onnx.TensorProto.UNDEFINED, None)],
                [self.onnx.numpy_helper.from_array(self.values[i], i) for i in leaves],
            )  # fmt: skip
            try:
                results.append(ReferenceEvaluator(helper.make_model(sub)).run(None, feeds)[0])
            except Exception:  # noqa: BLE001 - an op the reference cannot run: leave the Pad alone
                return None
        if results[0].shape != results[1].shape or not np.array_equal(results[0], results[1]):
            return None  # depends on the batch size
        self.values[name] = results[0]
        return results[0]


def _static_shapes(onnx: ModuleType, proto: Any) -> dict[str, list[int | None]]:
    """Inferred tensor shapes (``None`` for a symbolic dim)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - no shapes: only constant pads fold
        return {}
    shapes = {}
    for info in (*inferred.value_info, *inferred.input):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def verify_onnx(
    path: str | Path,
    model: EfficientNet,
    inputs: Sequence[Tensor],
    *,
    atol: float = 1e-4,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, float]:
    """Run an exported file with onnxruntime and compare it with ``model`` in eval mode.

    Args:
        path: The ``.onnx`` file.
        model: The PyTorch model it was exported from.
        inputs: Tensors ``(N, C, H, W)`` to compare on; use sizes other than the export size
            (e.g. odd ones) to check that nothing was frozen at export.
        atol: Largest accepted absolute difference.
        providers: onnxruntime execution providers.

    Returns:
        The largest absolute difference per output name, over all inputs.

    Raises:
        AssertionError: An output's shape or values differ (beyond ``atol``); the message names
            the output, the input size and the difference.
    """
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=list(providers))
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    diffs = dict.fromkeys(names, 0.0)
    with _eval_mode(model), torch.no_grad():
        for x in inputs:
            expected = _as_dict(model(x))
            if sorted(expected) != sorted(names):
                raise AssertionError(f"ONNX outputs {names} do not match the model's outputs {list(expected)}")
            got = session.run(names, {feed: x.detach().cpu().float().numpy()})
            for name, array in zip(names, got, strict=True):
                ref = expected[name].detach().cpu().float()
                out = torch.from_numpy(array)
                if out.shape != ref.shape:
                    raise AssertionError(
                        f"ONNX output {name!r} has shape {tuple(out.shape)} for input {tuple(x.shape)}, "
                        f"PyTorch gives {tuple(ref.shape)}"
                    )
                diffs[name] = max(diffs[name], float((out - ref).abs().max()))
    bad = {n: d for n, d in diffs.items() if d > atol}
    if bad:
        raise AssertionError(f"ONNX outputs differ from PyTorch by more than atol={atol}: {bad}")
    return diffs


# -- TorchScript --------------------------------------------------------------------------------


def script(model: EfficientNet) -> torch.jit.ScriptModule:
    """``torch.jit.script`` the model (features dict or logits, any input size, train or eval).

    TorchScript is deprecated in recent torch (it warns) but still used by C++ / mobile runtimes;
    prefer ONNX or ``torch.export`` for new deployments. Gradient checkpointing is skipped inside
    TorchScript (``checkpoint`` is not scriptable); everything else behaves as in eager mode.
    """
    _check_model(model)
    return torch.jit.script(model)


def trace(model: EfficientNet, input_size: Sequence[int] = (1, 3, 224, 224)) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` the model in eval mode (the inference graph).

    The traced graph keeps the "same" padding as shape arithmetic, so it runs at other input sizes
    too. ``strict=False`` because the encoder returns a dict.
    """
    example = _example_input(model, input_size)
    with _eval_mode(model), torch.no_grad():
        return torch.jit.trace(model, example, strict=False)


# -- torch.compile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileReport:
    """What :func:`check_compile` found.

    Attributes:
        backend: The ``torch.compile`` backend used.
        graph_count: Graphs Dynamo captured (1 = the whole forward).
        graph_break_count: Graph breaks (0 when ``fullgraph=True`` compiles).
        input_sizes: The input sizes run, all with the one compiled graph.
        max_abs_diff: Largest absolute difference to eager mode over all inputs and outputs.
    """

    backend: str
    graph_count: int
    graph_break_count: int
    input_sizes: tuple[tuple[int, ...], ...]
    max_abs_diff: float


def check_compile(
    model: nn.Module,
    inputs: Sequence[Tensor],
    *,
    backend: str = "eager",
    dynamic: bool = True,
    atol: float = 1e-4,
) -> CompileReport:
    """Check that ``torch.compile(model, fullgraph=True)`` works, in eval mode, without recompiling.

    Dynamo's ``explain`` counts graphs and breaks on ``inputs[0]``; then the model is compiled with
    ``fullgraph=True`` (which raises on any break) and run on every input. With ``dynamic=True``
    every input after the first runs under ``fail_on_recompile``, so a size change (e.g. an odd
    height with "same" padding) must reuse the first graph. Dynamo always specialises sizes 0 and
    1, so keep the batch size either 1 for all inputs or >= 2 for all. Duck sizing (which would
    assume H == W after a square first input and recompile once for a non-square one) is turned
    off during the check, so that the graph's own generality is what is tested.

    This resets Dynamo's caches (as ``explain`` does): it is a check, not something to run in a
    training loop. ``backend="eager"`` checks capture only (fast); use ``"aot_eager"`` to include
    autograd tracing, or ``"inductor"`` (the default of ``torch.compile``) for real code generation.

    Raises:
        RuntimeError: A graph break, a recompile, or outputs beyond ``atol``; the message says which.
    """
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    if not inputs:
        raise ValueError("check_compile needs at least one input tensor")
    with _eval_mode(model), torch.no_grad(), fx_config.patch(use_duck_shape=False):
        explanation = torch._dynamo.explain(model)(inputs[0])
        if explanation.graph_break_count:
            reasons = "; ".join(str(r.reason) for r in explanation.break_reasons)
            raise RuntimeError(f"torch.compile graph breaks: {explanation.graph_break_count} ({reasons})")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
        diff = 0.0
        for i, x in enumerate(inputs):
            stance = torch.compiler.set_stance("fail_on_recompile") if dynamic and i else contextlib.nullcontext()
            try:
                with stance:
                    out = compiled(x)
            except RuntimeError as err:
                raise RuntimeError(
                    f"torch.compile recompiled for input {tuple(x.shape)} after {tuple(inputs[0].shape)}: {err}"
                ) from err
            diff = max(diff, _max_abs_diff(_as_dict(model(x)), _as_dict(out)))
    if diff > atol:
        raise RuntimeError(f"compiled outputs differ from eager by {diff:.3g} > atol={atol}")
    return CompileReport(
        backend,
        explanation.graph_count,
        explanation.graph_break_count,
        tuple(tuple(x.shape) for x in inputs),
        diff,
    )


# -- helpers ------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, EfficientNet):
        raise TypeError(f"expected an effbackbone EfficientNet, got {type(model).__name__}")


def _example_input(model: EfficientNet, input_size: Sequence[int]) -> Tensor:
    _check_model(model)
    size = tuple(int(s) for s in input_size)
    if len(size) != 4 or min(size) < 1 or size[1] != model.cfg.in_channels:
        raise ValueError(
            f"input_size must be (N, C, H, W) with C = the model's in_channels ({model.cfg.in_channels}), "
            f"got {tuple(input_size)}"
        )
    param = next(model.parameters())
    return torch.randn(size, device=param.device, dtype=param.dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the previous mode (``model.train`` keeps frozen parts frozen)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_tuple(out: Tensor | Sequence[Tensor] | Any) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def _as_dict(out: Mapping[str, Tensor] | Tensor | Any) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        return {LOGITS_NAME: out}
    return dict(out)


def _max_abs_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    if list(a) != list(b):
        raise RuntimeError(f"outputs differ in names: {list(a)} vs {list(b)}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _require(name: str) -> ModuleType:
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"{name} is required for this export; install it with `pip install effbackbone[export]`")
    return importlib.import_module(name)


__all__ = [
    "INPUT_NAME",
    "LOGITS_NAME",
    "CompileReport",
    "check_compile",
    "export_module_onnx",
    "export_onnx",
    "output_names",
    "script",
    "trace",
    "verify_onnx",
]
