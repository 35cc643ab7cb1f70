"""timm registry: our names pass the checks of timm's own model test suite (tests/test_models.py).

Each ``test_model_*`` below mirrors the timm test of the same name for the ``effbackbone_*`` names
(sizes reduced for CPU); the large variants run with ``-m slow``.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.layers import get_channel_dim, get_spatial_dim  # noqa: E402

import effbackbone  # noqa: E402
from effbackbone.arch import VARIANTS  # noqa: E402
from effbackbone.integrations import timm as etimm  # noqa: E402

FAST = ("effbackbone_b0",)


def _fast_or_slow(names: tuple[str, ...]) -> list:
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


NAMES = _fast_or_slow(etimm.MODEL_NAMES)
SOME = _fast_or_slow(("effbackbone_b0", "effbackbone_lite0", "effbackbone_v2_s"))  # one per family


def _native(name: str) -> int:
    return VARIANTS[name.removeprefix("effbackbone_")].resolution


def _size(name: str, target: int) -> tuple[int, int, int]:
    res = min(_native(name), target)
    return (3, res, res)


def _nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_names_registered_idempotently():
    assert set(timm.list_models("effbackbone_*")) == set(etimm.MODEL_NAMES)
    assert len(etimm.MODEL_NAMES) == len(VARIANTS) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered twice
        assert etimm.register() == list(etimm.MODEL_NAMES)
    assert timm.models.get_arch_name("effbackbone_b3") == "effbackbone_b3"
    assert "effbackbone_b0" in timm.list_models(module="timm")  # timm files entrypoints by module basename


@pytest.mark.parametrize("name", etimm.MODEL_NAMES)
def test_pretrained_cfg(name):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    res = _native(name)
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (3, res, res)
    assert cfg["pool_size"] == (math.ceil(res / 32),) * 2
    assert 0.8 < cfg["crop_pct"] < 1 and cfg["interpolation"] == "bicubic"
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["num_classes"] == 1000
    assert (cfg["first_conv"], cfg["classifier"], cfg["license"]) == ("conv_stem", "classifier", "apache-2.0")
    assert not timm.models.is_model_pretrained(name)  # no download source: weights come from local files


@pytest.mark.parametrize("name", NAMES)
def test_model_forward(name):
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *_size(name, 96))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 1000)
    assert not torch.isnan(out).any()
    model.set_grad_checkpointing()
    with torch.no_grad():
        out2 = model(x)
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_model_backward(name):
    model = timm.create_model(name, pretrained=False, num_classes=42).train()
    out = model(torch.randn(2, *_size(name, 64)))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert out.shape == (2, 42)
    assert not torch.isnan(out).any()


def _assert_model_api_contract(model, name):
    """timm's ``_assert_model_api_contract`` (what its optimizer factory and model creation rely on)."""
    from timm.models._manipulate import group_parameters

    with torch.device("meta"), pytest.raises(TypeError):
        timm.create_model(name, pretrained=False, device="meta", not_a_model_arg=1)
    # reset_classifier keeps the current pooling by default
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1


def _assert_reset_classifier_preserves_parent_device_dtype(model):
    model.to(device="meta", dtype=torch.float64)
    expected, expected_training = next(model.parameters()), model.training
    model.reset_classifier(0)
    model.reset_classifier(2)
    params = list(model.get_classifier().parameters())
    assert params and all(p.device == expected.device and p.dtype == expected.dtype for p in params)
    assert all(m.training == expected_training for m in model.modules())


def _assert_factory_device(name):
    """``device=`` without a device context must place every parameter and buffer there."""
    model = timm.create_model(name, pretrained=False, device="meta", dtype=torch.float32)
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not misplaced


def _assert_frozen_survives_reset_and_resize(name):
    model = timm.create_model(name, pretrained=False, device="meta", dtype=torch.float32)
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


CFG_NAMES = [
    n if n in ("effbackbone_b0", "effbackbone_v2_s") else pytest.param(n, marks=pytest.mark.slow)
    for n in etimm.MODEL_NAMES
]


