"""torchvision detection adapter: our encoder + ``FeaturePyramidNetwork`` as a detector backbone.

:func:`efficientnet_fpn_backbone` returns what torchvision's detectors expect of a backbone: an
``nn.Module`` with an integer ``out_channels`` whose ``forward`` returns an ``OrderedDict`` of
maps keyed ``"0"``, ``"1"``, ... (shallowest first) plus the extra levels (``"pool"`` for
``LastLevelMaxPool``, ``"p6"``, ``"p7"`` for ``LastLevelP6P7``) -- the same keys as torchvision's
``resnet_fpn_backbone``, so default anchor generators and RoI poolers apply when the level count
matches. :func:`retinanet_effbackbone`, :func:`fasterrcnn_effbackbone`, :func:`fcos_effbackbone` and
:func:`maskrcnn_effbackbone` build the four detectors with the level layout of their papers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from effbackbone.factory import create_model
from effbackbone.model import EfficientNet

Weights = str | os.PathLike[str] | Mapping[str, Tensor] | None
Extra = Literal["maxpool", "p6p7", "p6p7_c5", "none"]


class EfficientNetFPN(nn.Module):
    """Our encoder's levels through a torchvision FPN (the ``BackboneWithFPN`` contract).

    Attributes:
        body: The ``features_only`` :class:`~effbackbone.model.EfficientNet`.
        fpn: ``torchvision.ops.FeaturePyramidNetwork`` over the body's levels.
        out_channels: Channels of every output map (torchvision detectors read this).
    """

    def __init__(
        self, body: EfficientNet, out_channels: int = 256, extra_blocks: ExtraFPNBlock | Extra | None = None
    ) -> None:
        super().__init__()
        if not body.features_only:
            raise ValueError("EfficientNetFPN needs a features_only encoder (create_model(..., features_only=True))")
        self.body = body
        extra_blocks = _extra_block(extra_blocks, body.feature_channels[-1], out_channels)
        self.fpn = FeaturePyramidNetwork(body.feature_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """FPN maps ``{"0": P_first, ..., extra levels}``, all with :attr:`out_channels` channels."""
        levels = self.body.forward_pyramid(x)
        return self.fpn(OrderedDict((str(i), v) for i, v in enumerate(levels.values())))


def efficientnet_fpn_backbone(
    name: str = "b0",
    out_indices: Sequence[int] = (2, 3, 4),
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | Extra | None = None,
    weights: Weights = None,
    trainable_levels: int = 5,
    norm_eval: bool = False,
    **options: Any,
) -> EfficientNetFPN:
    """An EfficientNet + FPN backbone for torchvision detectors.

    Args:
        name: Encoder variant (``b0``..``b7``, ``lite0``..``lite4``, ``v2_s|m|l``).
        out_indices: Encoder levels fed to the FPN, 0..4 = C1..C5 (strides 2..32).
        out_channels: FPN width.
        extra_blocks: Levels added above the last one: ``"maxpool"`` (``LastLevelMaxPool``, key
            ``"pool"``; the default, as torchvision's), ``"p6p7"`` (P6, P7 by stride-2 convs from the
            last FPN map, FCOS), ``"p6p7_c5"`` (from the last encoder level, RetinaNet), ``"none"``,
            or any torchvision ``ExtraFPNBlock``.
        weights: Encoder weights (local file or state dict, timm or torchvision layout).
        trainable_levels: How many levels, counted from C5 down, stay trainable (torchvision's
            ``trainable_layers``): 5 trains everything, 0 freezes the whole encoder.
        norm_eval: Keep the encoder's BatchNorm statistics frozen while training (small batches).
        **options: Other :func:`effbackbone.create_model` options (``tf_compat``, ``output_stride``, ...).
    """
    if not 0 <= trainable_levels <= 5:
        raise ValueError(f"trainable_levels must be in [0, 5], got {trainable_levels}")
    body = create_model(name, weights=weights, features_only=True, out_indices=out_indices, **options)
    if trainable_levels < 5 or norm_eval:
        body.freeze(5 - trainable_levels, norm_eval=norm_eval)
    return EfficientNetFPN(body, out_channels, extra_blocks)


def retinanet_effbackbone(
    name: str = "b0", num_classes: int = 91, *, weights: Weights = None, out_channels: int = 256,
    trainable_levels: int = 5, backbone_options: Mapping[str, Any] | None = None, **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on P3-P7, P6/P7 from C5 as in the RetinaNet paper; ``kwargs`` go to ``RetinaNet``."""
    backbone = efficientnet_fpn_backbone(name, (2, 3, 4), out_channels, "p6p7_c5", weights, trainable_levels,
                                         **(backbone_options or {}))
    return RetinaNet(backbone, num_classes, **kwargs)


