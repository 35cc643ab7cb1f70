"""Scaling and rounding rules (effbackbone.scaling): golden literals, and equality with timm's."""

import math
import warnings

import pytest

from effbackbone.arch import B0_STAGES, FAMILIES, VARIANTS
from effbackbone.factory import resolve_variant
from effbackbone.scaling import (
    compound,
    level_stages,
    make_divisible,
    round_filters,
    round_repeats,
    round_resolution,
    scale_stages,
)

B_WIDTHS = sorted({v.width for k, v in VARIANTS.items() if k.startswith("b")})

# Per-stage repeats of the paper's B0 table scaled by each variant's depth (ceil), and the Lite
# rule that keeps the first and last stage fixed. Values from timm's built models (len(blocks[i])).
GOLDEN_REPEATS = {
    "b0": (1, 2, 2, 3, 3, 4, 1),
    "b1": (2, 3, 3, 4, 4, 5, 2),
    "b2": (2, 3, 3, 4, 4, 5, 2),
    "b3": (2, 3, 3, 5, 5, 6, 2),
    "b4": (2, 4, 4, 6, 6, 8, 2),
    "b5": (3, 5, 5, 7, 7, 9, 3),
    "b6": (3, 6, 6, 8, 8, 11, 3),
    "b7": (4, 7, 7, 10, 10, 13, 4),
    "lite0": (1, 2, 2, 3, 3, 4, 1),
    "lite1": (1, 3, 3, 4, 4, 5, 1),
    "lite2": (1, 3, 3, 4, 4, 5, 1),
    "lite3": (1, 3, 3, 5, 5, 6, 1),
    "lite4": (1, 4, 4, 6, 6, 8, 1),
    "v2_s": (2, 4, 4, 6, 9, 15),
    "v2_m": (3, 5, 5, 7, 14, 18, 5),
    "v2_l": (4, 7, 7, 10, 19, 25, 7),
}
# Stage output widths (before the head) of each B variant, from timm's built models.
GOLDEN_STAGE_CHANNELS = {
    "b0": (16, 24, 40, 80, 112, 192, 320),
    "b3": (24, 32, 48, 96, 136, 232, 384),
    "b7": (32, 48, 80, 160, 224, 384, 640),
}


def _scaled(name):
    v = VARIANTS[name]
    fam = FAMILIES[v.family]
    return scale_stages(fam.stages, v.width, v.depth, fam.fix_first_last)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3.0, 8), (12.0, 16), (17.0, 16), (19.0, 24), (20.0, 24), (35.2, 32), (36.0, 40), (70.4, 72), (1536.0, 1536)],
)
def test_make_divisible_golden(value, expected):
    assert make_divisible(value) == expected


def test_make_divisible_never_loses_more_than_ten_percent():
    for tenths in range(80, 20001):
        v = tenths / 10
        r = make_divisible(v)
        assert r % 8 == 0 and r >= 8 and r >= 0.9 * v


def test_round_filters_golden():
    # stem (32) and head (1280) of B3 (width 1.2) and B7 (width 2.0); 40 * 1.1 = 44 rounds to 48
    assert round_filters(32, 1.2) == 40
    assert round_filters(1280, 1.2) == 1536
    assert round_filters(1280, 2.0) == 2560
    assert round_filters(40, 1.1) == 48
    assert round_filters(112, 1.1) == 120


@pytest.mark.parametrize("width", B_WIDTHS)
def test_round_filters_equals_timm_round_channels(width):
    builder = pytest.importorskip("timm.models._efficientnet_builder")
    ours = [round_filters(c, width) for c in range(8, 2001)]
    theirs = [builder.round_channels(c, width) for c in range(8, 2001)]
    assert ours == theirs