@pytest.mark.parametrize("name", CFG_NAMES)
def test_model_default_cfgs(name):
    """timm 1.0.31 ``test_model_default_cfgs``: on the meta device, with ``device=`` and ``dtype=`` passed."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, device="meta", dtype=torch.float32).eval()
    _assert_model_api_contract(model, name)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0]
    pool_size, input_size = cfg["pool_size"], cfg["input_size"]
    spatial_axis, feat_axis = get_spatial_dim("NCHW"), get_channel_dim("NCHW")
    if all(x <= 448 for x in input_size):  # timm checks output sizes up to 448 px (B6, B7, V2-M/L skip them)
        x = torch.randn(1, *input_size, device="meta")
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert (feats.shape[spatial_axis[0]], feats.shape[spatial_axis[1]]) == tuple(pool_size)
        assert feats.shape[feat_axis] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        # a dtype change after a forward must not leave stale caches or upcast activations
        model.to(torch.bfloat16)
        assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
        model.to(torch.float32)
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.ndim == 2 and out.shape[1] == model.head_hidden_size and out.shape == pre.shape
        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and tuple(out.shape[2:]) == tuple(pool_size)
        model = timm.create_model(name, pretrained=False, num_classes=0, device="meta", dtype=torch.float32).eval()
        out = model(x)
        assert out.shape == pre.shape and out.shape[1] == model.head_hidden_size
        # explicit factory kwargs must also work without the device context
        model = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", device="meta", dtype=torch.float32
        ).eval()
        out = model(x)
        assert out.ndim == 4 and tuple(out.shape[2:]) == tuple(pool_size)
    for key in (cfg["classifier"], cfg["first_conv"]):
        assert key + ".weight" in state_dict
    _assert_reset_classifier_preserves_parent_device_dtype(model)
    _assert_factory_device(name)
    _assert_frozen_survives_reset_and_resize(name)


def test_device_and_dtype_reach_every_model_kind():
    for kwargs in ({}, {"features_only": True}, {"features_only": True, "feature_cls": "getter"}):
        model = timm.create_model("effbackbone_b0", device="meta", dtype=torch.bfloat16, **kwargs)
        tensors = [*model.parameters(), *model.buffers()]
        assert all(t.device.type == "meta" for t in tensors)
        assert {t.dtype for t in tensors} == {torch.bfloat16, torch.int64}  # num_batches_tracked stays int64


@pytest.mark.parametrize("name", SOME)
def test_reset_classifier_keeps_pool(name):
    """timm 1.0.31 ``test_reset_classifier_keeps_pool`` (there for timm's own models), for ours."""
    model = timm.create_model(name, pretrained=False, global_pool="max").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(5)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected)
        assert model(x).shape == (2, 5)
        model.reset_classifier(5, "avg")
        pooled_avg = model.forward_head(model.forward_features(x), pre_logits=True)
        assert not torch.allclose(pooled_avg, expected)


@pytest.mark.parametrize("name", SOME)
@pytest.mark.parametrize("tf_compat", [False, True])
def test_model_forward_torchscript(name, tf_compat):
    with timm.set_scriptable(True):
        model = timm.create_model(name, pretrained=False, tf_compat=tf_compat).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *_size(name, 64))
    with torch.no_grad():
        out = scripted(x)
        ref = model(x)
    assert out.shape == (1, 1000) and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_features(name):
    model = timm.create_model(name, pretrained=False, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == 5 and reductions == [2, 4, 8, 16, 32]
    size = _size(name, 96)
    with torch.no_grad():
        outs = model(torch.randn(1, *size))
    assert isinstance(outs, list) and len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs, strict=True):
        assert o.shape[1] == c
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1
        assert not torch.isnan(o).any()
    # Same levels, channels and strides as our own features_only encoder.
    ours = effbackbone.create_model(name.removeprefix("effbackbone_"))
    assert channels == ours.feature_channels and reductions == ours.feature_strides
    assert model.feature_info.module_name() == [s.module for s in ours.feature_specs]


def test_features_out_indices_and_effdet_accessors():
    model = timm.create_model("effbackbone_b0", features_only=True, out_indices=(2, 3, 4))
    assert model.feature_info.channels() == [40, 112, 320]
    assert model.feature_info.get_dicts(keys=["num_chs", "reduction"]) == [
        {"num_chs": 40, "reduction": 8},
        {"num_chs": 112, "reduction": 16},
        {"num_chs": 320, "reduction": 32},
    ]
    assert [o.shape[1] for o in model(torch.randn(1, 3, 64, 64))] == [40, 112, 320]
    assert "conv_head.weight" not in model.state_dict()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and "classifier" not in model.pretrained_cfg


