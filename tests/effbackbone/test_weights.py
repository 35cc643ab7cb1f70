"""Weight loading: file formats, wrappers, layouts, safety, strict errors, heads and stems."""

import pytest
import torch

from effbackbone import WeightsError, create_model, load_weights, read_state_dict
from effbackbone.weights import detect_layout

HEAD = ("conv_head", "bn2", "classifier")


@pytest.fixture(scope="module")
def b0_sd():
    """A b0 classifier state dict (timm layout) with non-trivial BN statistics."""
    torch.manual_seed(1)
    model = create_model("b0", features_only=False)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.normal_(0, 0.1)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(model, sd):
    own = model.state_dict()
    for key, value in own.items():
        assert torch.equal(value, sd[key]), key


def _levels(model, x):
    with torch.no_grad():
        return model(x)


def _assert_same_levels(a, b):
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=name)


# -- files and wrappers ------------------------------------------------------------------------


def test_safetensors_file(tmp_path, b0_sd):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "b0.safetensors"
    safetensors.save_file(b0_sd, str(path))
    _assert_loaded(create_model("b0", features_only=False, weights=path), b0_sd)
    _assert_loaded(create_model("b0", features_only=False, weights=str(path)), b0_sd)


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "state_dict_ema", "ddp_prefix"])
def test_pth_file_and_wrapped_checkpoints(tmp_path, b0_sd, wrapper):
    obj = {
        "plain": b0_sd,
        "state_dict": {"state_dict": b0_sd, "epoch": 3, "optimizer": {"lr": 0.1}},
        "model": {"model": b0_sd, "step": 10},
        "state_dict_ema": {"state_dict": {k: v + 1 for k, v in b0_sd.items()}, "state_dict_ema": b0_sd},
        "ddp_prefix": {"module." + k: v for k, v in b0_sd.items()},
    }[wrapper]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    assert set(read_state_dict(path)) == set(b0_sd)
    _assert_loaded(create_model("b0", features_only=False, weights=path), b0_sd)


def test_state_dict_object_is_accepted(b0_sd):
    _assert_loaded(create_model("b0", features_only=False, weights={"state_dict": b0_sd}), b0_sd)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_model("b0", weights=tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="holds no state dict"):
        read_state_dict(path)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, b0_sd):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": b0_sd, "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="weights-only checkpoint"):
        read_state_dict(path)
    with pytest.raises(WeightsError, match="refused"):
        create_model("b0", weights=path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


# -- layouts and strictness --------------------------------------------------------------------


def test_detect_layout(b0_sd):
    tv = pytest.importorskip("torchvision")
    assert detect_layout(b0_sd) == "timm"
    assert detect_layout(tv.models.efficientnet_b0().state_dict()) == "torchvision"
    with pytest.raises(WeightsError, match="unrecognised weight layout.*conv_stem.weight.*features.0.0.weight"):
        detect_layout({"backbone.stem.weight": torch.zeros(1)})


def test_torchvision_pth_file(tmp_path):
    tv = pytest.importorskip("torchvision")
    src = tv.models.efficientnet_b0().eval()
    path = tmp_path / "tv_b0.pth"
    torch.save(src.state_dict(), path)
    ours = create_model("b0", features_only=False, weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), atol=1e-5, rtol=0)


