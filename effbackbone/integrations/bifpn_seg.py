"""EfficientDet's semantic-segmentation variant: effdet's BiFPN on our encoder, fused down to P2, a light head.

Tan et al., *EfficientDet* (CVPR 2020), Sec. 6 ("EfficientDet for semantic segmentation"): keep the feature
levels P2..P7 in the BiFPN and use only P2 for the per-pixel classification; BiFPN width and depth follow the
detector's compound scaling. :class:`BiFpnSegmentation` builds exactly that from effdet's own modules
(``effdet.efficientdet.BiFpn`` on the ``tf_efficientdet_<name>`` config) on the effbackbone encoder smp already
uses (:class:`~effbackbone.integrations.smp.EffBackboneEncoder`, so weights, ``in_channels``, ``phi`` and encoder
options work as for every smp decoder), then a head of separable convs on the finest level, a 1x1 classifier and
bilinear upsampling to the input size. It is an smp ``SegmentationModel``: ``freeze_encoder``, ``predict`` and the
input-shape check behave as in smp's own models.

The BiFPN's inputs are the encoder levels C``min_level``..C5 read from its :attr:`feature_specs` (channels and
strides, never hard-coded); the levels above C5 (P6, P7) are max-pooled from C5 by effdet. Inputs must be a multiple
of ``2**max_level`` (128 by default): each BiFPN upsampling doubles the size, which only lands on the finer level
when every level is exactly half of the one below. ``SegmentationTask`` pads to that multiple by itself.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from effdet.config import set_config_readonly, set_config_writeable
from effdet.efficientdet import BiFpn, Interpolate2d, ResampleFeatureMap, SeparableConv2d, _init_weight
from omegaconf import DictConfig
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from segmentation_models_pytorch.encoders import get_encoder
from timm.layers import get_act_layer
from torch import Tensor, nn

from effbackbone.integrations.effdet import efficientdet_config
from effbackbone.integrations.smp import EffBackboneEncoder, smp_name

# The EfficientDet whose BiFPN scaling goes with each encoder variant (effdet's tf_efficientdet_* configs:
# D0-D6 on B0-B6; D7x is the one on B7, D7 keeps B6). V2 has no EfficientDet: name one with ``efficientdet=``.
EFFICIENTDET_OF_VARIANT = {
    **{f"b{k}": f"d{k}" for k in range(7)}, "b7": "d7x", **{f"lite{k}": f"lite{k}" for k in range(5)},
}  # fmt: skip
_SCALING_OPTIONS = ("phi", "alpha", "beta", "gamma")


def efficientdet_for_encoder(encoder_name: str) -> str:
    """The EfficientDet config (``"d3"``, ``"lite2"``) whose BiFPN scaling fits an smp effbackbone encoder name.

    Raises:
        ValueError: For encoders without one (V2, compound-scaled ``phi`` encoders), naming the fix.
    """
    entry = smp_encoders.get(encoder_name)
    params = entry["params"] if entry is not None and entry["encoder"] is EffBackboneEncoder else {}
    variant = params.get("variant")
    scaled = sorted(k for k in _SCALING_OPTIONS if k in params)
    if variant in EFFICIENTDET_OF_VARIANT and not scaled:
        return EFFICIENTDET_OF_VARIANT[variant]
    why = f"is compound-scaled ({', '.join(scaled)})" if scaled else "has no EfficientDet counterpart"
    raise ValueError(
        f"encoder {encoder_name!r} {why}, so the BiFPN width and depth cannot be read from EfficientDet's table; "
        "pass efficientdet='d3' (any of d0-d7x, lite0-lite4) or fpn_channels=..., fpn_repeats=... "
        "(decoder_options in SegmentationTask)"
    )


def _scale_resampling(fpn: nn.Module) -> None:
    """Make effdet's fixed-size resampling size-free, so the BiFPN runs at any multiple of ``2**max_level``.

    effdet builds each ``Interpolate2d`` with the output size of its config's ``image_size`` (detection inputs are
    fixed); the ratio between two levels is what the graph means, so it is kept as a scale factor instead.
    """
    for module in fpn.modules():
        if not isinstance(module, ResampleFeatureMap):
            continue
        (h_in, w_in), (h_out, w_out) = module.input_size, module.output_size
        for child in module.children():
            if isinstance(child, Interpolate2d) and child.size is not None:
                child.size = None
                child.scale_factor = (float(h_out) / h_in, float(w_out) / w_in)


def _drop_unused_nodes(fpn: nn.Module, num_levels: int, finest: tuple[int, int]) -> None:
    """Keep the last BiFPN layer's nodes only up to its P_min output: the ones after it feed no output.

    Only P_min is classified (the paper's segmentation variant), so the last layer's bottom-up path (P_min+1..P_max
    outputs) would cost compute and hold parameters that never get a gradient (which DDP rejects by default).
    effdet's layer appends each node to its input list and returns the last ``num_levels`` entries, whose first is
    the P_min output: with the later nodes gone, it is the last entry.
    """
    last = fpn.cell[-1]
    out_node = len(last.fnode) - num_levels
    sizes = {tuple(r.output_size) for r in last.fnode[max(out_node, 0)].combine.resample.values()}
    if out_node < 0 or sizes != {tuple(finest)}:
        raise ValueError(f"unexpected FPN layout: node {out_node} of the last layer is not the P_min output")
    last.fnode = nn.ModuleList(list(last.fnode)[: out_node + 1])


class BiFpnDecoder(nn.Module):
    """effdet's ``BiFpn`` over the encoder levels C``min_level``..C5 (+ pooled P6..P``max_level``); returns P_min.

    Args:
        config: An effdet model config (``fpn_channels``, ``fpn_cell_repeats``, ``min_level``, ``max_level``,
            ``fpn_name``, ``act_type``, ``pad_type``, ``norm_kwargs``, ...).
        encoder: The encoder whose :attr:`feature_specs` give the input channels and strides.
    """

    def __init__(self, config: DictConfig, encoder: EffBackboneEncoder) -> None:
        super().__init__()
        specs = encoder.model.feature_specs
        self.start = int(config.min_level)  # index into smp's [input, C1, .., C5]
        levels = [s for s in specs if s.index >= self.start - 1]  # C{min_level}..C5
        feature_info = [{"num_chs": s.channels, "reduction": s.stride} for s in levels]
        self.fpn = BiFpn(config, feature_info)
        _scale_resampling(self.fpn)
        finest = 2 ** (int(config.max_level) - self.start)  # P_min's size at config.image_size (2**max_level)
        _drop_unused_nodes(self.fpn, int(config.num_levels), (finest, finest))

    def forward(self, features: list[Tensor]) -> Tensor:
        """The finest fused level (stride ``2**min_level``) from smp's ``[input, C1, .., C5]``."""
        return self.fpn(list(features[self.start :]))[-1]  # see _drop_unused_nodes


class BiFpnSegmentationHead(nn.Sequential):
    """``repeats`` separable conv + BN + activation blocks, a 1x1 classifier, bilinear upsampling by ``scale``."""

    def __init__(
        self, in_channels: int, channels: int, repeats: int, classes: int, scale: int, config: DictConfig
    ) -> None:
        act_layer = get_act_layer(config.act_type)
        norm_kwargs = dict(config.norm_kwargs or {})
        layers: list[nn.Module] = []
        for i in range(repeats):
            layers.append(
                SeparableConv2d(
                    in_channels if i == 0 else channels, channels, padding=config.pad_type, bias=False,
                    norm_layer=partial(nn.BatchNorm2d, **norm_kwargs), act_layer=act_layer,
                )
            )  # fmt: skip
        last = channels if repeats else in_channels
        layers.append(nn.Conv2d(last, classes, kernel_size=1))
        # Bilinear from stride 2**min_level to the input, as smp's FPN head does from stride 4.
        layers.append(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False))
        super().__init__(*layers)


