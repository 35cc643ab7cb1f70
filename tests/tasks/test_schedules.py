"""Warmup + cosine schedule and the encoder lr multiplier (tasks.common.schedules, tasks.common.optim)."""

import io
import math

import pytest
import torch
from torch import nn

from tasks.common.optim import apply_lr_mult, build_param_groups
from tasks.common.schedules import build_warmup_cosine, resolve_warmup, warmup_cosine


def test_warmup_is_linear_then_cosine_decays_to_the_floor():
    total, warmup, floor = 20, 4, 0.1
    f = warmup_cosine(total, warmup, floor)
    assert [f(s) for s in range(warmup)] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f(warmup) == pytest.approx(1.0)  # the peak right after warmup
    assert f(warmup + (total - warmup) // 2) == pytest.approx((1 + floor) / 2)  # half-way down the cosine
    assert f(total) == pytest.approx(floor) and f(total + 10) == pytest.approx(floor)  # stays at the floor
    decay = [f(s) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert warmup_cosine(5, 0, 0.0)(0) == pytest.approx(1.0)  # no warmup: starts at the full lr


def test_warmup_steps_win_over_the_fraction_and_bad_values_are_named():
    assert resolve_warmup(1000, 7, 0.5) == 7
    assert resolve_warmup(1000, None, 0.05) == 50
    assert resolve_warmup(1, None, 0.05) == 0  # fast_dev_run: one step, no warmup
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        resolve_warmup(10, None, 1.5)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        resolve_warmup(10, -1, 0.0)
    with pytest.raises(ValueError, match="min_lr_factor"):
        warmup_cosine(10, 1, 2.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)


def test_encoder_groups_get_the_lr_multiplier_and_keep_no_decay_on_norms_and_biases():
    net = _Net()
    groups = build_param_groups(net, 0.05, encoder=net.encoder, encoder_lr_mult=0.1)
    opt = apply_lr_mult(torch.optim.AdamW(groups, lr=0.2))
    enc = {id(p) for p in net.encoder.parameters()}
    for g in opt.param_groups:
        in_enc = {id(p) in enc for p in g["params"]}
        assert len(in_enc) == 1  # a group is all encoder or all decoder/head
        assert g["lr"] == pytest.approx(0.02 if in_enc == {True} else 0.2)
        assert g["weight_decay"] == (0.05 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    assert len(build_param_groups(net, 0.05, encoder=net.encoder, encoder_lr_mult=1.0)) == 2  # no split at 1
    with pytest.raises(ValueError, match="encoder_lr_mult must be > 0"):
        build_param_groups(net, 0.05, encoder=net.encoder, encoder_lr_mult=0.0)


def test_scheduler_scales_each_groups_own_lr_every_step():
    net = _Net()
    opt = apply_lr_mult(torch.optim.SGD(build_param_groups(net, 0.0, encoder=net.encoder, encoder_lr_mult=0.5), lr=1.0))
    total, warmup, floor = 8, 2, 0.0
    sched = build_warmup_cosine(opt, total, warmup, 0.9, floor)
    f = warmup_cosine(total, warmup, floor)
    for step in range(total + 2):
        lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
        assert lrs == pytest.approx(sorted({0.5 * f(step), f(step)}) if f(step) else [0.0])
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], floor, abs_tol=1e-12)
    assert "lr_lambdas" in sched.state_dict()  # the closure itself is not saved: weights-only loadable
    torch.save(sched.state_dict(), buf := io.BytesIO())
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["last_epoch"] == total + 2