def test_missing_and_unexpected_keys_are_listed(b0_sd):
    sd = dict(b0_sd)
    del sd["blocks.2.1.bn2.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as err:
        create_model("b0", features_only=False, weights=sd)
    msg = str(err.value)
    assert "1 missing keys: blocks.2.1.bn2.running_var" in msg
    assert "1 unexpected keys: extra.weight" in msg


def test_shape_mismatch_is_listed(b0_sd):
    sd = dict(b0_sd)
    sd["blocks.1.0.conv_pw.weight"] = torch.zeros(5, 16, 1, 1)
    with pytest.raises(WeightsError, match=r"shape mismatches: blocks.1.0.conv_pw.weight: checkpoint \(5, 16, 1, 1\)"):
        create_model("b0", features_only=False, weights=sd)


@pytest.mark.parametrize("other", ["b1", "b2", "lite0"])
def test_weights_of_another_variant_give_a_clear_error(b0_sd, other):
    with pytest.raises(WeightsError, match="variant name matches the checkpoint"):
        create_model(other, weights=b0_sd)


def test_unknown_variant_name_lists_the_valid_ones(b0_sd):
    with pytest.raises(ValueError, match="unknown model 'b9'; valid names: b0, b1.*lite0.*v2_l"):
        create_model("b9", weights=b0_sd)


# -- heads ---------------------------------------------------------------------------------------


def test_features_only_drops_the_head(b0_sd):
    feats = create_model("b0")
    skipped = load_weights(feats, b0_sd)
    assert sorted(skipped) == sorted(k for k in b0_sd if k.split(".")[0] in HEAD)
    assert not any(k.split(".")[0] in HEAD for k in feats.state_dict())
    _assert_loaded(feats, b0_sd)
    full = create_model("b0", features_only=False, weights=b0_sd).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_same_levels(_levels(feats.eval(), x), full.forward_pyramid(x))


def test_num_classes_mismatch_keeps_a_fresh_classifier(b0_sd):
    with pytest.warns(UserWarning, match=r"shape \(1000, 1280\).*\(10, 1280\).*fresh classifier"):
        model = create_model("b0", features_only=False, num_classes=10, weights=b0_sd)
    assert model.classifier.weight.shape == (10, 1280)
    for key, value in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, b0_sd[key]), key
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


# -- stems for in_channels != 3 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_model(b0_sd):
    return create_model("b0", weights=b0_sd).eval()


def _adapted(b0_sd, in_channels, mode):
    return create_model("b0", weights=b0_sd, in_channels=in_channels, stem_adapt=mode).eval()


@pytest.mark.parametrize("mode", ["repeat", "mean"])
def test_one_channel_equals_rgb_model_on_replicated_gray(b0_sd, rgb_model, mode):
    gray = torch.randn(1, 1, 64, 80)
    _assert_same_levels(_levels(_adapted(b0_sd, 1, mode), gray), _levels(rgb_model, gray.repeat(1, 3, 1, 1)))


def test_mean_four_channels_equals_rgb_model_on_constant_channels(b0_sd, rgb_model):
    gray = torch.randn(1, 1, 64, 80)
    model = _adapted(b0_sd, 4, "mean")
    _assert_same_levels(_levels(model, gray.repeat(1, 4, 1, 1)), _levels(rgb_model, gray.repeat(1, 3, 1, 1)))


def test_repeat_four_channels_cycles_rgb_filters(b0_sd):
    model = _adapted(b0_sd, 4, "repeat")
    stem = b0_sd["conv_stem.weight"]
    torch.testing.assert_close(model.conv_stem.weight, stem[:, [0, 1, 2, 0]] * 0.75)
    assert model(torch.randn(1, 4, 64, 64))["C5"].shape == (1, 320, 2, 2)


@pytest.mark.parametrize("in_channels", [1, 4])
def test_rgb_zero_ignores_extra_channels_until_trained(b0_sd, rgb_model, in_channels):
    rgb = torch.randn(1, 3, 64, 80)
    model = _adapted(b0_sd, in_channels, "rgb_zero")
    if in_channels == 4:
        x, ref = torch.cat([rgb, torch.randn(1, 1, 64, 80)], 1), rgb
    else:
        x, ref = rgb[:, :1], torch.cat([rgb[:, :1], torch.zeros(1, 2, 64, 80)], 1)
    _assert_same_levels(_levels(model, x), _levels(rgb_model, ref))


@pytest.mark.parametrize("in_channels", [1, 4])
def test_random_stem_keeps_fresh_stem_and_loads_the_rest(b0_sd, in_channels):
    model = _adapted(b0_sd, in_channels, "random")
    assert model.conv_stem.weight.shape == (32, in_channels, 3, 3)
    n = min(in_channels, 3)
    assert not torch.allclose(model.conv_stem.weight[:, :n], b0_sd["conv_stem.weight"][:, :n])
    for key, value in model.state_dict().items():
        if key != "conv_stem.weight":
            assert torch.equal(value, b0_sd[key]), key


def test_unknown_stem_adapt_mode(b0_sd):
    with pytest.raises(ValueError, match="unknown stem_adapt 'copy'; expected 'repeat', 'mean'"):
        _adapted(b0_sd, 4, "copy")
