"""Memory-efficient BN + activation and gradient checkpointing: less memory, identical results."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effbackbone import create_model
from effbackbone.activations import BatchNormAct2d, set_memory_efficient

MODELS = [("b0", {}), ("b0", {"tf_compat": True}), ("lite0", {}), ("v2_s", {})]


def _saved_bytes(fn):
    """Bytes autograd saves during ``fn()`` (parameters excluded, each storage once)."""
    seen = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _total(out):
    return sum(v.sum() for v in out.values()) if isinstance(out, dict) else out.sum()


def _bn_pair(act: str, momentum: float | None = 0.1):
    ref = nn.BatchNorm2d(16, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        ref.running_var.uniform_(0.5, 2.0)
    ref_act = nn.SiLU(inplace=True) if act == "silu" else nn.ReLU6(inplace=True)
    ours = BatchNormAct2d(16, act, momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    return ref, ref_act, ours


@pytest.mark.parametrize("act", ["silu", "relu6"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_act_bitwise_equal_to_bn_then_act(act, train, momentum):
    ref, ref_act, ours = _bn_pair(act, momentum)
    ref.train(train)
    ours.train(train)
    x = torch.randn(4, 16, 9, 7) * 3
    g = torch.randn_like(x)
    for _ in range(2):  # second step: running stats already moved (and momentum=None averages)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref_act(ref(x1)), ours(x2)
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(y1, y2)
        assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ref.weight.grad, ours.weight.grad)
    assert torch.equal(ref.bias.grad, ours.bias.grad)
    for a, b in zip(ref.buffers(), ours.buffers(), strict=True):
        assert torch.equal(a, b)


def test_bn_act_saves_only_its_input():
    ref, ref_act, ours = _bn_pair("silu")
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    plain, _ = _saved_bytes(lambda: ref_act(ref(x)))
    efficient, _ = _saved_bytes(lambda: ours(x))
    assert efficient == x.numel() * 4  # x only; BN stats are recomputed in backward
    assert plain >= 2 * x.numel() * 4  # BN input and BN output (the SiLU input)


def test_native_silu_already_saves_only_its_input():
    """Why there is no SiLU-only autograd Function: aten::silu recomputes the sigmoid already."""
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    assert _saved_bytes(lambda: F.silu(x))[0] == x.numel() * 4
    assert _saved_bytes(lambda: x * torch.sigmoid(x))[0] == 2 * x.numel() * 4  # the old Swish


@pytest.mark.parametrize(("name", "kw"), MODELS)
@pytest.mark.parametrize("features_only", [True, False])
def test_memory_efficient_model_is_exact(name, kw, features_only):
    ref = create_model(name, features_only=features_only, drop_path_rate=0.2, **kw)
    ours = set_memory_efficient(copy.deepcopy(ref))
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert any(isinstance(m, BatchNormAct2d) for m in ours.modules())
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    o1 = ref(x)
    torch.manual_seed(1)
    o2 = ours(x)
    _total(o1).backward()
    _total(o2).backward()
    for k in o1 if features_only else [None]:
        assert torch.equal(o1[k] if k else o1, o2[k] if k else o2)
    for (n, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), n
    for a, b in zip(ref.buffers(), ours.buffers(), strict=True):
        assert torch.equal(a, b)


def test_memory_efficient_saves_memory_and_toggles_back():
    ref = create_model("b0")
    ours = create_model("b0", memory_efficient=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    plain, _ = _saved_bytes(lambda: ref(x))
    efficient, _ = _saved_bytes(lambda: ours(x))
    assert efficient < 0.8 * plain  # one of ~7 expanded-width tensors per MBConv, plus stem
    set_memory_efficient(ours, False)
    assert not any(isinstance(m, BatchNormAct2d) for m in ours.modules())
    assert [type(m) for m in ours.modules()] == [type(m) for m in ref.modules()]
    assert _saved_bytes(lambda: ours(x))[0] == plain


def test_memory_efficient_keeps_optimizer_parameters():
    model = create_model("lite0")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = {id(p) for p in model.parameters()}
    set_memory_efficient(model)
    assert {id(p) for p in model.parameters()} == params
    model(torch.randn(2, 3, 32, 32))["C5"].sum().backward()
    opt.step()  # every parameter the optimizer holds got a gradient through the new modules
    assert all(p.grad is not None for p in model.parameters())


def test_memory_efficient_with_frozen_bn_is_exact():
    ref = create_model("b0", frozen_stages=2, norm_eval=True)
    ours = set_memory_efficient(copy.deepcopy(ref))
    x = torch.randn(2, 3, 64, 64)
    _total(ref(x)).backward()
    _total(ours(x)).backward()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_memory_efficient_eval_paths_script_and_export():
    model = create_model("b0", memory_efficient=True).eval()
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(model)
    for a, b in zip(scripted(x).values(), model(x).values(), strict=True):
        assert torch.equal(a, b)
    traced = torch.jit.trace(model, x, strict=False)
    assert all(n.kind() != "prim::PythonOp" for n in traced.inlined_graph.nodes())


@pytest.mark.parametrize("features_only", [True, False])
def test_grad_checkpointing_is_exact_and_updates_bn_once(features_only):
    ref = create_model("b0", features_only=features_only, drop_path_rate=0.2, drop_rate=0.0)
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    for step in range(2):
        torch.manual_seed(step)
        _total(ref(x)).backward()
        torch.manual_seed(step)
        _total(ckpt(x)).backward()
    for a, b in zip(ref.parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(ref.buffers(), ckpt.buffers(), strict=True):  # running stats, num_batches_tracked
        assert torch.equal(a, b)


def test_grad_checkpointing_saves_memory():
    model = create_model("b0")
    x = torch.randn(1, 3, 64, 64)
    plain, _ = _saved_bytes(lambda: model(x))
    model.set_grad_checkpointing()
    # Inside checkpointed stages nothing is saved; only the stem's activations remain visible.
    assert _saved_bytes(lambda: model(x))[0] < 0.2 * plain


@pytest.mark.slow
def test_memory_efficient_compiles():
    """Under torch.compile the module takes the plain path: the same graph as the plain model."""
    plain = create_model("b0", features_only=False, drop_rate=0.0)
    efficient = set_memory_efficient(copy.deepcopy(plain))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        eager = plain(x)
    outs = []
    for model in (plain, efficient):
        out = torch.compile(model)(x)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(plain.parameters(), efficient.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
