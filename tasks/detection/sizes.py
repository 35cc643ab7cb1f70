"""Training an EfficientDet at image sizes other than the one it was built for (progressive learning).

Two parts of effdet depend on the build size (``config.image_size``):

* the BiFPN's upsampling is ``Interpolate2d(size=<feature size at the build size>)``, so a smaller or larger
  input cannot be added to its neighbour level; :func:`make_size_flexible` turns each into the equivalent scale
  factor (exactly 2 per level for multiples of 128: nearest-neighbour with ``scale_factor=2`` picks the same
  pixels as ``size=2x``, so outputs at the build size do not change). Downsampling is a stride-2 pool and has
  no size in it.
* ``DetBenchTrain``'s anchors (and the labeler built on them) are generated once for the build size; the class
  and box outputs at another size have a different number of anchor positions. :func:`loss_at_size` labels the
  targets with anchors generated for the input's size (cached per size and anchor settings) and computes the
  same focal and box losses ``DetBenchTrain`` does in training mode.

Evaluation and prediction stay at the build size with the bench's own anchors.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tasks.detection.anchors import MATCH_IOU


def make_size_flexible(model: nn.Module) -> int:
    """Replace the fixed output sizes of an EfficientDet's resampling by scale factors; returns how many.

    Idempotent. Raises ``ValueError`` for a ratio that is not a power of two (a build size that is not a
    multiple of 128), which a scale factor could not reproduce at every size.
    """
    from effdet.efficientdet import ResampleFeatureMap

    changed = 0
    for module in model.modules():
        if not isinstance(module, ResampleFeatureMap):
            continue
        for name in ("upsample", "downsample"):
            op = getattr(module, name, None)
            if op is None or getattr(op, "size", None) is None:
                continue
            (h_in, w_in), (h_out, w_out) = module.input_size, module.output_size
            factors = (h_out / h_in, w_out / w_in)
            if any(f not in (0.25, 0.5, 2.0, 4.0) for f in factors):
                raise ValueError(f"EfficientDet resampling {tuple(module.input_size)} -> {tuple(module.output_size)} "
                                 "is not a power of two: build the model at a multiple of 128")  # fmt: skip
            op.size, op.scale_factor = None, factors
            changed += 1
    return changed


def labeler_at(bench: nn.Module, size: int, cache: dict[Any, Any]) -> Any:  # noqa: ANN401 - effdet's labeler
    """The ``AnchorLabeler`` of effdet on anchors generated for ``size`` x ``size`` inputs (cached in ``cache``).

    The anchor settings (``anchor_scale``, ``aspect_ratios``, ``num_scales``, fitted or not) are read from the
    bench's config now, so anchors fitted later give new entries.
    """
    from effdet.anchors import AnchorLabeler, Anchors

    config = bench.model.config
    device = bench.anchors.boxes.device
    key = (size, str(config.anchor_scale), str(config.aspect_ratios), int(config.num_scales), str(device))
    if key not in cache:
        anchors = Anchors(config.min_level, config.max_level, config.num_scales, config.aspect_ratios,
                          config.anchor_scale, (size, size)).to(device)  # fmt: skip
        cache[key] = AnchorLabeler(anchors, bench.num_classes, match_threshold=MATCH_IOU)
    return cache[key]


def loss_at_size(
    bench: nn.Module, images: Tensor, target: dict[str, Tensor], cache: dict[Any, Any]
) -> dict[str, Tensor]:
    """``DetBenchTrain``'s training losses for square ``images`` of any multiple of 128.

    Args:
        bench: The training bench (``DetBenchTrain``); its model is made size-flexible on first use.
        images: ``N x 3 x S x S``.
        target: effdet targets (``bbox`` yxyx in input pixels, ``cls`` 1-based).
        cache: Labelers by size (:func:`labeler_at`).

    Returns:
        ``{"loss", "class_loss", "box_loss"}``.
    """
    h, w = images.shape[-2:]
    if h != w or h % 128:
        raise ValueError(f"EfficientDet trains on square inputs with sides a multiple of 128, got {h}x{w}")
    make_size_flexible(bench.model)
    class_out, box_out = bench.model(images)
    labeler = labeler_at(bench, int(h), cache)
    cls_targets, box_targets, num_positives = labeler.batch_label_anchors(target["bbox"], target["cls"])
    loss, class_loss, box_loss = bench.loss_fn(class_out, box_out, cls_targets, box_targets, num_positives)
    return {"loss": loss, "class_loss": class_loss, "box_loss": box_loss}


__all__ = ["labeler_at", "loss_at_size", "make_size_flexible"]
