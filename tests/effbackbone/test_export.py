"""Export: ONNX (dynamic batch/height/width, checked with onnxruntime), TorchScript, torch.compile.

Models are exported at an even size (64x64) and run at sizes of other parities (97x131, 45x70):
with TF "same" padding the pad split depends on the parity, so a pad frozen at export time would
give wrong shapes or values there. BatchNorm statistics are calibrated on a random batch first so
that activations are O(1) and the 1e-4 tolerance means something (with identity running statistics
the deep levels of a random network are ~1e-9 and any comparison would pass).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import effbackbone
from effbackbone import export
from effbackbone.layers import Conv2dSame

EXPORT_SIZE = (1, 3, 64, 64)
# Odd/odd and odd/even, batch 2 and 1: differs from the export size in parity and batch.
RUN_SIZES = ((2, 3, 97, 131), (1, 3, 45, 70))
ATOL = 1e-4

# (model name, options) -> id; the tf_compat model uses Conv2dSame for every strided conv.
B0_SYMMETRIC = ("b0", {})
B0_SAME = ("b0", {"tf_compat": True})


def _model(name: str, options: dict, features_only: bool = True, **kwargs) -> effbackbone.EfficientNet:
    """A random-weight model with BatchNorm statistics calibrated on one random batch.

    The batch is large enough (8 x 128 x 128, so C5 has 128 samples per channel) for the statistics
    to hold at the other test sizes; from a few pixels, some variances come out tiny and deep
    levels then blow up to ~1e3 at other sizes.
    """
    model = effbackbone.create_model(name, features_only=features_only, num_classes=10, **options, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momentum = norms[0].momentum
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 128, 128))
    for m in norms:
        m.momentum = momentum  # momentum=None would make a training step data-dependent for Dynamo
    return model.eval()


def _inputs() -> list[torch.Tensor]:
    return [torch.randn(s) for s in RUN_SIZES]


def _as_dict(out: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logits": out} if isinstance(out, torch.Tensor) else dict(out)


def _assert_close(ref: dict[str, torch.Tensor] | torch.Tensor, got: dict[str, torch.Tensor] | torch.Tensor) -> None:
    ref, got = _as_dict(ref), _as_dict(got)
    assert list(ref) == list(got)
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0)


def _export_and_verify(model, tmp_path, *, dynamo: bool) -> dict[str, float]:
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    path = export.export_onnx(model, tmp_path / "model.onnx", input_size=EXPORT_SIZE, dynamo=dynamo)
    inputs = _inputs()
    diffs = export.verify_onnx(path, model, inputs, atol=float("inf"))  # checks names and shapes
    assert list(diffs) == export.output_names(model)
    if max(diffs.values()) <= ATOL:
        return diffs
    # Deep models with features ~20 (v2_s C5, logits): PyTorch's own float32 result is already
    # ~2e-4 from the exact one. Then ONNX must be about as exact as PyTorch: its distance to the
    # float64 result at most twice PyTorch's (measured: 0.8-1.1x).
    onnx_err, torch_err = _errors_vs_float64(path, model, inputs)
    for name in diffs:
        assert onnx_err[name] <= max(ATOL, 2 * torch_err[name]), (name, onnx_err[name], torch_err[name])
    return diffs


def _errors_vs_float64(path, model, inputs) -> tuple[dict[str, float], dict[str, float]]:
    """Largest distance of the ONNX and the PyTorch float32 outputs to PyTorch float64, per output."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    exact = copy.deepcopy(model).double()
    onnx_err: dict[str, float] = dict.fromkeys(names, 0.0)
    torch_err: dict[str, float] = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for x in inputs:
            ref, approx = _as_dict(exact(x.double())), _as_dict(model(x))
            for name, out in zip(names, session.run(names, {"input": x.numpy()}), strict=True):
                onnx_err[name] = max(onnx_err[name], float((torch.from_numpy(out).double() - ref[name]).abs().max()))
                torch_err[name] = max(torch_err[name], float((approx[name].double() - ref[name]).abs().max()))
    return onnx_err, torch_err


