"""EfficientDet on our encoder: same modules as effdet's tf_efficientdet_dN, checkpoints, benches."""

from __future__ import annotations

import pytest
import torch

effdet = pytest.importorskip("effdet")
timm = pytest.importorskip("timm")

import effbackbone  # noqa: E402
from effbackbone.integrations.effdet import (  # noqa: E402
    EFFICIENTDET_LITE_NAMES,
    EFFICIENTDET_NAMES,
    PAPER_PARAMS_M,
    create_efficientdet,
    efficientdet_config,
)
from effbackbone.weights import WeightsError  # noqa: E402

SIZE = 128  # smallest size at which P7 is 1x1; keeps the default tests fast


def _reference(name: str, size: int | None = SIZE) -> torch.nn.Module:
    kwargs = {"image_size": (size, size)} if size else {}
    return effdet.create_model(f"tf_efficientdet_{name}", pretrained=False, pretrained_backbone=False, **kwargs)


def _randomize_bn_stats(sd: dict[str, torch.Tensor]) -> None:
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", EFFICIENTDET_NAMES + EFFICIENTDET_LITE_NAMES)
def test_same_keys_shapes_and_params_as_effdet(name):
    # Built on the meta device: structure and parameter counts without allocating D7's weights.
    with torch.device("meta"):
        ours, ref = create_efficientdet(name), _reference(name, None)
    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr)
    assert all(so[k].shape == sr[k].shape for k in so)
    assert _n_params(ours) == _n_params(ref)
    assert type(ours.backbone).__module__.startswith("effbackbone")
    if name in PAPER_PARAMS_M:  # the paper rounds to 2 significant digits
        assert abs(_n_params(ours) / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", ["d1", "d2", "d3", "d4", "d5", "d6", "d7", "d7x"])
def test_effdet_weights_identical_outputs_large(name):
    _assert_identical_outputs(name)


def test_config_follows_compound_scaling():
    # Paper Table 1: 512 + 128 * phi up to D4; D5 and D6 both use 1280, D7 1536.
    sizes = [efficientdet_config(n).image_size[0] for n in EFFICIENTDET_NAMES[:8]]
    assert sizes[:5] == [512 + 128 * phi for phi in range(5)]
    assert sizes[5:] == [1280, 1280, 1536]
    assert efficientdet_config("d7").backbone_name == "effbackbone_b6"  # effdet's D7 keeps D6's B6
    assert efficientdet_config("d7x").backbone_name == "effbackbone_b7"
    # Paper Table 1: BiFPN width / depth and box-class head depth.
    table = [(efficientdet_config(n).fpn_channels, efficientdet_config(n).fpn_cell_repeats,
              efficientdet_config(n).box_class_repeats) for n in EFFICIENTDET_NAMES[:8]]
    assert table == [(64, 3, 3), (88, 4, 3), (112, 5, 3), (160, 6, 4), (224, 7, 4), (288, 7, 4), (384, 8, 5),
                     (384, 8, 5)]
    assert efficientdet_config("d0").backbone_args["tf_compat"] is True


def _assert_identical_outputs(name: str, tmp_path=None) -> None:
    ref = _reference(name).eval()
    sd = ref.state_dict()
    _randomize_bn_stats(sd)
    source = sd
    if tmp_path is not None:  # through a file, as a user would load effdet's release checkpoint
        source = tmp_path / f"tf_efficientdet_{name}.pth"
        torch.save(sd, source)
    ours = create_efficientdet(name, image_size=SIZE, pretrained_path=source).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        (co, bo), (cr, br) = ours(x), ref(x)
    for a, b in zip(co + bo, cr + br, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4


def test_effdet_checkpoint_gives_identical_outputs(tmp_path):
    _assert_identical_outputs("d0", tmp_path)


def test_effdet_lite_checkpoint_gives_identical_outputs():
    _assert_identical_outputs("lite0")


def test_backbone_override():
    model = create_efficientdet("d0", num_classes=3, image_size=SIZE, backbone="v2_s").eval()
    assert model.config.backbone_name == "effbackbone_v2_s"
    expected = effbackbone.create_model("v2_s", out_indices=(2, 3, 4)).feature_channels
    assert model.backbone.feature_info.channels() == expected
    with torch.no_grad():
        cls_out, box_out = model(torch.randn(1, 3, SIZE, SIZE))
    assert [c.shape[-1] for c in cls_out] == [16, 8, 4, 2, 1] and cls_out[0].shape[1] == 3 * 9
    with pytest.raises(ValueError, match="unknown backbone"):
        efficientdet_config("d0", backbone="b9")


def test_bench_checkpoint_and_head_reset(tmp_path):
    ref = _reference("d0")
    bench_sd = {f"model.{k}": v for k, v in ref.state_dict().items()}
    with pytest.warns(UserWarning, match="class head has 90 classes; re-initialised it for num_classes=3"):
        ours = create_efficientdet("d0", num_classes=3, image_size=SIZE, pretrained_path=bench_sd)
    assert ours.config.num_classes == 3
    assert ours.class_net.predict.conv_pw.out_channels == 3 * 9
    torch.testing.assert_close(ours.fpn.state_dict(), ref.fpn.state_dict())
    torch.testing.assert_close(ours.box_net.state_dict(), ref.box_net.state_dict())


def test_wrong_checkpoint_is_refused():
    sd = _reference("d1").state_dict()
    with pytest.raises(WeightsError, match="tf_efficientdet_d0"):
        create_efficientdet("d0", image_size=SIZE, pretrained_path=sd)


def test_backbone_weights_load(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.create_model("tf_efficientnet_b0", pretrained=False)
    path = tmp_path / "b0.pth"
    torch.save(src.state_dict(), path)
    model = create_efficientdet("d0", image_size=SIZE, backbone_weights=path)
    torch.testing.assert_close(model.backbone.conv_stem.weight, src.conv_stem.weight)
    torch.testing.assert_close(model.backbone.blocks[6][0].conv_pwl.weight, src.blocks[6][0].conv_pwl.weight)


def _targets(batch: int) -> dict[str, torch.Tensor]:
    # effdet format: bbox_yxyx in input pixels, cls 1-based, -1 padding rows.
    bbox = torch.tensor([[[10.0, 20.0, 60.0, 90.0], [-1, -1, -1, -1]], [[30.0, 30.0, 100.0, 120.0], [5, 5, 40, 40]]])
    cls = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    return {
        "bbox": bbox[:batch], "cls": cls[:batch],
        "img_scale": torch.ones(batch), "img_size": torch.tensor([[SIZE, SIZE]] * batch, dtype=torch.float),
    }


def test_train_bench_step():
    bench = create_efficientdet("d0", num_classes=3, bench_task="train", image_size=SIZE)
    bench.train()
    opt = torch.optim.SGD(bench.parameters(), lr=1e-3)
    out = bench(torch.randn(2, 3, SIZE, SIZE), _targets(2))
    assert set(out) == {"loss", "class_loss", "box_loss"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert bench.model.backbone.conv_stem.weight.grad is not None
    assert bench.model.class_net.predict.conv_pw.weight.grad is not None
    opt.step()
    bench.eval()
    with torch.no_grad():
        out = bench(torch.randn(2, 3, SIZE, SIZE), _targets(2))
    assert out["detections"].shape == (2, 100, 6)


def test_predict_bench():
    bench = create_efficientdet("d0", num_classes=5, bench_task="predict", image_size=SIZE, max_det_per_image=20).eval()
    with torch.no_grad():
        det = bench(torch.randn(1, 3, SIZE, SIZE))
    assert det.shape == (1, 20, 6)
    boxes, scores, classes = det[0, :, :4], det[0, :, 4], det[0, :, 5]
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert ((classes >= 1) & (classes <= 5)).all()  # effdet reports 1-based classes


def test_bad_arguments():
    with pytest.raises(ValueError, match="d8"):
        create_efficientdet("d8")
    with pytest.raises(ValueError, match="bench_task"):
        create_efficientdet("d0", bench_task="eval")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fpn_chanels"):
        efficientdet_config("d0", fpn_chanels=3)


def test_torchscript_matches_eager():
    # effdet scripts only with head_bn_level_first=True; our backbone must not be what breaks it.
    with timm.set_scriptable(True):
        model = create_efficientdet("d0", image_size=SIZE, head_bn_level_first=True).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        (cs, bs), (ce, be) = scripted(x), model(x)
    for a, b in zip(cs + bs, ce + be, strict=True):
        torch.testing.assert_close(a, b)