@pytest.mark.parametrize("feature_cls", ["getter", "list", "dict", "hook", "fx"])
def test_timm_feature_wrappers_match(feature_cls):
    ref = timm.create_model("effbackbone_b0", features_only=True, out_indices=(1, 2, 4)).eval()
    model = timm.create_model("effbackbone_b0", features_only=True, out_indices=(1, 2, 4), feature_cls=feature_cls)
    model.eval()
    assert model.feature_info.channels() == ref.feature_info.channels()
    # The wrappers rename or prune modules but keep their order: copy the weights across by position.
    theirs, ours = model.state_dict(), ref.state_dict()
    assert [v.shape for v in theirs.values()] == [v.shape for v in ours.values()]
    model.load_state_dict(dict(zip(theirs, ours.values(), strict=True)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        out = list(out.values()) if isinstance(out, dict) else out
        for a, b in zip(out, ref(x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", SOME)
def test_model_forward_intermediates(name):
    model = timm.create_model(name, pretrained=False).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    size = _size(name, 96)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(inter) == len(info.channels()) == 5
        for c, r, o in zip(info.channels(), info.reduction(), inter, strict=True):
            assert o.shape[1] == c and o.shape[2] <= math.ceil(size[1] / r) + 1
        torch.testing.assert_close(final, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        assert [t.shape for t in last2] == [t.shape for t in inter[-2:]]
        model.set_grad_checkpointing()
        final3, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, final3, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def _create_fx_model(model):
    """timm's ``_create_fx_model`` (eval case): a torchvision feature extractor on the last graph node."""
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    tracer_kwargs = {
        "leaf_modules": timm.models.get_notrace_modules(),
        "autowrap_functions": timm.models.get_notrace_functions(),
        "param_shapes_constant": True,
    }
    train_nodes, eval_nodes = fe.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return fe.create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize("name", SOME)
@pytest.mark.parametrize("kwargs", [{}, {"tf_compat": True}])
def test_model_forward_fx_torchscript(name, kwargs):
    """timm 1.0.31 ``test_model_forward_fx_torchscript``: the FX-traced model scripts and runs (at 128 px)."""
    with timm.set_scriptable(True):
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.eval()
    scripted = torch.jit.script(_create_fx_model(model))
    x = torch.randn(1, *_size(name, 128))
    with torch.inference_mode():
        outputs = torch.cat(tuple(scripted(x).values()))
        assert outputs.shape[0] == 1
        assert not torch.isnan(outputs).any()
        torch.testing.assert_close(outputs, model(x))


@pytest.mark.parametrize("tf_compat", [False, True])
def test_model_forward_and_backward_fx(tf_compat):
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    tracer_kwargs = {
        "leaf_modules": timm.models.get_notrace_modules(),
        "autowrap_functions": timm.models.get_notrace_functions(),
        "param_shapes_constant": True,
    }
    model = timm.create_model("effbackbone_b0", pretrained=False, tf_compat=tf_compat, num_classes=42).eval()
    train_nodes, eval_nodes = fe.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = fe.create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(next(iter(fx_model(x).values())), model(x))
    fx_model.train()
    out = next(iter(fx_model(torch.randn(2, 3, 64, 64)).values()))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in fx_model.parameters())


# -- pretrained weights from local files (timm's test_model_load_pretrained / _features_pretrained) --


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Pretrained loading below reads a local file of random weights; any network access fails the test."""
    from smp_support import block_network

    return block_network(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def timm_b0_file(tmp_path_factory):
    """timm's own B0 with random weights (``pretrained=False``: nothing downloaded), saved as safetensors."""
    torch.manual_seed(0)
    src = timm.create_model("efficientnet_b0", pretrained=False).eval()
    path = tmp_path_factory.mktemp("w") / "efficientnet_b0.safetensors"
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(src.state_dict(), str(path))
    return src, str(path)


@pytest.mark.usefixtures("offline")
def test_pretrained_file_gives_timm_logits(timm_b0_file):
    src, path = timm_b0_file
    overlay = {"file": path}
    model = timm.create_model("effbackbone_b0", pretrained=True, pretrained_cfg_overlay=overlay)  # offline-ok: file
    model = model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - src(x)).abs().max().item() == 0.0
        model.reset_classifier(0)
        src.reset_classifier(0)
        assert torch.equal(model(x), src(x))


@pytest.mark.usefixtures("offline")
def test_model_load_pretrained_in_chans_and_classes(timm_b0_file):
    src, path = timm_b0_file
    for num_classes in (5, 0):
        model = timm.create_model(
            "effbackbone_b0",
            pretrained=True,  # offline-ok: local file
            pretrained_cfg_overlay={"file": path},
            in_chans=1,
            num_classes=num_classes,
        )
        # timm's adapt_input_conv sums the RGB kernels for one input channel.
        torch.testing.assert_close(model.conv_stem.weight, src.conv_stem.weight.sum(1, keepdim=True))
        torch.testing.assert_close(model.blocks[3][0].conv_pw.weight, src.blocks[3][0].conv_pw.weight)
        assert model.num_classes == num_classes
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, num_classes or model.num_features)


@pytest.mark.usefixtures("offline")
def test_model_features_pretrained(timm_b0_file):
    src, path = timm_b0_file
    model = timm.create_model(
        "effbackbone_b0",
        pretrained=True,  # offline-ok: local file
        pretrained_cfg_overlay={"file": path},
        features_only=True,
        out_indices=(2, 3, 4),
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
        for a, b in zip(model(x), ref, strict=True):
            assert torch.equal(a, b)


@pytest.mark.usefixtures("offline")
def test_pretrained_tf_weights_with_tf_compat(tmp_path):
    src = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    path = tmp_path / "tf_b0.pth"
    torch.save(src.state_dict(), path)
    overlay = {"file": str(path)}  # timm's own TF B0 with random weights, saved above
    model = timm.create_model(
        "effbackbone_b0", pretrained=True, pretrained_cfg_overlay=overlay, tf_compat=True  # offline-ok: local file
    ).eval()
    x = torch.randn(1, 3, 67, 61)  # odd sizes exercise TF "same" padding
    with torch.no_grad():
        assert (model(x) - src(x)).abs().max().item() == 0.0


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", ["b0", "v2_s"])
def test_pretrained_torchvision_file(tmp_path, name):
    tvm = pytest.importorskip("torchvision.models")
    src = getattr(tvm, f"efficientnet_{name}")().eval()
    path = tmp_path / f"tv_{name}.pth"
    torch.save(src.state_dict(), path)
    overlay = {"file": str(path)}  # torchvision's model with random weights, saved above
    model = timm.create_model(
        f"effbackbone_{name}", pretrained=True, pretrained_cfg_overlay=overlay  # offline-ok: local file
    ).eval()
    # torchvision's V2 uses BN eps 1e-3, which the state dict does not record: set from the layout.
    assert model.bn1.eps == src.features[0][1].eps
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=1e-5)


@pytest.mark.usefixtures("offline")
def test_wrong_weights_file_is_refused(tmp_path, timm_b0_file):
    _, path = timm_b0_file
    b0_file = {"file": path}  # a B0 file offered to B1
    with pytest.raises(effbackbone.WeightsError, match="missing keys.*create_model"):
        timm.create_model(
            "effbackbone_b1", num_classes=1000, pretrained=True, pretrained_cfg_overlay=b0_file  # offline-ok: file
        )
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(1)}, bad)
    with pytest.raises(effbackbone.WeightsError, match="unrecognised weight layout"):
        timm.create_model(
            "effbackbone_b0", pretrained=True, pretrained_cfg_overlay={"file": str(bad)}  # offline-ok: local file
        )