class BiFpnSegmentation(SegmentationModel):
    """EfficientDet's segmentation variant (BiFPN on P2..P7, head on P2) on an effbackbone encoder.

    Args:
        encoder_name: An smp effbackbone encoder (``"effbackbone-b0"``, or a :func:`register_custom` name).
        encoder_weights: As smp's ``encoder_weights`` (``None``, ``"imagenet"``, a source name or a file).
        in_channels: Image channels.
        classes: Output channels (1 for binary).
        efficientdet: The EfficientDet config whose BiFPN scaling to take (``d0``..``d7x``, ``lite0``..``lite4``);
            default: the one that goes with the encoder variant (B3 -> D3, Lite2 -> Lite2).
        fpn_channels: BiFPN width (default: the config's, e.g. 64 for D0, 160 for D3).
        fpn_repeats: BiFPN depth, the number of BiFPN layers (default: the config's, 3 for D0, 6 for D3).
        head_channels: Width of the head's separable convs (default: ``fpn_channels``).
        head_repeats: Separable convs in the head (default: the config's class/box head depth, 3 for D0-D2).
        min_level: Finest BiFPN level: 2 (the paper's segmentation variant, P2 at stride 4) or 3 (the detector's
            levels, coarser and cheaper).
        max_level: Coarsest BiFPN level (7: P6 and P7 pooled from C5); inputs must be a multiple of
            ``2**max_level``.
        **config: Any other effdet config field (``fpn_name``, ``act_type``, ``separable_conv``, ``pad_type``, ...).
    """

    def __init__(
        self,
        encoder_name: str = "effbackbone-b0",
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        efficientdet: str | None = None,
        fpn_channels: int | None = None,
        fpn_repeats: int | None = None,
        head_channels: int | None = None,
        head_repeats: int | None = None,
        min_level: int = 2,
        max_level: int = 7,
        **config: Any,
    ) -> None:
        super().__init__()
        if not 1 <= min_level <= 5 or not max(min_level + 1, 5) <= max_level <= 8:
            raise ValueError(
                f"min_level={min_level}, max_level={max_level}: use 1 <= min_level <= 5 and "
                f"max(min_level + 1, 5) <= max_level <= 8 (the paper: min_level=2, max_level=7)"
            )
        if efficientdet is None:
            try:
                efficientdet = efficientdet_for_encoder(encoder_name)
            except ValueError:
                if None in (fpn_channels, fpn_repeats):
                    raise
                efficientdet = "d0"  # width and depth given: D0's head depth and BiFPN kind (fast attention)
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=encoder_weights)
        self.effdet_config = bifpn_config(
            efficientdet, self.encoder, fpn_channels=fpn_channels, fpn_repeats=fpn_repeats,
            min_level=min_level, max_level=max_level, **config,
        )  # fmt: skip
        self.decoder = BiFpnDecoder(self.effdet_config, self.encoder)
        fpn = int(self.effdet_config.fpn_channels)
        # The head depth of EfficientDet's compound scaling (its class/box nets: 3 + floor(phi / 3)).
        repeats = int(self.effdet_config.box_class_repeats if head_repeats is None else head_repeats)
        self.segmentation_head = BiFpnSegmentationHead(
            fpn, head_channels or fpn, repeats, classes, 2**min_level, self.effdet_config
        )
        self.classification_head = None
        self.size_divisibility = 2**max_level
        self.name = f"bifpn-{encoder_name}"
        self.initialize()

    def initialize(self) -> None:
        """EfficientDet's own init for the BiFPN and head convs (effdet ``_init_weight``), smp's for the classifier."""
        for module in (self.decoder, self.segmentation_head):
            for name, m in module.named_modules():
                _init_weight(m, name)
        smp_init.initialize_head(self.segmentation_head[-2])

    def check_input_shape(self, x: Tensor) -> None:
        """Raise for inputs that are not a multiple of :attr:`size_divisibility`, naming the padded size."""
        h, w = x.shape[-2:]
        d = self.size_divisibility
        if h % d or w % d:
            raise RuntimeError(
                f"BiFpnSegmentation: input {h}x{w} is not a multiple of {d} (2**max_level, every BiFPN level must be "
                f"half the one below); pad it to {-(-h // d) * d}x{-(-w // d) * d}, or build with a smaller "
                f"max_level (SegmentationTask pads by itself)"
            )


