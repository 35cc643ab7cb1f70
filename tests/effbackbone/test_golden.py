"""Golden per-variant numbers: pyramid channels, strides, repeats, parameters and MACs.

The literals in GOLDEN were read from timm 1.0 (``efficientnet_bX``, ``efficientnet_liteX``,
``efficientnetv2_X``); ``test_golden_table_equals_timm`` re-derives them from timm whenever timm is
installed, and ``test_golden_literals`` protects against regressions when it is not. Models are
built on the meta device: shapes only, so even V2-L takes a fraction of a second.
"""

import pytest
import torch

from effbackbone import VARIANTS, create_model
from effbackbone.profile import count_macs, count_params

# name: (C1..C5 channels, C1..C5 strides, blocks per stage, classifier params, features_only params,
#        classifier MACs at the native resolution)
GOLDEN = {
    "b0": ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32), (1, 2, 2, 3, 3, 4, 1), 5288548, 3595388, 385814752),
    "b1": ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32), (2, 3, 3, 4, 4, 5, 2), 7794184, 6101024, 686802832),
    "b2": ((16, 24, 48, 120, 352), (2, 4, 8, 16, 32), (2, 3, 3, 4, 4, 5, 2), 9109994, 7202562, 993561872),
    "b3": ((24, 32, 48, 136, 384), (2, 4, 8, 16, 32), (2, 3, 3, 5, 5, 6, 2), 12233232, 10103336, 1827141392),
    "b4": ((24, 32, 56, 160, 448), (2, 4, 8, 16, 32), (2, 4, 4, 6, 6, 8, 2), 19341616, 16742216, 4393771024),
    "b5": ((24, 40, 64, 176, 512), (2, 4, 8, 16, 32), (3, 5, 5, 7, 7, 9, 3), 30389784, 27288112, 10266384752),
    "b6": ((32, 40, 72, 200, 576), (2, 4, 8, 16, 32), (3, 6, 6, 8, 8, 11, 3), 43040704, 39403992, 19067593536),
    "b7": ((32, 48, 80, 224, 640), (2, 4, 8, 16, 32), (4, 7, 7, 10, 10, 13, 4), 66347960, 62143440, 37745884192),
    "lite0": ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32), (1, 2, 2, 3, 3, 4, 1), 4652008, 2958848, 385187552),
    "lite1": ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32), (1, 3, 3, 4, 4, 5, 1), 5416680, 3723520, 600185232),
    "lite2": ((16, 24, 48, 120, 352), (2, 4, 8, 16, 32), (1, 3, 3, 4, 4, 5, 1), 6092072, 4357952, 859736272),
    "lite3": ((24, 32, 48, 136, 384), (2, 4, 8, 16, 32), (1, 3, 3, 5, 5, 6, 1), 8197096, 6422016, 1383321872),
    "lite4": ((24, 32, 56, 160, 448), (2, 4, 8, 16, 32), (1, 4, 4, 6, 6, 8, 1), 13006568, 11149568, 2553034336),
    "v2_s": ((24, 48, 64, 160, 256), (2, 4, 8, 16, 32), (2, 4, 4, 6, 9, 15), 21458488, 19847248, 8365617152),
    "v2_m": ((24, 48, 80, 176, 512), (2, 4, 8, 16, 32), (3, 5, 5, 7, 14, 18, 5), 54139356, 52200436, 24582460384),
    "v2_l": ((32, 64, 96, 224, 640), (2, 4, 8, 16, 32), (4, 7, 7, 10, 19, 25, 7), 118515272, 116412512, 56079699008),
}


def _timm_name(name):
    return "efficientnetv2_" + name[3:] if name.startswith("v2_") else "efficientnet_" + name


def _ours(name):
    with torch.device("meta"):
        return create_model(name, features_only=False), create_model(name)


def _numbers(classifier, features, channels, strides, resolution):
    return (
        tuple(channels), tuple(strides), tuple(len(stage) for stage in classifier.blocks),
        count_params(classifier), count_params(features), count_macs(classifier, resolution),
    )


def test_golden_covers_every_variant():
    assert set(GOLDEN) == set(VARIANTS)


# timm's side costs two more builds and a forward each; the large variants run with -m slow.
FAST = ("b0", "b3", "lite0", "v2_s")
TIMM_CASES = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in GOLDEN]


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_literals(name):
    cls, feat = _ours(name)
    got = _numbers(cls, feat, feat.feature_channels, feat.feature_strides, VARIANTS[name].resolution)
    assert got == GOLDEN[name]


@pytest.mark.parametrize("name", TIMM_CASES)
def test_golden_table_equals_timm(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        cls = timm.create_model(_timm_name(name))
        feat = timm.create_model(_timm_name(name), features_only=True)
    info = feat.feature_info
    assert _numbers(cls, feat, info.channels(), info.reduction(), VARIANTS[name].resolution) == GOLDEN[name]


@pytest.mark.parametrize("name", FAST)
def test_forward_shapes_follow_feature_specs(name):
    _, feat = _ours(name)
    out = feat(torch.empty(1, 3, 64, 96, device="meta"))
    assert list(out) == ["C1", "C2", "C3", "C4", "C5"]
    assert [tuple(t.shape) for t in out.values()] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(GOLDEN[name][0], GOLDEN[name][1], strict=True)
    ]
