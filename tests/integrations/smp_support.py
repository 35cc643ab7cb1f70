"""Helpers for the smp plug-in tests: offline guard and random-weight checkpoints in timm/torchvision layout."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch import nn

# The ``x`` of smp's BaseEncoderTester / BaseModelTester samples: 64x64.
SIZE = 64


def block_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Fail any socket connection, and point every weight cache at an empty folder under ``tmp_path``.

    Returns the Hugging Face hub cache folder now in use.
    """

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(f"network access attempted during an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    from huggingface_hub import constants

    hub = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("EFFBACKBONE_WEIGHTS_DIR", raising=False)
    return hub


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters.

    Freshly built BNs (mean 0, var 1, weight 1, bias 0) are identities in eval mode, which would hide
    a wrong eps or statistics that failed to load.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def timm_checkpoint(folder: Path, name: str = "efficientnet_b0", filename: str | None = None) -> tuple[Path, nn.Module]:
    """A timm classifier with random weights saved as ``.safetensors``; returns (path, model)."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    model = randomize_norms(timm.create_model(name, pretrained=False))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (filename or f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def torchvision_checkpoint(folder: Path, name: str = "efficientnet_b0", filename: str | None = None) -> Path:
    """A torchvision classifier with random weights saved with ``torch.save`` (``.pth``)."""
    models = pytest.importorskip("torchvision.models")
    model = randomize_norms(getattr(models, name)(weights=None))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (filename or f"{name}.pth")
    torch.save(model.state_dict(), path)
    return path


def timm_features(
    model_name: str, state_dict_source: nn.Module, x: torch.Tensor, **kwargs: object
) -> list[torch.Tensor]:
    """timm's ``features_only`` outputs for ``model_name`` with the classifier ``state_dict_source``'s weights."""
    timm = pytest.importorskip("timm")
    feats = timm.create_model(model_name, pretrained=False, features_only=True, **kwargs)
    wanted = feats.state_dict()
    feats.load_state_dict({k: v for k, v in state_dict_source.state_dict().items() if k in wanted}, strict=True)
    with torch.no_grad():
        return list(feats.eval()(x))