def test_round_repeats_is_ceil():
    assert round_repeats(1, 1.0) == 1
    assert round_repeats(2, 1.1) == 3  # 2.2 -> 3
    assert round_repeats(4, 3.1) == 13  # 12.4 -> 13
    assert round_repeats(3, 1.4) == 5  # 4.2 -> 5
    assert all(round_repeats(n, d) == math.ceil(n * d) for n in range(1, 20) for d in (0.5, 0.83, 1.0, 2.2))


@pytest.mark.parametrize("name", list(GOLDEN_REPEATS))
def test_scaled_repeats_golden(name):
    assert tuple(s.repeats for s in _scaled(name)) == GOLDEN_REPEATS[name]


@pytest.mark.parametrize("name", list(GOLDEN_STAGE_CHANNELS))
def test_scaled_stage_channels_golden(name):
    assert tuple(s.out_channels for s in _scaled(name)) == GOLDEN_STAGE_CHANNELS[name]


def test_scale_stages_keeps_kernels_strides_and_expansion():
    for row, base in zip(_scaled("b5"), B0_STAGES, strict=True):
        assert (row.kernel, row.stride, row.expand_ratio, row.se_ratio) == (
            base.kernel, base.stride, base.expand_ratio, base.se_ratio,
        )


def test_level_stages():
    # B0 stage strides 1,2,2,2,1,2,1: levels end at stages 0 (C1), 1, 2, 4, 6 (C5)
    assert level_stages([s.stride for s in B0_STAGES]) == [0, 1, 2, 4, 6]
    assert level_stages([1, 2, 2, 2, 1, 2]) == [0, 1, 2, 4, 5]  # V2-S
    with pytest.raises(ValueError, match="stride-1 stage"):
        level_stages([2, 2, 1])


@pytest.mark.parametrize(
    ("res", "expected"), [(224.0, 224), (257.6, 256), (260.0, 256), (261.0, 264), (10.0, 32), (317.7, 320)]
)
def test_round_resolution(res, expected):
    # ties go to the even multiple (Python round): 260 = 32.5 x 8 -> 256
    assert round_resolution(res) == expected


def test_compound_coefficients():
    c = compound(1.0)
    assert (c.depth, c.width) == pytest.approx((1.2, 1.1))
    assert c.resolution == 256  # 224 * 1.15 = 257.6 -> nearest multiple of 8
    assert c.flops_base == pytest.approx(1.2 * 1.1**2 * 1.15**2)
    c0 = compound(0.0)
    assert (c0.depth, c0.width, c0.resolution) == (1.0, 1.0, 224)
    neg = compound(-1.0)
    assert (neg.depth, neg.width, neg.resolution) == (pytest.approx(1 / 1.2), pytest.approx(1 / 1.1), 192)


def test_compound_warns_off_constraint_and_rejects_shrinking_bases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compound(2.0)  # the paper's coefficients satisfy the constraint (1.92)
    with pytest.warns(UserWarning, match="alpha\\*beta\\^2\\*gamma\\^2 = 2.4"):
        compound(1.0, alpha=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        compound(1.0, beta=0.9)


@pytest.mark.parametrize(("phi", "dropout"), [(-1.0, 0.1), (0.0, 0.2), (1.0, 0.2), (2.5, 0.3), (7.0, 0.5), (20.0, 0.5)])
def test_custom_phi_dropout_rule(phi, dropout):
    assert resolve_variant("b0", phi=phi).dropout == pytest.approx(dropout)


def test_custom_phi_scales_the_family_base():
    v = resolve_variant("b3", phi=1.0)  # phi scales B0, whatever B-name is given
    assert (v.family, v.width, v.depth, v.resolution) == ("efficientnet", pytest.approx(1.1), pytest.approx(1.2), 256)
    lite = resolve_variant("lite2", phi=1.0)
    assert lite.family == "lite" and lite.width == pytest.approx(1.1)
    v2 = resolve_variant("v2_m", phi=-0.5)
    assert v2.family == "v2_m" and v2.width == pytest.approx(1.1**-0.5)
