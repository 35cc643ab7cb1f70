"""segmentation-models-pytorch plug-in: registration and the encoder contract."""

from __future__ import annotations

import importlib

import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")
plugin = importlib.import_module("effbackbone.integrations.smp")

EXPECTED = [f"effbackbone-b{i}" for i in range(8)] + [f"effbackbone-lite{i}" for i in range(5)] + [
    "effbackbone-v2-s", "effbackbone-v2-m", "effbackbone-v2-l",
]


def test_import_registers_every_variant_idempotently() -> None:
    before = set(smp.encoders.get_encoder_names())
    assert set(EXPECTED) <= before
    importlib.reload(plugin)
    assert plugin.register() == EXPECTED
    assert set(smp.encoders.get_encoder_names()) == before


def test_unet_b0_forward_shapes() -> None:
    model = smp.Unet("effbackbone-b0", encoder_weights=None, classes=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
