"""effbackbone.profile: hook-based parameter and multiply-add counts."""

import pytest
import torch
from torch import nn

from effbackbone import VARIANTS, create_model
from effbackbone.profile import count_macs, count_params, profile


def test_counts_of_a_hand_computed_network():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # out 8x16x16; 2048 * 3 * 9 = 55296
        nn.BatchNorm2d(8),  # not counted
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise: 2048 * 1 * 9 = 18432
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),  # 8 * 5 = 40
    )
    assert count_macs(net, 32) == 55296 + 18432 + 40
    assert count_macs(net, (32, 32)) == count_macs(net, (3, 32, 32))
    assert count_params(net) == (3 * 8 * 9 + 8) + 16 + 8 * 9 + (8 * 5 + 5)
    net[0].requires_grad_(False)
    assert count_params(net, trainable_only=True) == 16 + 8 * 9 + 45


def test_count_macs_restores_mode_and_removes_hooks():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout())
    net.train()
    count_macs(net, 8)
    assert net.training and not net[0]._forward_hooks
    net.eval()
    count_macs(net, 8)
    assert not net.training


def test_input_size_is_validated():
    with pytest.raises(ValueError, match="input_size"):
        count_macs(nn.Conv2d(3, 4, 1), (1, 2, 3, 4))


def test_meta_device_gives_the_same_counts_as_cpu():
    cpu = create_model("b0", features_only=False)
    with torch.device("meta"):
        meta = create_model("b0", features_only=False)
    assert profile(meta, (72, 100)) == profile(cpu, (72, 100))


def test_classifier_cost_matches_paper_order_of_magnitude():
    # The paper reports 5.3M parameters and 0.39B FLOPs (multiply-adds) for B0 at 224.
    with torch.device("meta"):
        cost = profile(create_model("b0", features_only=False), 224)
    assert round(cost.params / 1e6, 1) == 5.3
    assert round(cost.macs / 1e9, 2) == 0.39


@pytest.mark.parametrize(
    ("ours", "theirs", "options"),
    [
        ("b0", "efficientnet_b0", {}),
        ("lite0", "efficientnet_lite0", {}),
        ("v2_s", "efficientnetv2_s", {}),
        ("b3", "tf_efficientnet_b3", {"tf_compat": True}),
    ],
)
@pytest.mark.parametrize("size", ["native", (65, 97)])
def test_same_counts_as_timm(ours, theirs, options, size):
    timm = pytest.importorskip("timm")
    size = VARIANTS[ours].resolution if size == "native" else size
    with torch.device("meta"):
        a = create_model(ours, features_only=False, **options)
        b = timm.create_model(theirs)
    assert profile(a, size) == profile(b, size)


@pytest.mark.parametrize(("ours", "theirs"), [("b0", "efficientnet_b0"), ("v2_s", "efficientnet_v2_s")])
def test_same_counts_as_torchvision(ours, theirs):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        a = create_model(ours, features_only=False)
        b = getattr(tv.models, theirs)()
    size = VARIANTS[ours].resolution
    assert profile(a, size) == profile(b, size)