def fcos_effbackbone(
    name: str = "b0", num_classes: int = 91, *, weights: Weights = None, out_channels: int = 256,
    trainable_levels: int = 5, backbone_options: Mapping[str, Any] | None = None, **kwargs: Any,
) -> FCOS:
    """FCOS on P3-P7, P6/P7 from P5 as in the FCOS paper; ``kwargs`` go to ``FCOS``."""
    backbone = efficientnet_fpn_backbone(name, (2, 3, 4), out_channels, "p6p7", weights, trainable_levels,
                                         **(backbone_options or {}))
    return FCOS(backbone, num_classes, **kwargs)


def fasterrcnn_effbackbone(
    name: str = "b0", num_classes: int = 91, *, weights: Weights = None, out_channels: int = 256,
    trainable_levels: int = 5, backbone_options: Mapping[str, Any] | None = None, **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN on P2-P6 (C2-C5 + max-pool), torchvision's FPN layout; ``kwargs`` go to ``FasterRCNN``."""
    backbone = efficientnet_fpn_backbone(name, (1, 2, 3, 4), out_channels, "maxpool", weights, trainable_levels,
                                         **(backbone_options or {}))
    return FasterRCNN(backbone, num_classes, **kwargs)


def maskrcnn_effbackbone(
    name: str = "b0", num_classes: int = 91, *, weights: Weights = None, out_channels: int = 256,
    trainable_levels: int = 5, box_head_width: int = 1024, mask_head_width: int = 256,
    backbone_options: Mapping[str, Any] | None = None, **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on P2-P6, the FPN layout of :func:`fasterrcnn_effbackbone`; ``kwargs`` go to ``MaskRCNN``.

    ``num_classes`` counts the background, as torchvision's. The box head is two fully connected layers of
    ``box_head_width`` on 7x7 RoIs, the mask head four 3x3 convolutions and a 2x deconvolution of
    ``mask_head_width`` on 14x14 RoIs: the Mask R-CNN paper's FPN head (He et al., ICCV 2017, Fig. 4) at 1024
    and 256, torchvision's defaults. Narrower heads suit small data and CPU runs. Parts given in ``kwargs``
    (``box_head``, ``box_predictor``, ``mask_head``, ``mask_predictor``) replace the ones built here (a
    head of another width needs its predictor too).
    """
    backbone = efficientnet_fpn_backbone(name, (1, 2, 3, 4), out_channels, "maxpool", weights, trainable_levels,
                                         **(backbone_options or {}))
    # Each part not given is built here, so the predictors carry num_classes (torchvision refuses both).
    kwargs.setdefault("box_head", TwoMLPHead(out_channels * 7 * 7, box_head_width))  # the box RoI pool is 7x7
    kwargs.setdefault("box_predictor", FastRCNNPredictor(box_head_width, num_classes))
    kwargs.setdefault("mask_head", MaskRCNNHeads(out_channels, (mask_head_width,) * 4, 1))
    kwargs.setdefault("mask_predictor", MaskRCNNPredictor(mask_head_width, mask_head_width, num_classes))
    return MaskRCNN(backbone, None, **kwargs)


def _extra_block(extra: ExtraFPNBlock | Extra | None, last_channels: int, out_channels: int) -> ExtraFPNBlock | None:
    if extra is None or extra == "maxpool":
        return LastLevelMaxPool()
    if extra == "none":
        return None
    if extra in ("p6p7", "p6p7_c5"):
        block = LastLevelP6P7(out_channels if extra == "p6p7" else last_channels, out_channels)
        # torchvision picks P5 vs C5 by comparing widths; say which one explicitly.
        block.use_P5 = extra == "p6p7"
        return block
    if isinstance(extra, ExtraFPNBlock):
        return extra
    raise ValueError(f"extra_blocks must be 'maxpool', 'p6p7', 'p6p7_c5', 'none' or an ExtraFPNBlock, got {extra!r}")


__all__ = [
    "EfficientNetFPN",
    "efficientnet_fpn_backbone",
    "fasterrcnn_effbackbone",
    "fcos_effbackbone",
    "maskrcnn_effbackbone",
    "retinanet_effbackbone",
]