def test_calibrated_outputs_are_order_one():
    # Guards the premise of every tolerance below.
    model = _model(*B0_SAME)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 97, 131))
    for name, t in out.items():
        assert 0.05 < t.std() < 20, (name, float(t.std()))


# -- ONNX ---------------------------------------------------------------------------------------

ONNX_CASES = [
    # (model, features_only, dynamo): the dynamo exporter (the default) for the two key cases by
    # default; the legacy exporter (10x faster to run) covers the other combinations.
    pytest.param(B0_SAME, True, True, id="b0-same-features-dynamo"),
    pytest.param(B0_SYMMETRIC, False, True, id="b0-symmetric-logits-dynamo"),
    pytest.param(B0_SAME, False, False, id="b0-same-logits-legacy"),
    pytest.param(B0_SYMMETRIC, True, False, id="b0-symmetric-features-legacy"),
    pytest.param(B0_SAME, False, True, id="b0-same-logits-dynamo", marks=pytest.mark.slow),
    pytest.param(B0_SYMMETRIC, True, True, id="b0-symmetric-features-dynamo", marks=pytest.mark.slow),
    pytest.param(B0_SAME, True, False, id="b0-same-features-legacy", marks=pytest.mark.slow),
    pytest.param(("lite0", {}), True, True, id="lite0-features-dynamo", marks=pytest.mark.slow),
    pytest.param(("v2_s", {}), True, True, id="v2_s-features-dynamo", marks=pytest.mark.slow),
    pytest.param(("v2_s", {"tf_compat": True}), False, True, id="v2_s-same-logits-dynamo", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "features_only", "dynamo"), ONNX_CASES)
def test_onnx_dynamic_matches_pytorch(arch, features_only, dynamo, tmp_path):
    model = _model(*arch, features_only=features_only)
    _export_and_verify(model, tmp_path, dynamo=dynamo)
    assert model.training is False  # the mode it was in before export


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["legacy", "dynamo"])
def test_onnx_output_stride_16(dynamo, tmp_path):
    model = _model("b0", {"tf_compat": True}, output_stride=16, out_indices=(2, 3, 4))
    diffs = _export_and_verify(model, tmp_path, dynamo=dynamo)
    assert list(diffs) == ["C3", "C4", "C5"]


