"""Changes to a built encoder: set_output_stride, set_in_channels, truncate, set_bn_eps.

Each must give the model that building with the changed option gives (same tensors, bit for bit, and the
same ``feature_specs``), keep weights, device and frozen state, and leave ``feature_specs`` true to the
tensors ``forward`` returns.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effbackbone import VARIANTS, create_model
from effbackbone.factory import TORCHVISION_BN_EPS, weights_bn_eps
from effbackbone.layers import Conv2dSame
from effbackbone.model import EfficientNet


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics: fresh BNs are identities in eval mode and would hide differences."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def states() -> dict[tuple[str, bool], dict[str, torch.Tensor]]:
    """Random trained-looking weights per (variant, tf_compat)."""
    torch.manual_seed(3)
    return {
        (name, tf): _randomize_norms(create_model(name, tf_compat=tf)).state_dict()
        for name, tf in [("b0", False), ("b0", True), ("lite0", False), ("v2_s", False)]
    }


def _forward(model: EfficientNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


def _geometry(model: nn.Module) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...], object]]:
    return [
        (name, type(m).__name__, m.stride, m.dilation, m.padding)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]


def assert_specs_match_tensors(model: EfficientNet, x: torch.Tensor) -> None:
    """``feature_specs`` say which tensor each level is: name, channels, stride, index and module."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        model.blocks[s.stage].register_forward_hook(lambda _m, _i, out, k=s.stage: seen.__setitem__(k, out))
        for s in model.feature_specs
    ]
    try:
        out = _forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    assert list(out) == [s.name for s in model.feature_specs]
    assert model.feature_specs == tuple(model.all_feature_specs[i] for i in model.out_indices)
    for spec, t in zip(model.feature_specs, out.values(), strict=True):
        assert t.shape[1] == spec.channels
        assert t.shape[-2:] == (-(-x.shape[-2] // spec.stride), -(-x.shape[-1] // spec.stride))  # ceil
        assert spec.name == f"C{spec.index + 1}" and spec.module == f"blocks.{spec.stage}"
        assert seen[spec.stage] is t  # the output of that stage, not merely one of the same shape


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stage_index_names_the_module(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    for spec in model.all_feature_specs:
        assert spec.module == f"blocks.{spec.stage}"
        # The last block of the stage at that stride: the next stage strides (or there is none).
        following = model.blocks[spec.stage + 1 :]
        if len(following):
            assert any(c.stride == (2, 2) for c in following[0][0].modules() if isinstance(c, nn.Conv2d))


# -- set_output_stride ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "tf"), [("b0", False), ("b0", True), ("lite0", False), ("v2_s", False)])
@pytest.mark.parametrize("stride", [8, 16])
def test_set_output_stride_equals_building_with_it(states, name: str, tf: bool, stride: int) -> None:
    sd = states[(name, tf)]
    native = create_model(name, weights=sd, tf_compat=tf, output_stride=stride)
    changed = create_model(name, weights=sd, tf_compat=tf)
    changed.set_output_stride(stride)
    assert _geometry(changed) == _geometry(native)
    assert changed.all_feature_specs == native.all_feature_specs
    assert changed.size_divisibility == native.size_divisibility == stride
    assert changed.cfg == native.cfg
    skips = [(n, m.has_skip) for n, m in changed.named_modules() if hasattr(m, "has_skip")]
    assert skips == [(n, m.has_skip) for n, m in native.named_modules() if hasattr(m, "has_skip")]
    x = torch.rand(1, 3, 72, 72)  # TF "same" padding is asymmetric at this size
    for a, b in zip(_forward(changed, x).values(), _forward(native, x).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_specs_match_tensors(changed, x)


def test_set_output_stride_round_trip_keeps_parameters_and_state(states) -> None:
    model = create_model("b0", weights=states[("b0", True)], tf_compat=True, frozen_stages=2)
    params = dict(model.named_parameters())
    geometry = _geometry(model)
    x = torch.rand(1, 3, 72, 72)
    before = _forward(model, x)
    model.train()
    model.set_output_stride(8)
    assert model.training and not model.bn1.training  # train mode kept, frozen stages stay in eval
    assert dict(model.named_parameters()) == params  # the same Parameter objects (optimizers keep working)
    assert not model.blocks[1][0].conv_dw.weight.requires_grad and model.blocks[6][0].conv_dw.weight.requires_grad
    assert not isinstance(model.blocks[5][0].conv_dw, Conv2dSame)  # dilated: symmetric padding, as built
    model.set_output_stride(32)
    assert isinstance(model.blocks[5][0].conv_dw, Conv2dSame)
    assert _geometry(model) == geometry
    for a, b in zip(_forward(model, x).values(), before.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        model.set_output_stride(4)


# -- set_in_channels ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("in_channels", "mode"), [(1, "repeat"), (4, "repeat"), (5, "mean"), (4, "rgb_zero")])
@pytest.mark.parametrize("tf", [False, True])
def test_set_in_channels_equals_building_with_it(states, in_channels: int, mode: str, tf: bool) -> None:
    sd = states[("b0", tf)]
    native = create_model("b0", weights=sd, tf_compat=tf, in_channels=in_channels, stem_adapt=mode)
    changed = create_model("b0", weights=sd, tf_compat=tf)
    changed.set_in_channels(in_channels, mode)
    assert changed.cfg == native.cfg
    assert type(changed.conv_stem) is type(native.conv_stem)
    assert _geometry(changed) == _geometry(native)
    for (k, a), (k2, b) in zip(changed.state_dict().items(), native.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.rand(1, in_channels, 72, 72)
    for a, b in zip(_forward(changed, x).values(), _forward(native, x).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_specs_match_tensors(changed, x)


def test_set_in_channels_random_reinitialises_only_the_stem(states) -> None:
    model = create_model("b0", weights=states[("b0", False)], frozen_stages=1)
    model = model.to(memory_format=torch.channels_last)
    others = {k: v.clone() for k, v in model.state_dict().items() if k != "conv_stem.weight"}
    model.set_in_channels(2, "random")
    stem = model.conv_stem.weight
    assert stem.shape == (32, 2, 3, 3) and model.cfg.in_channels == 2
    assert not stem.requires_grad  # frozen stem stays frozen
    assert stem.is_contiguous(memory_format=torch.channels_last)
    # The model's own init (TF reference): normal with std sqrt(2 / fan_out), fan_out = 32 * 3 * 3.
    assert 0.5 < stem.std().item() / (2 / (32 * 9)) ** 0.5 < 1.5
    for k, v in model.state_dict().items():
        if k != "conv_stem.weight":
            assert torch.equal(v, others[k]), k
    model.set_in_channels(2, "repeat")  # same width: nothing changes
    assert model.conv_stem.weight is stem
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        model.set_in_channels(0)


# -- truncate ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("out_indices", "stages"), [((0, 1, 2), 3), ((1, 3), 5), ((4,), 7)])
def test_truncate_drops_unused_stages_and_keeps_outputs(states, out_indices, stages: int) -> None:
    full = create_model("b0", weights=states[("b0", False)], out_indices=out_indices)
    model = create_model("b0", weights=states[("b0", False)], out_indices=out_indices)
    model.truncate()
    assert len(model.blocks) == stages
    assert model.feature_specs == full.feature_specs
    assert model.all_feature_specs == full.all_feature_specs[: out_indices[-1] + 1]
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(_forward(model, x).values(), _forward(full, x).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_specs_match_tensors(model, x)
    model.train()
    sum(t.mean() for t in model(x).values()).backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP finds no unused parameter


def test_truncate_then_change_stride_and_channels_keeps_specs_true(states) -> None:
    sd = states[("b0", False)]
    model = create_model("b0", weights=sd, out_indices=(1, 2, 3), frozen_stages=5)
    model.truncate()
    assert model.frozen_levels == 4
    model.set_output_stride(8)
    model.set_in_channels(4)
    native = create_model("b0", weights=sd, out_indices=(1, 2, 3), output_stride=8, in_channels=4)
    x = torch.rand(1, 4, 64, 64)
    assert_specs_match_tensors(model, x)
    assert [s.stride for s in model.feature_specs] == [4, 8, 8]
    for a, b in zip(_forward(model, x).values(), _forward(native, x).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"index must be in \[0, 3\] \(C1..C4\)"):
        model.truncate(4)


def test_truncate_a_classifier_ends_the_trunk_at_that_level() -> None:
    model = create_model("b0", features_only=False, num_classes=7)
    model.truncate(2)
    assert len(model.blocks) == 3 and model.num_features == 40 and isinstance(model.conv_head, nn.Identity)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert model.eval().forward_features(x).shape == (1, 40, 8, 8)
        assert model(x).shape == (1, 7)


# -- BatchNorm eps -------------------------------------------------------------------------------------
def test_set_bn_eps_and_weights_bn_eps() -> None:
    model = create_model("b0")
    model.set_bn_eps(1e-3)
    assert model.cfg.bn_eps == 1e-3
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    assert weights_bn_eps("b5", "torchvision") == TORCHVISION_BN_EPS["b5"] == 1e-3
    assert weights_bn_eps("efficientnet-B5", "torchvision") == 1e-3  # every create_model spelling
    assert weights_bn_eps("b0", "torchvision", tf_compat=True) == 1e-5  # torchvision trained B0 with 1e-5
    assert weights_bn_eps("b0", tf_compat=True) == 1e-3 and weights_bn_eps("b0") == 1e-5
    assert weights_bn_eps("b5", "torchvision", bn_eps=1e-4) == 1e-4  # the user's choice wins


def test_device_and_dtype_at_construction() -> None:
    model = create_model("b0", features_only=False, device="meta", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert {t.dtype for t in tensors} == {torch.float64, torch.int64}  # num_batches_tracked stays int64
    model.reset_classifier(3)
    assert model.classifier.weight.device.type == "meta" and model.classifier.weight.dtype == torch.float64
    assert model.classifier.training == model.training
