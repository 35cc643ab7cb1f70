"""Anchors fitted to the training boxes (``anchors: auto``), and the share of boxes that anchors can match.

effdet's anchors (Tan et al. 2020, inherited from RetinaNet) sit on every level ``l`` of P3-P7 with side
``anchor_scale * 2**l * 2**(o / num_scales)`` for ``o < num_scales``, one per aspect ratio ``(x, y)``. effdet's
labeler makes an anchor positive for a box at IoU >= 0.5. A box whose best anchor stays under that threshold
gets only the one anchor forced onto it and trains poorly; on datasets of many small cells or thin objects
that can be most boxes. The usual EfficientDet practice is to fit the aspect ratios by k-means on the
training boxes as resized (github.com/mnslarcher/kmeans-anchors-ratios, used with zylo117's EfficientDet)
and pick the scale that covers the box sizes.

Here the aspect ratios are a 1-D k-means on ``log(w / h)`` (as many clusters as the model has ratios, so the
head keeps its shape), and ``anchor_scale`` is the value (on a fine log grid) that maximises the share of
boxes matched at the IoU threshold with those ratios. IoUs are exact for effdet's grid: the best anchor of a
shape is the one whose centre is nearest the box centre on each axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MATCH_IOU = 0.5  # effdet's AnchorLabeler match_threshold
LOW_SHARE = 0.8  # warn when fewer boxes than this can be matched


@dataclass(frozen=True)
class AnchorSpec:
    """effdet's anchor settings (the config fields of the same names)."""

    anchor_scale: float
    aspect_ratios: tuple[tuple[float, float], ...]
    num_scales: int

    def to_dict(self) -> dict[str, object]:
        """Plain types (checkpoint-safe)."""
        return {"anchor_scale": self.anchor_scale, "aspect_ratios": [list(a) for a in self.aspect_ratios],
                "num_scales": self.num_scales}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AnchorSpec:
        """Inverse of :meth:`to_dict`."""
        ratios = tuple((float(a[0]), float(a[1])) for a in d["aspect_ratios"])  # type: ignore[attr-defined]
        return cls(float(d["anchor_scale"]), ratios, int(d["num_scales"]))  # type: ignore[arg-type]


def _ratio_xy(aspect: float | Sequence[float]) -> tuple[float, float]:
    """The two aspect forms of effdet: a tuple ``(x, y)`` of side multipliers, or a number ``w/h`` of area 1."""
    if isinstance(aspect, (int, float)):
        return math.sqrt(aspect), 1 / math.sqrt(aspect)
    return float(aspect[0]), float(aspect[1])


