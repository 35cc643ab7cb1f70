"""create_model options: levels, output stride, freezing, stochastic depth, checkpointing, phi."""

import warnings

import pytest
import torch
from torch import nn

from effbackbone import VARIANTS, create_model, resolve_variant
from effbackbone.scaling import round_filters


@pytest.fixture(scope="module")
def b0_state():
    torch.manual_seed(2)
    return create_model("b0").state_dict()


def _run(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _bn_modules(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


# -- out_indices -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_indices", "names"),
    [((1, 2, 3), ["C2", "C3", "C4"]), ((-1,), ["C5"]), ((4, -2, 0), ["C1", "C4", "C5"]), ((2, -3), ["C3"])],
)
def test_out_indices_subsets_and_negative_indices(b0_state, out_indices, names):
    x = torch.randn(1, 3, 64, 96)
    full = _run(create_model("b0", weights=b0_state), x)
    model = create_model("b0", out_indices=out_indices, weights=b0_state)
    out = _run(model, x)
    assert list(out) == names == [s.name for s in model.feature_specs]
    assert model.out_indices == tuple(int(n[1]) - 1 for n in names)
    assert model.feature_channels == [t.shape[1] for t in out.values()]
    for name in names:
        assert torch.equal(out[name], full[name])


@pytest.mark.parametrize("bad", [(5,), (), (-6,)])
def test_out_indices_out_of_range(bad):
    with pytest.raises(ValueError, match=r"must be non-empty and in \[0, 4\]"):
        create_model("b0", out_indices=bad)


# -- output stride ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_stride", "strides"), [(32, [2, 4, 8, 16, 32]), (16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])]
)
def test_output_stride_strides_and_shapes(output_stride, strides):
    model = create_model("b0", output_stride=output_stride)
    assert model.feature_strides == strides
    out = _run(model, torch.randn(1, 3, 64, 96))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(64 // s, 96 // s) for s in strides]
    dilations = {m.dilation[0] for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert max(dilations) == 32 // output_stride


def test_output_stride_matches_timm(b0_state):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("efficientnet_b0", features_only=True, output_stride=8)
    ref.load_state_dict(b0_state)
    x = torch.randn(1, 3, 64, 80)
    out = _run(create_model("b0", output_stride=8, weights=b0_state), x)
    for a, b in zip(out.values(), _run(ref, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_invalid_output_stride():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        create_model("b0", output_stride=4)


# -- freezing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [0, 2, 5])
def test_frozen_stages(frozen_stages):
    model = create_model("b0", frozen_stages=frozen_stages).train()
    last = model.all_feature_specs[frozen_stages - 1].stage if frozen_stages else -1
    frozen = [model.conv_stem, model.bn1, *list(model.blocks)[: last + 1]] if frozen_stages else []
    trainable = list(model.blocks)[last + 1 :]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert all(not bn.training for m in frozen for bn in _bn_modules(m))
    assert all(bn.training for m in trainable for bn in _bn_modules(m))
    # A training forward leaves the frozen statistics alone.
    before = [bn.running_mean.clone() for m in frozen for bn in _bn_modules(m)]
    model(torch.randn(2, 3, 64, 64))
    after = [bn.running_mean for m in frozen for bn in _bn_modules(m)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    if trainable:
        assert _bn_modules(trainable[-1])[0].running_mean.abs().sum() > 0  # unfrozen BN did update


def test_frozen_stages_two_freezes_stem_and_first_two_levels():
    model = create_model("b0", frozen_stages=2)
    # b0: stage 0 ends C1, stage 1 ends C2
    assert [i for i, s in enumerate(model.blocks) if not any(p.requires_grad for p in s.parameters())] == [0, 1]
    assert not model.conv_stem.weight.requires_grad


def test_freeze_out_of_range():
    with pytest.raises(ValueError, match=r"levels must be in \[0, 5\], got 6"):
        create_model("b0", frozen_stages=6)


def test_norm_eval_keeps_every_bn_in_eval_while_training():
    model = create_model("b0", norm_eval=True, drop_path_rate=0.1).train()
    bns = _bn_modules(model)
    assert bns and all(not bn.training for bn in bns)
    assert model.training and model.blocks[1][1].drop_path.training
    assert all(p.requires_grad for p in model.parameters())  # only the statistics are frozen
    before = [bn.running_var.clone() for bn in bns]
    model(torch.randn(2, 3, 64, 64)).values()
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(before, bns, strict=True))


# -- stochastic depth, checkpointing, memory format ---------------------------------------------


@pytest.mark.parametrize("name", ["b0", "v2_s"])
def test_drop_path_rate_ramps_linearly(name):
    model = create_model(name, drop_path_rate=0.2)
    blocks = [b for stage in model.blocks for b in stage]
    rates = [getattr(b.drop_path, "rate", 0.0) for b in blocks]
    assert rates == pytest.approx([0.2 * i / len(blocks) for i in range(len(blocks))])
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 -> no module work at all


def test_drop_path_is_off_in_eval_and_random_in_train(b0_state):
    model = create_model("b0", drop_path_rate=0.5, weights=b0_state)
    x = torch.randn(4, 3, 64, 64)
    ref = _run(create_model("b0", weights=b0_state), x)
    torch.testing.assert_close(_run(model, x)["C5"], ref["C5"])
    model.train()
    for bn in _bn_modules(model):
        bn.eval()  # isolate drop path from batch statistics
    with torch.no_grad():
        assert not torch.allclose(model(x)["C5"], ref["C5"])


def test_grad_checkpointing_gives_the_same_grads(b0_state):
    x = torch.randn(2, 3, 64, 64)
    grads, saved = [], []
    for ckpt in (False, True):
        model = create_model("b0", weights=b0_state, grad_checkpointing=ckpt).train()
        stored = [0]

        def pack(t, stored=stored):
            stored[0] += t.numel()
            return t

        # Tensors saved for backward outside checkpointed regions: checkpointing must cut them.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        sum((t**2).mean() for t in out.values()).backward()
        saved.append(stored[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert saved[1] < 0.1 * saved[0]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last(b0_state):
    x = torch.randn(1, 3, 64, 96)
    ref = _run(create_model("b0", weights=b0_state), x)
    model = create_model("b0", weights=b0_state, channels_last=True)
    assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    out = _run(model, x.to(memory_format=torch.channels_last))
    assert out["C3"].is_contiguous(memory_format=torch.channels_last)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=1e-5)


# -- compound coefficient phi -------------------------------------------------------------------


def test_phi_zero_is_b0():
    assert resolve_variant("b0", phi=0) == VARIANTS["b0"]
    a, b = create_model("b0", phi=0), create_model("b0")
    assert a.feature_channels == b.feature_channels
    assert [len(s) for s in a.blocks] == [len(s) for s in b.blocks]
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


@pytest.mark.parametrize(("phi", "resolution"), [(-1.0, 192), (2.5, 320)])
def test_real_and_negative_phi_build_and_run(phi, resolution):
    v = resolve_variant("b0", phi=phi)
    assert (v.width, v.depth, v.resolution) == (pytest.approx(1.1**phi), pytest.approx(1.2**phi), resolution)
    model = create_model("b0", phi=phi)
    assert model.feature_channels == [round_filters(c, v.width) for c in (16, 24, 40, 112, 320)]
    out = _run(model, torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in out.values()] == model.feature_channels
    assert [t.shape[-1] for t in out.values()] == [32, 16, 8, 4, 2]


def test_custom_alpha_beta_gamma():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1.1 * 1.2^2 * 1.1^2 = 1.917: within the constraint
        v = resolve_variant("b0", phi=2, alpha=1.1, beta=1.2, gamma=1.1)
        model = create_model("b0", phi=2, alpha=1.1, beta=1.2, gamma=1.1)
    assert (v.width, v.depth, v.resolution) == (pytest.approx(1.44), pytest.approx(1.21), 272)  # 271.04 -> 272
    assert model.feature_channels == [round_filters(c, 1.44) for c in (16, 24, 40, 112, 320)]
    assert [len(s) for s in model.blocks] == [2, 3, 3, 4, 4, 5, 2]  # ceil(n * 1.21)


def test_warning_when_far_from_the_flops_constraint():
    with pytest.warns(UserWarning, match=r"alpha\*beta\^2\*gamma\^2 = 3.662; the paper constrains it to ~2"):
        create_model("lite0", phi=0.5, alpha=1.5, beta=1.25, gamma=1.25)


# -- errors -------------------------------------------------------------------------------------


def test_unknown_option_lists_valid_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['pretrained'\]; valid options: .*'frozen_stages'"):
        create_model("b0", pretrained=True)  # offline-ok: refused before anything is loaded


@pytest.mark.parametrize("name", ["b8", "efficientnet-b9", "resnet50"])
def test_unknown_name_lists_valid_names(name):
    with pytest.raises(ValueError, match=r"valid names: b0, b1, b2, b3, b4, b5, b6, b7, lite0.*v2_s, v2_m, v2_l"):
        create_model(name)


def test_name_spellings_are_accepted():
    for name in ("B0", "efficientnet_b0", "efficientnet-b0"):
        assert resolve_variant(name) == VARIANTS["b0"]
