"""Numerical parity with timm and torchvision: same weights in, same pyramid and logits out.

Each source model is built with random weights, its BatchNorm statistics are made non-trivial
(calibrated on random data, then perturbed), and its state dict is loaded into ours through
``create_model(weights=...)``. Every pyramid level is compared with the source's own multi-scale
outputs (timm ``features_only`` built from the same weights; torchvision's ``features[i]``
outputs), and the classifier logits with the source's, at 65x97 so that odd sizes exercise the
TF "same" padding. The default run covers b0, b3, lite0 and v2_s per source; ``-m slow`` all.

The max abs differences are recorded as the junit property ``max_abs_diff`` (docs/encoder.md
holds a table made from one full run).
"""

import pytest
import torch
from torch import nn

from effbackbone import create_model

TOL = 1e-4
FAST = ("b0", "b3", "lite0", "v2_s")
B = tuple(f"b{i}" for i in range(8))
LITE = tuple(f"lite{i}" for i in range(5))
V2 = ("v2_s", "v2_m", "v2_l")


def _timm_name(name, tf):
    prefix = "tf_" if tf else ""
    return prefix + ("efficientnetv2_" + name[3:] if name.startswith("v2_") else "efficientnet_" + name)


def _cases(names, source, tag):
    return [pytest.param(source, n, marks=() if n in FAST else pytest.mark.slow, id=f"{tag}-{n}") for n in names]


def randomize_bn(model, gen):
    """Random BN affine parameters and running statistics that keep activations O(1).

    Statistics are calibrated on random data (so deep outputs neither explode nor vanish, which
    would make an absolute tolerance meaningless), then each variance is perturbed by 0.8-1.25x.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.2, generator=gen)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
        model.train()
        model(torch.randn(4, 3, 65, 97, generator=gen))
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            # Channels that happened to be near-constant on 4 images would amplify everything downstream.
            m.running_var.clamp_(min=0.5 * m.running_var.mean().item())
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25, generator=gen))
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen), alpha=0.05)
    return model.eval()


def _compare(ours_levels, ref_levels, ours_logits, ref_logits, record_property):
    assert len(ref_levels) == 5
    assert [t.shape for t in ours_levels.values()] == [t.shape for t in ref_levels]
    diffs = {name: (a - b).abs().max().item() for (name, a), b in zip(ours_levels.items(), ref_levels, strict=True)}
    diffs["logits"] = (ours_logits - ref_logits).abs().max().item()
    worst = max(diffs.values())
    record_property("max_abs_diff", worst)
    record_property("diffs", diffs)
    assert worst <= TOL, diffs
    # Parity would be vacuous if everything were ~0.
    assert min(t.abs().max().item() for t in ref_levels) > 1e-2


def _ours(name, sd, **options):
    feats = create_model(name, weights=sd, **options).eval()
    cls = create_model(name, features_only=False, weights=sd, **options).eval()
    return feats, cls


@pytest.mark.parametrize(("tf", "name"), _cases(B + LITE + V2, False, "timm") + _cases(B + LITE + V2, True, "tf"))
def test_timm_parity(tf, name, record_property):
    timm = pytest.importorskip("timm")
    gen = torch.Generator().manual_seed(0)
    src = randomize_bn(timm.create_model(_timm_name(name, tf)), gen)
    sd = src.state_dict()
    ref_feats = timm.create_model(_timm_name(name, tf), features_only=True)
    result = ref_feats.load_state_dict(sd, strict=False)
    assert not result.missing_keys
    assert all(k.split(".")[0] in ("conv_head", "bn2", "classifier") for k in result.unexpected_keys)
    ref_feats.eval()
    feats, cls = _ours(name, sd, tf_compat=tf)
    x = torch.randn(2, 3, 65, 97, generator=gen)
    with torch.no_grad():
        _compare(feats(x), ref_feats(x), cls(x), src(x), record_property)


def _torchvision_levels(model, x):
    """Logits, and the output of the last stage at each resolution (C1..C5), via forward hooks."""
    outs = []
    stages = list(model.features)[1:-1]  # [0] is the stem, [-1] the head conv
    handles = [s.register_forward_hook(lambda _m, _i, o: outs.append(o)) for s in stages]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    levels = [o for i, o in enumerate(outs) if i + 1 == len(outs) or outs[i + 1].shape[-2:] != o.shape[-2:]]
    return logits, levels


@pytest.mark.parametrize(("source", "name"), _cases(B + V2, "torchvision", "torchvision"))
def test_torchvision_parity(source, name, record_property):
    """``torchvision.models.efficientnet_{name}`` (b0..b7, v2_s/m/l; torchvision has no Lite)."""
    tv = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    src = randomize_bn(getattr(tv.models, f"efficientnet_{name}")(), gen)
    sd = src.state_dict()
    feats, cls = _ours(name, sd)
    x = torch.randn(2, 3, 65, 97, generator=gen)
    with torch.no_grad():
        ref_logits, ref_levels = _torchvision_levels(src, x)
        _compare(feats(x), ref_levels, cls(x), ref_logits, record_property)


def test_tf_weights_without_tf_compat_differ():
    """The comparison is sensitive: TF-ported weights with PyTorch padding and eps give other numbers."""
    timm = pytest.importorskip("timm")
    gen = torch.Generator().manual_seed(0)
    src = randomize_bn(timm.create_model("tf_efficientnet_b0"), gen)
    x = torch.randn(1, 3, 65, 97, generator=gen)
    wrong = create_model("b0", features_only=False, weights=src.state_dict()).eval()
    with torch.no_grad():
        assert (wrong(x) - src(x)).abs().max().item() > 100 * TOL
