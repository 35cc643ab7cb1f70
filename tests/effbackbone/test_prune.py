"""Structured pruning of MBConv expansion channels: contract, exactness, export, checkpoints, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import effbackbone
from effbackbone.blocks import MBConv
from effbackbone.fuse import optimize_for_inference
from effbackbone.profile import count_params
from effbackbone.prune import (
    expandable_blocks,
    expansion_widths,
    load_pruned_state_dict,
    prune_expansion,
    resize_expansions,
)


def _model(name: str = "b0", **kwargs: object) -> nn.Module:
    """Random weights with BN statistics from one random batch (O(1) activations), eval mode."""
    model = effbackbone.create_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    return model.eval()


def test_pruned_encoder_keeps_feature_contract() -> None:
    model = _model()
    pruned = prune_expansion(model, 0.5)
    before, after = expansion_widths(model), expansion_widths(pruned)
    assert set(before) == set(after) and len(after) == 15  # every B0 block but the MBConv1 one
    for name, width in after.items():
        assert width % 8 == 0 and abs(width - before[name] / 2) <= 4, name
    assert count_params(pruned) < 0.75 * count_params(model)
    out = pruned(torch.randn(2, 3, 96, 64))
    assert [s.name for s in pruned.feature_specs] == list(out)
    for spec in pruned.feature_specs:
        assert out[spec.name].shape == (2, spec.channels, 96 // spec.stride, 64 // spec.stride)
    assert pruned.feature_specs == model.feature_specs


def test_pruning_equals_masking_the_removed_channels() -> None:
    """The surgery is exact: the pruned block computes what the dense one does with those channels cut."""
    torch.manual_seed(0)
    model = _model(tf_compat=True)  # TF "same" padding and SE
    pruned = prune_expansion(model, 0.25, criterion="l2")
    masked = model
    with torch.no_grad():
        for name, block in expandable_blocks(masked).items():
            assert isinstance(block, MBConv)
            score = block.conv_pw.weight.flatten(1).pow(2).sum(1)
            width = expansion_widths(pruned)[name]
            removed = torch.ones_like(score, dtype=torch.bool)
            removed[score.topk(width).indices] = False
            # Cutting a channel = zeroing its inputs to the SE reduce conv and the projection.
            block.se.conv_reduce.weight[:, removed] = 0
            block.conv_pwl.weight[:, removed] = 0
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        ref, out = masked(x), pruned(x)
    for name in ref:  # float rounding only (another summation order), relative to the level's scale
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-5 * float(ref[name].abs().max()))


def test_bn_criterion_removes_constant_channels_exactly() -> None:
    """A channel whose BN has gamma = 0 outputs act(beta) everywhere: removing it and folding that
    constant into the projection's BN changes nothing (Lite0: no SE, ReLU6)."""
    model = _model("lite0")
    with torch.no_grad():
        for block in expandable_blocks(model).values():
            n = block.bn2.num_features
            constant = torch.randperm(n)[: n // 4]  # a quarter of the channels made constant, not zero
            block.bn2.weight[constant] = 0.0
            block.bn2.bias[constant] = torch.rand(len(constant)) * 6
    pruned = prune_expansion(model, 0.25, divisor=1)
    assert sum(expansion_widths(pruned).values()) < 0.8 * sum(expansion_widths(model).values())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-5 * float(ref[name].abs().max()))


def test_ratio_zero_changes_nothing_and_bad_arguments_fail() -> None:
    model = _model()
    same = prune_expansion(model, 0.0)
    assert expansion_widths(same) == expansion_widths(model)
    with pytest.raises(ValueError, match="ratio"):
        prune_expansion(model, 1.0)
    with pytest.raises(ValueError, match="criterion"):
        prune_expansion(model, 0.5, criterion="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prune before fusing BN"):
        prune_expansion(optimize_for_inference(model), 0.5)
    with pytest.raises(KeyError, match="not MBConv blocks"):
        resize_expansions(model, {"blocks.9.9": 8})


def test_pruned_model_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from effbackbone.export import export_onnx, verify_onnx

    pruned = prune_expansion(_model(tf_compat=True), 0.5)
    path = export_onnx(pruned, tmp_path / "pruned.onnx", input_size=(1, 3, 64, 64), dynamo=False)
    diffs = verify_onnx(path, pruned, [torch.randn(2, 3, 97, 65)])
    assert set(diffs) == {s.name for s in pruned.feature_specs}


def test_checkpoint_round_trip_with_prefix(tmp_path: Path) -> None:
    pruned = prune_expansion(_model(features_only=False, num_classes=10), 0.5)
    # As a Lightning checkpoint stores it: the model under a prefix.
    torch.save({f"model.{k}": v for k, v in pruned.state_dict().items()}, tmp_path / "pruned.pt")
    sd = torch.load(tmp_path / "pruned.pt", weights_only=True)
    fresh = effbackbone.create_model("b0", features_only=False, num_classes=10)
    inner = nn.Module()
    inner.model = fresh
    load_pruned_state_dict(inner, sd)
    assert expansion_widths(fresh) == expansion_widths(pruned)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x))


def test_pruned_model_trains() -> None:
    pruned = prune_expansion(_model(features_only=False, num_classes=4), 0.5).train()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)  # built after pruning: the new parameters
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in pruned.parameters()]
    loss = nn.functional.cross_entropy(pruned(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, pruned.parameters(), strict=True))


def test_prunes_the_encoder_inside_an_smp_unet() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    import effbackbone.integrations.smp  # noqa: F401

    unet = smp.Unet("effbackbone-b0", encoder_weights=None, classes=2).eval()
    pruned = prune_expansion(unet, 0.5)
    assert sum(expansion_widths(pruned).values()) < 0.6 * sum(expansion_widths(unet).values())
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_pruned_model_quantizes() -> None:
    pytest.importorskip("onnxruntime")
    from effbackbone.quantize import quantize_int8

    pruned = prune_expansion(_model(out_indices=(0, 1, 2)), 0.5)
    q = quantize_int8(pruned, [torch.randn(2, 3, 64, 64)])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = pruned(x)
    for name, value in q(x).items():
        assert torch.nn.functional.cosine_similarity(value.flatten(1), ref[name].flatten(1)).item() > 0.98