# -- timm model API and our options --


def test_same_state_dict_as_timm_and_ours():
    model = timm.create_model("effbackbone_b0")
    assert isinstance(model, effbackbone.EfficientNet)
    ref = timm.create_model("efficientnet_b0")
    ours = effbackbone.create_model("b0", features_only=False)
    assert list(model.state_dict()) == list(ours.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert _nparams(model) == _nparams(ref) == 5_288_548


def test_classifier_api_and_layer_decay():
    model = timm.create_model("effbackbone_b0", num_classes=10)
    assert model.get_classifier() is model.classifier and model.classifier.out_features == 10
    model.reset_classifier(3, "max")
    assert model.classifier.out_features == 3 and model.global_pool.pool_type == "max"
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    # Layer-wise LR decay uses the fine group_matcher: stem, every block, head.
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.8)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == 1 + sum(len(stage) for stage in model.blocks) + 1 and scales[-1] == 1.0


def test_effbackbone_options_pass_through():
    model = timm.create_model(
        "effbackbone_b0", features_only=True, output_stride=16, frozen_stages=2, drop_path_rate=0.1
    )
    assert model.feature_info.reduction() == [2, 4, 8, 16, 16]
    assert not model.conv_stem.weight.requires_grad and model.blocks[3][0].conv_pw.weight.requires_grad
    model = timm.create_model("effbackbone_b0", tf_compat=True, grad_checkpointing=True)
    assert model.bn1.eps == 1e-3 and model.grad_checkpointing
    assert model.conv_stem.__class__.__name__ == "Conv2dSame"
    with pytest.raises(TypeError, match="valid options"):
        timm.create_model("effbackbone_b0", tf_compat_typo=True)
    with pytest.raises(TypeError, match="stem_adapt"):
        timm.create_model("effbackbone_b0", stem_adapt="mean")
    with pytest.raises(TypeError, match="frozen_stages"):
        timm.create_model("effbackbone_b0", features_only=True, feature_cls="getter", frozen_stages=2)