def best_ious(
    boxes_xyxy: np.ndarray, spec: AnchorSpec, image_size: int, min_level: int = 3, max_level: int = 7
) -> np.ndarray:
    """The IoU of each box (model pixels) with its best anchor."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    best = np.zeros(len(b))
    for level in range(min_level, max_level + 1):
        stride = 2**level
        n = max(1, image_size // stride)
        # the nearest anchor centre on each axis (centres at stride/2 + k*stride, k < n)
        ax = (np.clip(np.floor(cx / stride), 0, n - 1) + 0.5) * stride
        ay = (np.clip(np.floor(cy / stride), 0, n - 1) + 0.5) * stride
        for octave in range(spec.num_scales):
            side = spec.anchor_scale * stride * 2 ** (octave / spec.num_scales)
            for aspect in spec.aspect_ratios:
                rx, ry = _ratio_xy(aspect)
                aw, ah = side * rx, side * ry
                iw = np.clip(np.minimum(cx + w / 2, ax + aw / 2) - np.maximum(cx - w / 2, ax - aw / 2), 0, None)
                ih = np.clip(np.minimum(cy + h / 2, ay + ah / 2) - np.maximum(cy - h / 2, ay - ah / 2), 0, None)
                inter = iw * ih
                best = np.maximum(best, inter / (w * h + aw * ah - inter))
    return best


def match_share(boxes_xyxy: np.ndarray, spec: AnchorSpec, image_size: int, threshold: float = MATCH_IOU) -> float:
    """Share of boxes whose best anchor reaches ``threshold`` IoU (1.0 when there are no boxes)."""
    if len(boxes_xyxy) == 0:
        return 1.0
    return float((best_ious(boxes_xyxy, spec, image_size) >= threshold).mean())


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means in one dimension, started at the quantiles (deterministic); sorted centres."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.abs(values[:, None] - centres[None, :]).argmin(1)
        updated = np.array([values[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def fit_anchors(
    boxes_xyxy: np.ndarray, current: AnchorSpec, image_size: int, max_boxes: int = 20000, seed: int = 0
) -> AnchorSpec:
    """Aspect ratios by k-means on the boxes' log aspect, then the ``anchor_scale`` that matches the most boxes.

    Args:
        boxes_xyxy: Training boxes in model pixels (as letterboxed to ``image_size``).
        current: The model's anchors; the fit keeps its number of ratios and scales (the head's shape).
        image_size: The model input side.
        max_boxes: Fit on a seeded sample of at most this many boxes.
        seed: Seed of that sample.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    b = b[((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)]
    if len(b) > max_boxes:
        b = b[np.random.default_rng(seed).choice(len(b), max_boxes, replace=False)]
    if len(b) == 0:
        return current
    log_ratio = np.log((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1]))
    k = min(len(current.aspect_ratios), len(np.unique(log_ratio)))
    centres = kmeans_1d(log_ratio, k)
    ratios = [(float(math.exp(c / 2)), float(math.exp(-c / 2))) for c in centres]  # area 1, w/h = exp(c)
    while len(ratios) < len(current.aspect_ratios):  # fewer distinct shapes than ratios: repeat the middle one
        ratios.append(ratios[len(ratios) // 2])
    candidates = 2.0 ** np.linspace(-1, 3, 97)  # anchor_scale 0.5 .. 8, 24 steps per octave
    shares = [match_share(b, AnchorSpec(float(c), tuple(ratios), current.num_scales), image_size) for c in candidates]
    top = max(shares)
    # among the best scales, the one closest to the current (the default 4.0 when it is as good)
    scale = min((c for c, sh in zip(candidates, shares, strict=True) if sh >= top - 1e-9),
                key=lambda c: abs(math.log(c / current.anchor_scale)))  # fmt: skip
    return AnchorSpec(round(float(scale), 4), tuple((round(x, 4), round(y, 4)) for x, y in ratios), current.num_scales)


def spec_of(config: Any) -> AnchorSpec | None:  # noqa: ANN401 - effdet's OmegaConf config
    """The anchor settings of an effdet config (``None`` when ``anchor_scale`` is per level)."""
    if not isinstance(config.anchor_scale, (int, float)):
        return None
    ratios = tuple(_ratio_xy(a if isinstance(a, (int, float)) else (a[0], a[1])) for a in config.aspect_ratios)
    return AnchorSpec(float(config.anchor_scale), ratios, int(config.num_scales))


def set_anchors(bench: Any, spec: AnchorSpec) -> None:  # noqa: ANN401 - an effdet DetBenchTrain
    """Rebuild a ``DetBenchTrain``'s anchors and labeler from ``spec`` (written into its model's config too)."""
    from effdet.anchors import AnchorLabeler, Anchors
    from omegaconf import read_write

    config = bench.model.config
    if spec.num_scales * len(spec.aspect_ratios) != config.num_scales * len(config.aspect_ratios):
        raise ValueError(f"anchors {spec} change the number of anchors per location of the model's class head")
    with read_write(config):  # effdet makes the model's config read-only
        config.anchor_scale, config.num_scales = spec.anchor_scale, spec.num_scales
        config.aspect_ratios = [list(a) for a in spec.aspect_ratios]
    bench.anchors = Anchors.from_config(config).to(bench.anchors.boxes.device)
    bench.anchor_labeler = AnchorLabeler(bench.anchors, bench.num_classes, match_threshold=MATCH_IOU)


__all__ = [
    "LOW_SHARE",
    "MATCH_IOU",
    "AnchorSpec",
    "best_ious",
    "fit_anchors",
    "kmeans_1d",
    "match_share",
    "set_anchors",
    "spec_of",
]
