"""BN folding (inference mode): the same outputs as eval mode, with no BatchNorm left."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from effbackbone import create_model
from effbackbone.activations import set_memory_efficient
from effbackbone.fuse import fuse_bn, optimize_for_inference
from effbackbone.layers import Conv2dSame

MODELS = [("b0", {}), ("b0", {"tf_compat": True}), ("v2_s", {}), ("lite0", {})]


def _calibrated(name: str, features_only: bool, **kw) -> nn.Module:
    """BN statistics of random images (as after training) and random affine parameters.

    The statistics come from 4 images of 96 px: with fewer values per channel at the 3x3 stride-32
    level a channel can be near-constant, and its tiny variance then amplifies rounding noise.
    """
    model = create_model(name, features_only=features_only, **kw)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: running stats = this batch's statistics
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 96, 96, generator=g))
    return model.eval()


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, dict) else {"logits": out}


@pytest.mark.parametrize(("name", "kw"), MODELS)
@pytest.mark.parametrize("features_only", [True, False])
def test_fused_equals_eval(name, kw, features_only):
    x = torch.randn(2, 3, 96, 64)
    model = _calibrated(name, features_only, **kw)
    fused = fuse_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    # float64: the folding itself is exact (only rounding at 1e-16 remains).
    ref64, fused64 = _outputs(copy.deepcopy(model).double(), x.double()), _outputs(fuse_bn(model.double()), x.double())
    model.float()
    ref, out = _outputs(model, x), _outputs(fused, x)
    for k in ref:
        scale = ref64[k].abs().max()
        torch.testing.assert_close(fused64[k], ref64[k], rtol=0, atol=1e-10 * scale)
        # float32: as close to the float64 result as eval mode itself is. Both differ from it by
        # accumulated rounding, ~1e-6 relative at C1 growing to ~5e-5 at C5 of the deeper models,
        # so the fused-vs-eval difference is of that size too.
        assert (out[k] - ref[k]).abs().max() <= 1e-4 * max(1.0, ref[k].abs().max())
        err_fused = (out[k].double() - ref64[k]).abs().max()
        err_eval = (ref[k].double() - ref64[k]).abs().max()
        assert err_fused <= 3 * err_eval + 1e-7 * scale


def test_fuse_keeps_tf_same_padding_convs():
    model = create_model("b0", tf_compat=True).eval()
    n_same = sum(isinstance(m, Conv2dSame) for m in model.modules())
    fused = fuse_bn(model)
    assert n_same > 0
    assert sum(isinstance(m, Conv2dSame) for m in fused.modules()) == n_same
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, nn.Conv2d))


def test_fuse_memory_efficient_model_keeps_activation():
    model = _calibrated("b0", True)
    efficient = set_memory_efficient(copy.deepcopy(model)).eval()
    fused = fuse_bn(efficient)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 64)
    ref, out = _outputs(model, x), _outputs(fused, x)
    for k in ref:
        assert (out[k] - ref[k]).abs().max() <= 1e-5 * max(1.0, ref[k].abs().max())


def test_optimize_for_inference_channels_last_and_inplace():
    model = _calibrated("lite0", False)
    x = torch.randn(1, 3, 64, 64)
    ref = _outputs(model, x)["logits"]
    fast = optimize_for_inference(model, channels_last=True)
    conv = fast.conv_stem
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = _outputs(fast, x.contiguous(memory_format=torch.channels_last))["logits"]
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
    assert not any(p.requires_grad for p in conv.parameters())
    same = fuse_bn(model, inplace=True)
    assert same is model and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fuse_inside_a_wrapper_and_plain_sequential():
    enc = _calibrated("b0", True)
    head = nn.Sequential(nn.Conv2d(320, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        head[1].running_mean.normal_()
        head[1].running_var.uniform_(0.5, 2.0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = enc, head.eval()

        def forward(self, x):
            return self.head(self.encoder(x)["C5"])

    net = Net().eval()
    fused = fuse_bn(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = net(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


def test_fuse_rejects_bn_without_statistics():
    model = create_model("lite0")
    model.bn1 = nn.BatchNorm2d(model.bn1.num_features, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fuse_bn(model)