def test_verify_onnx_catches_frozen_same_padding(tmp_path, monkeypatch):
    # Negative control: a graph whose "same" pads were frozen at the 64x64 export size (what a
    # size-specialising export of TF padding gives) must fail the comparison at odd sizes.
    pytest.importorskip("onnxruntime")
    model = _model(*B0_SAME)

    def frozen_forward(self, x):
        ih, iw = int(x.shape[-2]), int(x.shape[-1])  # int() makes the tracer record constants
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        pad_h = ((ih + s - 1) // s - 1) * s + (k - 1) * d + 1 - ih
        pad_w = ((iw + s - 1) // s - 1) * s + (k - 1) * d + 1 - iw
        x = nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    with monkeypatch.context() as patch, pytest.warns(torch.jit.TracerWarning):
        patch.setattr(Conv2dSame, "forward", frozen_forward)
        path = export.export_onnx(model, tmp_path / "frozen.onnx", input_size=EXPORT_SIZE, dynamo=False)
    export.verify_onnx(path, model, [torch.randn(1, 3, 64, 64)])  # right at the export size only
    with pytest.raises(AssertionError, match="shape"):
        export.verify_onnx(path, model, [torch.randn(1, 3, 97, 131)])


def test_onnx_graph_signature(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _model(*B0_SAME)
    dynamic = export.export_onnx(model, tmp_path / "dyn.onnx", input_size=EXPORT_SIZE, dynamo=False)
    static = export.export_onnx(model, tmp_path / "static.onnx", input_size=EXPORT_SIZE, dynamo=False, dynamic=False)

    def dims(path):
        graph = onnx.load(str(path)).graph
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]
        }

    assert dims(dynamic)["input"] == ["batch", 3, "height", "width"]
    assert dims(dynamic)["C5"][:2] == ["batch", 320]
    assert dims(static)["input"] == list(EXPORT_SIZE)

    # One Pad per strided conv (stem + 4 stride-2 blocks) with "same" padding, none with symmetric.
    symmetric = export.export_onnx(_model(*B0_SYMMETRIC), tmp_path / "sym.onnx", input_size=EXPORT_SIZE, dynamo=False)
    pads = [sum(n.op_type == "Pad" for n in onnx.load(str(p)).graph.node) for p in (dynamic, symmetric)]
    assert pads == [5, 0]


def test_onnx_restores_train_mode_and_checks_input(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model(*B0_SAME).train()
    export.export_onnx(model, tmp_path / "m.onnx", input_size=EXPORT_SIZE, dynamo=False)
    assert model.training
    with pytest.raises(ValueError, match="in_channels"):
        export.export_onnx(model, tmp_path / "bad.onnx", input_size=(1, 4, 64, 64), dynamo=False)
    with pytest.raises(TypeError, match="EfficientNet"):
        export.export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "bad.onnx")


def test_onnx_grad_checkpointing_channels_last(tmp_path):
    # Training-time options must not leak into the exported (eval) graph.
    model = _model("b0", {"tf_compat": True, "grad_checkpointing": True, "channels_last": True})
    _export_and_verify(model, tmp_path, dynamo=False)


# -- TorchScript --------------------------------------------------------------------------------

JIT_CASES = [
    pytest.param(B0_SAME, True, id="b0-same-features"),
    pytest.param(B0_SYMMETRIC, False, id="b0-symmetric-logits"),
    pytest.param(B0_SAME, False, id="b0-same-logits"),
    pytest.param(B0_SYMMETRIC, True, id="b0-symmetric-features"),
    pytest.param(("v2_s", {"tf_compat": True}), True, id="v2_s-same-features", marks=pytest.mark.slow),
    pytest.param(("lite0", {}), False, id="lite0-logits", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "features_only"), JIT_CASES)
def test_torchscript_script_and_trace_match_eager(arch, features_only, tmp_path):
    model = _model(*arch, features_only=features_only)
    scripted = export.script(model)
    traced = export.trace(model, EXPORT_SIZE)
    path = tmp_path / "scripted.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for x in _inputs():  # other sizes than the trace size: the pad is not frozen in the trace
            ref = model(x)
            _assert_close(ref, scripted(x))
            _assert_close(ref, loaded(x))
            _assert_close(ref, traced(x))


@pytest.mark.parametrize(("arch", "features_only"), JIT_CASES[:2])
@pytest.mark.filterwarnings("ignore:The TorchScript type system:UserWarning")  # torch.fx's own GraphModule
def test_fx_graph_scripts(arch, features_only):
    """A ``torch.fx`` trace of the model compiles with TorchScript (its code carries forward's annotations)."""
    model = _model(*arch, features_only=features_only)
    graph = torch.fx.symbolic_trace(model)
    assert "_Tensor_" not in graph.code  # a postponed annotation would be written this way, unknown to TorchScript
    scripted = torch.jit.script(graph)
    with torch.no_grad():
        for x in _inputs():
            _assert_close(model(x), scripted(x))


def test_script_with_grad_checkpointing_in_train_mode():
    model = _model("b0", {"tf_compat": True, "grad_checkpointing": True}).train()
    scripted = export.script(model)
    x = torch.randn(2, 3, 45, 70)
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    out = scripted(x)
    _assert_close({k: v.detach() for k, v in ref.items()}, {k: v.detach() for k, v in out.items()})
    sum(v.mean() for v in out.values()).backward()
    assert model.conv_stem.weight.grad is not None


# -- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "features_only"),
    [
        pytest.param(B0_SAME, True, id="b0-same-features"),
        pytest.param(B0_SYMMETRIC, False, id="b0-symmetric-logits"),
        pytest.param(("v2_s", {"tf_compat": True}), True, id="v2_s-same-features", marks=pytest.mark.slow),
        pytest.param(("lite0", {}), True, id="lite0-features", marks=pytest.mark.slow),
    ],
)
def test_compile_fullgraph_no_breaks_no_recompile(arch, features_only):
    model = _model(*arch, features_only=features_only)
    # Same batch, sizes of both parities: one dynamic graph serves all of them.
    inputs = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 97, 131), torch.randn(2, 3, 45, 70)]
    report = export.check_compile(model, inputs, backend="eager")
    assert report.graph_count == 1
    assert report.graph_break_count == 0
    assert report.max_abs_diff <= ATOL