@pytest.mark.parametrize("features", [{}, {"features_only": True}, {"features_only": True, "feature_cls": "getter"}])
def test_post_build_options_mean_what_they_mean_in_create_model(features):
    """The options applied after building go through one function, as in ``effbackbone.create_model``."""
    from effbackbone.activations import BatchNormAct2d

    model = timm.create_model("effbackbone_b0", memory_efficient=True, channels_last=True, **features)
    ours = effbackbone.create_model("b0", features_only=bool(features), memory_efficient=True, channels_last=True)
    assert (
        sum(isinstance(m, BatchNormAct2d) for m in model.modules())
        == sum(isinstance(m, BatchNormAct2d) for m in ours.modules())
        > 0
    )
    stem = next(p for p in model.parameters() if p.ndim == 4)
    assert stem.shape == ours.conv_stem.weight.shape and stem.is_contiguous(memory_format=torch.channels_last)


# -- timm's own test file, when its source distribution is at hand --

TIMM_SDIST_ENV = "TIMM_SDIST"
OWN_SUITE_NAMES = ("effbackbone_b0", "effbackbone_v2_s")


def _timm_tests(dest: Path) -> Path:
    """timm's ``tests/`` folder, copied from ``$TIMM_SDIST`` (the ``.tar.gz`` or its unpacked folder) to ``dest``."""
    hint = (
        f"timm's own tests need its source distribution: pip download --no-deps --no-binary :all: "
        f"timm=={timm.__version__} -d DIR, then {TIMM_SDIST_ENV}=DIR/timm-{timm.__version__}.tar.gz"
    )
    src = os.environ.get(TIMM_SDIST_ENV)
    if not src or not Path(src).exists():
        pytest.skip(hint)
    root = Path(src)
    if root.is_file():
        with tarfile.open(root) as tar:
            # The "data" filter refuses links and paths outside dest (Python >= 3.10.12 / 3.11.4).
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        root = next(dest.glob("timm-*"))
    if root.name != f"timm-{timm.__version__}":
        pytest.skip(f"{TIMM_SDIST_ENV} holds {root.name}, but timm {timm.__version__} is installed. {hint}")
    tests = dest / "timm_tests"
    shutil.copytree(root / "tests", tests)
    (tests / "pytest.ini").write_text("[pytest]\n")  # timm's markers and options, not ours
    return tests


@pytest.mark.slow
def test_timm_own_test_models_file_passes(tmp_path):
    """timm's ``tests/test_models.py``, unmodified, selected to our names (plugin: our timm registration)."""
    tests = _timm_tests(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "effbackbone.integrations.timm",
        "-p",
        "no:cacheprovider",
        "-c",
        str(tests / "pytest.ini"),
        "--rootdir",
        str(tests),
        "-W",
        "ignore",
        "-k",
        " or ".join(OWN_SUITE_NAMES),
        str(tests / "test_models.py"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing below needs the network: pretrained=False throughout
    repo = Path(__file__).resolve().parents[2]  # so the subprocess imports this checkout's effbackbone
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None and int(passed[1]) >= 8 * len(OWN_SUITE_NAMES), tail
