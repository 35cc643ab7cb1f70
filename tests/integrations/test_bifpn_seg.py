"""EfficientDet's segmentation variant: effdet's BiFPN on our encoder (levels, scaling, sizes, export)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("effdet")
pytest.importorskip("segmentation_models_pytorch")

from effbackbone.integrations.bifpn_seg import (  # noqa: E402
    BiFpnSegmentation,
    bifpn_segmentation,
    efficientdet_for_encoder,
)
from effbackbone.integrations.effdet import create_efficientdet, efficientdet_config  # noqa: E402
from effbackbone.integrations.smp import register_custom  # noqa: E402

TINY = {"fpn_channels": 16, "fpn_repeats": 1, "head_repeats": 1}


@pytest.mark.parametrize(
    ("variant", "kwargs", "size"),
    [
        ("b0", {"min_level": 2}, (128, 256)),
        ("b0", {"min_level": 3}, (256, 128)),
        ("lite0", {"max_level": 6}, (64, 192)),  # 2**6: 64-pixel multiples
        ("b1", {"max_level": 5}, (96, 32)),  # P2..P5 only: any multiple of the encoder's 32
        ("v2_s", {"efficientdet": "d0"}, (128, 128)),
    ],
)
def test_levels_and_output_shapes(variant, kwargs, size):
    model = bifpn_segmentation(variant, classes=3, **{**TINY, "fpn_repeats": 2, **kwargs}).eval()
    seen = []
    model.decoder.fpn.cell[0].register_forward_hook(lambda _m, _i, out: seen.append([p.shape for p in out]))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (2, 3, *size)
        lo, hi = model.effdet_config.min_level, model.effdet_config.max_level
        assert model.decoder(model.encoder(x)).shape == (2, 16, size[0] // 2**lo, size[1] // 2**lo)
    # Every level of the first BiFPN layer: P_min..P_max at strides 2**level, fpn_channels wide.
    assert seen[0] == [(2, 16, size[0] // 2**level, size[1] // 2**level) for level in range(lo, hi + 1)]


def test_bifpn_inputs_come_from_the_encoder_feature_specs():
    model = bifpn_segmentation("b2", **TINY)
    specs = {s.name: s for s in model.encoder.model.feature_specs}
    # The top-down P2 node (the 5th node: P6, P5, P4, P3, P2) reads C2 through a 1x1 conv of C2's channels.
    p2_node = model.decoder.fpn.cell[0].fnode[4].combine.resample["0"]
    assert p2_node.conv.conv.in_channels == specs["C2"].channels
    assert model.decoder.fpn.resample["4"].conv.conv.in_channels == specs["C5"].channels  # P6 pooled from C5


def test_bifpn_is_effdets_own():
    # On P3-P7 the decoder is EfficientDet-D0's BiFPN, the same parameters under the same names, less the
    # last layer's bottom-up path (nodes 4-7 of cell 2), whose outputs P4'..P7' the P3 head never reads.
    with torch.device("meta"):
        ours = {k: v.shape for k, v in bifpn_segmentation("b0", min_level=3).decoder.fpn.state_dict().items()}
        theirs = {k: v.shape for k, v in create_efficientdet("d0").fpn.state_dict().items()}
    assert ours.items() <= theirs.items()
    assert {k.split(".")[3] for k in theirs.keys() - ours.keys() if k.startswith("cell.2.")} == {"4", "5", "6", "7"}
    assert all(k.startswith("cell.2.fnode.") for k in theirs.keys() - ours.keys())


@pytest.mark.parametrize(("variant", "det"), [("b0", "d0"), ("b3", "d3"), ("b7", "d7x"), ("lite2", "lite2")])
def test_width_and_depth_follow_efficientdet_scaling(variant, det):
    with torch.device("meta"):
        model = bifpn_segmentation(variant)
    reference = efficientdet_config(det)
    assert model.effdet_config.fpn_channels == reference.fpn_channels
    assert len(model.decoder.fpn.cell) == reference.fpn_cell_repeats
    head_convs = [m for m in model.segmentation_head if type(m).__name__ == "SeparableConv2d"]
    assert len(head_convs) == reference.box_class_repeats
    assert model.effdet_config.act_type == reference.act_type  # swish for D*, relu6 for Lite


def test_overrides():
    with torch.device("meta"):
        model = bifpn_segmentation("b3", fpn_channels=40, fpn_repeats=2, head_channels=24, head_repeats=2)
    assert len(model.decoder.fpn.cell) == 2
    convs = [m for m in model.segmentation_head if type(m).__name__ == "SeparableConv2d"]
    assert [c.conv_pw.out_channels for c in convs] == [24, 24] and convs[0].conv_dw.in_channels == 40
    with pytest.raises(TypeError, match="unknown EfficientDet config field 'decoder_channels'"):
        bifpn_segmentation("b0", decoder_channels=[16])
    with pytest.raises(ValueError, match="min_level=2, max_level=4"):
        bifpn_segmentation("b0", max_level=4)


def test_encoders_without_an_efficientdet_name_the_fix():
    with pytest.raises(ValueError, match="has no EfficientDet counterpart.*efficientdet='d3'"):
        efficientdet_for_encoder("effbackbone-v2-s")
    name = register_custom("effbackbone-test-phi1.5", "b0", phi=1.5)
    with pytest.raises(ValueError, match=r"compound-scaled \(phi\).*fpn_channels"):
        BiFpnSegmentation(name)
    with torch.device("meta"):  # width and depth given: no table needed
        assert BiFpnSegmentation(name, fpn_channels=32, fpn_repeats=2).effdet_config.fpn_channels == 32


def test_sizes_that_are_not_a_multiple_raise_with_the_padded_size():
    model = bifpn_segmentation("b0", **TINY).eval()
    with pytest.raises(RuntimeError, match=r"input 200x130 is not a multiple of 128.*pad it to 256x256"):
        model(torch.randn(1, 3, 200, 130))


def test_in_channels_and_frozen_encoder():
    model = bifpn_segmentation("b0", in_channels=1, classes=1, **TINY)
    model.freeze_encoder()
    model.train()
    out = model(torch.randn(2, 1, 128, 128))
    out.mean().backward()
    assert out.shape == (2, 1, 128, 128)
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter, as tasks/ uses
def test_onnx_export_is_dynamic_in_height_and_width(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = bifpn_segmentation("b0", classes=2, **TINY).eval()
    path = tmp_path / "bifpn.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        model, (torch.randn(1, 3, 128, 128),), str(path), dynamo=False, input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, opset_version=17,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 128, 128), (2, 3, 256, 128)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["logits"], {"image": x.numpy()})[0]
        assert got.shape == expected.shape and abs(got - expected).max() < 1e-4