def test_compile_training_step_with_grad_checkpointing_channels_last():
    model = _model("b0", {"tf_compat": True, "grad_checkpointing": True, "channels_last": True}).train()
    x = torch.randn(2, 3, 45, 70).to(memory_format=torch.channels_last)
    ref = _model("b0", {"tf_compat": True, "channels_last": True}).train()
    ref.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = sum(v.square().mean() for v in compiled(x).values())
    loss.backward()
    ref_loss = sum(v.square().mean() for v in ref(x).values())
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model.conv_stem.weight.grad, ref.conv_stem.weight.grad, atol=1e-5, rtol=1e-4)


def test_compile_rejects_graph_breaks():
    # The checker itself must catch a break.
    class Breaks(nn.Module):
        def forward(self, x):
            x = x + 1
            torch._dynamo.graph_break()
            return x * 2

    with pytest.raises(RuntimeError, match="graph breaks"):
        export.check_compile(Breaks(), [torch.randn(2, 3)])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_compile_inductor():
    model = _model(*B0_SAME)
    inputs = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 97, 131)]
    report = export.check_compile(model, inputs, backend="inductor")
    assert report.graph_break_count == 0
    assert report.max_abs_diff <= ATOL


# --- static TF padding and Pad folding: what a deployment at multiples of 32 gets -----------------


def test_static_padding_equals_same_padding_at_multiples_of_stride():
    model = _model(*B0_SAME)
    fixed = copy.deepcopy(model)
    fixed.set_static_padding(True)
    assert all(m.static_pad for m in fixed.modules() if isinstance(m, Conv2dSame))
    for shape in ((2, 3, 64, 96), (1, 3, 32, 160)):
        x = torch.randn(shape)
        with torch.no_grad():
            ref, out = model(x), fixed(x)
        for name in ref:
            torch.testing.assert_close(out[name], ref[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of the stride.*set_static_padding"):
        fixed(torch.randn(1, 3, 65, 64))
    fixed.set_static_padding(False)
    assert fixed(torch.randn(1, 3, 65, 64))["C5"].shape[-2:] == (3, 2)


class _PadThenConvAndPool(nn.Module):
    """The two patterns fold_pads folds: zero Pad -> Conv (TF "same" conv) and -inf Pad -> MaxPool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(nn.functional.pad(x, [1, 2, 0, 1]))  # asymmetric, added to the conv's own pads
        return nn.functional.max_pool2d(nn.functional.pad(x, [0, 1, 0, 1], value=float("-inf")), 3, 2)


def test_fold_pads_folds_zero_and_minus_inf_pads(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _PadThenConvAndPool().eval()
    path = export.export_module_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32), ["out"], dynamo=False)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Pad") == 2
    assert export.fold_pads(path) == 2
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Pad" not in ops and ops.count("Conv") == 1 and ops.count("MaxPool") == 1
    conv_pads = next(list(a.ints) for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads")
    assert conv_pads == [1, 1, 2, 2]  # top, left, bottom, right: (1, 0) conv padding plus the Pad's
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 32, 32), (1, 3, 33, 47)):  # folded pads are constants: right at every size
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x).numpy()
        assert abs(session.run(None, {"input": x.numpy()})[0] - ref).max() < 1e-5
    assert export.fold_pads(path) == 0  # nothing left


def test_fold_pads_leaves_shape_dependent_pads(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _model(*B0_SAME, out_indices=(0, 1))
    path = export.export_onnx(model, tmp_path / "m.onnx", input_size=EXPORT_SIZE, dynamo=False)
    pads = [n.op_type for n in onnx.load(str(path)).graph.node].count("Pad")
    assert pads == 2  # the stem and blocks.1.0 (C1, C2): computed from the dynamic input size
    assert export.fold_pads(path) == 0