def bifpn_config(
    efficientdet: str, encoder: EffBackboneEncoder, *, fpn_channels: int | None, fpn_repeats: int | None,
    min_level: int, max_level: int, **overrides: Any,
) -> DictConfig:  # fmt: skip
    """The effdet ``tf_efficientdet_<efficientdet>`` config set up for segmentation on ``encoder``.

    The BiFPN's padding follows the encoder's (TF "same" only for a TF-padded encoder) and its BatchNorm takes the
    encoder's eps and momentum: effdet's TF values (momentum 0.01) suit its 300-epoch COCO schedule, not the short
    fine-tuning runs the other smp decoders are trained with.
    """
    cfg = encoder.model.cfg
    config = efficientdet_config(efficientdet, tf_compat=cfg.padding == "same", **overrides)
    set_config_writeable(config)
    config.min_level, config.max_level, config.num_levels = min_level, max_level, max_level - min_level + 1
    config.fpn_channels = fpn_channels or config.fpn_channels
    config.fpn_cell_repeats = fpn_repeats or config.fpn_cell_repeats
    if "norm_kwargs" not in overrides:
        config.norm_kwargs = {"eps": cfg.bn_eps, "momentum": cfg.bn_momentum}
    # Only ratios between levels matter (see _scale_resampling); any multiple of 2**max_level gives them.
    config.image_size = (2**max_level, 2**max_level)
    set_config_readonly(config)
    return config


def bifpn_segmentation(
    variant: str = "b0", classes: int = 1, encoder_weights: str | None = None, **kwargs: Any
) -> BiFpnSegmentation:
    """:class:`BiFpnSegmentation` on ``effbackbone-<variant>`` (``"b0"``, ``"lite2"``, ``"v2_s"`` ...)."""
    return BiFpnSegmentation(smp_name(variant), encoder_weights=encoder_weights, classes=classes, **kwargs)


__all__ = [
    "EFFICIENTDET_OF_VARIANT", "BiFpnDecoder", "BiFpnSegmentation", "BiFpnSegmentationHead", "bifpn_config",
    "bifpn_segmentation", "efficientdet_for_encoder",
]  # fmt: skip
