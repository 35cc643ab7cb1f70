"""torchvision detectors (RetinaNet, Faster R-CNN, FCOS, Mask R-CNN) on the EfficientNet + FPN backbone."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")

from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

import effbackbone  # noqa: E402
from effbackbone.integrations.torchvision import (  # noqa: E402
    EfficientNetFPN,
    efficientnet_fpn_backbone,
    fasterrcnn_effbackbone,
    fcos_effbackbone,
    maskrcnn_effbackbone,
    retinanet_effbackbone,
)

SIZE = 128
DETECTORS = {"retinanet": retinanet_effbackbone, "fasterrcnn": fasterrcnn_effbackbone, "fcos": fcos_effbackbone}


@pytest.mark.parametrize(
    ("extra", "out_indices", "keys", "strides"),
    [
        ("maxpool", (1, 2, 3, 4), ["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64]),
        ("p6p7", (2, 3, 4), ["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128]),
        ("p6p7_c5", (2, 3, 4), ["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128]),
        ("none", (2, 3, 4), ["0", "1", "2"], [8, 16, 32]),
    ],
)
def test_backbone_contract(extra, out_indices, keys, strides):
    backbone = efficientnet_fpn_backbone("b0", out_indices=out_indices, out_channels=64, extra_blocks=extra).eval()
    assert isinstance(backbone.out_channels, int) and backbone.out_channels == 64
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, SIZE, SIZE))
    assert list(out) == keys
    assert [SIZE // o.shape[-1] for o in out.values()] == strides
    assert all(o.shape[1] == 64 for o in out.values())


def test_p6_source():
    c5 = efficientnet_fpn_backbone("b0", extra_blocks="p6p7_c5", out_channels=64).fpn.extra_blocks
    p5 = efficientnet_fpn_backbone("b0", extra_blocks="p6p7", out_channels=64).fpn.extra_blocks
    assert isinstance(c5, LastLevelP6P7) and c5.p6.in_channels == 320 and not c5.use_P5
    assert p5.p6.in_channels == 64 and p5.use_P5


def test_weights_and_trainable_levels(tmp_path):
    src = effbackbone.create_model("b0")
    path = tmp_path / "b0.pth"
    torch.save(src.state_dict(), path)
    backbone = efficientnet_fpn_backbone("b0", weights=path, trainable_levels=2, norm_eval=True)
    torch.testing.assert_close(backbone.body.conv_stem.weight, src.conv_stem.weight)
    # trainable_levels counts from C5 down, like torchvision's trainable_layers.
    assert not backbone.body.conv_stem.weight.requires_grad
    assert not backbone.body.blocks[2][0].conv_pw.weight.requires_grad  # C3 (stage ending at stride 8)
    assert backbone.body.blocks[3][0].conv_pw.weight.requires_grad  # first stage of C4
    backbone.train()
    assert not backbone.body.bn1.training and backbone.fpn.training
    with pytest.raises(ValueError, match="trainable_levels"):
        efficientnet_fpn_backbone("b0", trainable_levels=6)
    with pytest.raises(ValueError, match="extra_blocks"):
        efficientnet_fpn_backbone("b0", extra_blocks="p8")
    with pytest.raises(ValueError, match="features_only"):
        EfficientNetFPN(effbackbone.create_model("b0", features_only=False))


def _targets() -> list[dict[str, torch.Tensor]]:
    # torchvision format: boxes_xyxy in pixels, int64 labels (0 = background for two-stage models).
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 50.0], [40.0, 30.0, 120.0, 110.0]]), "labels": torch.tensor([2, 3])},
    ]


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detector_train_and_eval_step(kind):
    model = DETECTORS[kind]("b0", num_classes=4, out_channels=64, min_size=SIZE, max_size=SIZE)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 96, SIZE)]
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = model(images, _targets())
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.conv_stem.weight.grad is not None
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad is not None
    opt.step()
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for det, img in zip(dets, images, strict=True):
        boxes = det["boxes"]
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(det["scores"]) == len(det["labels"]) == len(boxes)
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 2] <= img.shape[2]).all()


def test_maskrcnn_train_and_eval_step_with_narrow_heads():
    model = maskrcnn_effbackbone("b0", num_classes=4, out_channels=32, box_head_width=64, mask_head_width=16,
                                 min_size=SIZE, max_size=SIZE)  # fmt: skip
    heads = model.roi_heads
    assert heads.box_head.fc7.out_features == 64 and heads.mask_head[0][0].out_channels == 16
    assert heads.box_predictor.cls_score.out_features == 4 and heads.mask_predictor.mask_fcn_logits.out_channels == 4
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 96, SIZE)]
    targets = _targets()
    for target, image in zip(targets, images, strict=True):  # a mask per box: its box filled
        target["masks"] = torch.zeros(len(target["boxes"]), *image.shape[1:], dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(target["masks"], target["boxes"].int().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
    model.train()
    losses = model(images, targets)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.conv_stem.weight.grad is not None
    model.eval()
    with torch.no_grad():
        dets = model(images)
    for det, image in zip(dets, images, strict=True):
        assert det["masks"].shape == (len(det["boxes"]), 1, *image.shape[1:])


def test_maskrcnn_default_heads_are_torchvisions():
    ours = maskrcnn_effbackbone("b0", num_classes=5).roi_heads
    from torchvision.models.detection import MaskRCNN

    theirs = MaskRCNN(efficientnet_fpn_backbone("b0", (1, 2, 3, 4)), num_classes=5).roi_heads
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
