"""A deterministic synthetic COCO dataset with instance masks: coloured shapes, their boxes and their outlines.

The shapes and colours of the detection quickstart (:mod:`tasks.detection.synthetic`), annotated in every form a
COCO json can hold: polygons (most objects), compressed RLE (rings, which have a hole, and ``rle_fraction`` of the
others), crowd regions (clusters of small blobs, ``iscrowd: 1`` with an uncompressed RLE, as COCO stores them) and
images without objects. Every painted pixel comes from the annotation's own rasterisation by pycocotools, so the
masks are exact. Layout: ``annotations/instances_<split>.json`` and ``<split>/images/*.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tasks.detection.synthetic import _COLOURS, _SHAPES


@dataclass(frozen=True)
class SyntheticInstanceSpec:
    """What to generate.

    Attributes:
        num_train: Images in the ``train`` split.
        num_val: Images in the ``val`` split.
        num_classes: Distinct shapes (at most 6: rectangle, ellipse, triangle, cross, diamond, ring).
        category_ids: COCO category id of each class (sparse ids are allowed); default 1..n.
        min_size: Smallest image side in pixels (sizes vary, so the letterbox is exercised).
        max_size: Largest image side in pixels.
        max_objects: At most this many shapes per image.
        empty_fraction: Share of images with no object (negatives).
        object_scale: Range of the shape size as a fraction of the shorter image side.
        rle_fraction: Share of the polygon-shaped objects annotated as compressed RLE instead.
        crowd_fraction: Share of images that also get one crowd region (ignored by training and by COCOeval).
        seed: Seed of everything random; the same spec gives the same bytes.
    """

    num_train: int = 200
    num_val: int = 40
    num_classes: int = 3
    category_ids: tuple[int, ...] | None = None
    min_size: int = 96
    max_size: int = 192
    max_objects: int = 3
    empty_fraction: float = 0.1
    object_scale: tuple[float, float] = (0.25, 0.5)
    rle_fraction: float = 0.25
    crowd_fraction: float = 0.15
    seed: int = 0


def shape_polygons(shape: str, box: tuple[float, float, float, float]) -> list[list[float]]:
    """The outline of ``shape`` in ``box`` (x1, y1, x2, y2) as COCO polygons (a ring: outer, then inner)."""
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2

    def ellipse(sx: float, sy: float) -> list[float]:
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return [float(v) for a in angles for v in (cx + sx * math.cos(a), cy + sy * math.sin(a))]

    w, h = (x2 - x1) / 3, (y2 - y1) / 3
    outlines = {
        "rectangle": [[x1, y1, x2, y1, x2, y2, x1, y2]],
        "triangle": [[cx, y1, x2, y2, x1, y2]],
        "diamond": [[cx, y1, x2, cy, cx, y2, x1, cy]],
        "cross": [[x1 + w, y1, x2 - w, y1, x2 - w, y1 + h, x2, y1 + h, x2, y2 - h, x2 - w, y2 - h, x2 - w, y2,
                   x1 + w, y2, x1 + w, y2 - h, x1, y2 - h, x1, y1 + h, x1 + w, y1 + h]],
        "ellipse": [ellipse(rx, ry)],
        "ring": [ellipse(rx, ry), ellipse(rx * 0.6, ry * 0.6)],
    }  # fmt: skip
    return outlines[shape]


def _rasterise(polygons: list[list[float]], h: int, w: int, hole: bool) -> np.ndarray:
    masks = mask_utils.decode(mask_utils.frPyObjects(polygons, h, w))  # (h, w, parts)
    if hole:  # outer minus inner
        return (masks[..., 0] & (1 - masks[..., 1])).astype(np.uint8)
    return masks.max(axis=2).astype(np.uint8)


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """``mask`` as COCO's uncompressed RLE: run lengths in column-major order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _compressed(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask[..., None]))[0]
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _free_box(
    rng: np.random.Generator, w: int, h: int, bw: int, bh: int, placed: list[tuple[int, ...]]
) -> tuple[int, ...]:
    """A box of ``bw x bh`` overlapping none of ``placed`` (a few tries; ``()`` when none fits)."""
    for _try in range(10):
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = (x1, y1, x1 + bw, y1 + bh)
        if not any(box[0] <= p[2] and p[0] <= box[2] and box[1] <= p[3] and p[1] <= box[3] for p in placed):
            return box
    return ()


def _objects(rng: np.random.Generator, spec: SyntheticInstanceSpec, w: int, h: int) -> list[dict[str, Any]]:
    """Each object as ``{"cls", "mask", "segmentation", "iscrowd"}``, non-overlapping, masks rasterised."""
    placed: list[tuple[int, ...]] = []
    objects: list[dict[str, Any]] = []
    n = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    for _ in range(n):
        cls = int(rng.integers(spec.num_classes))
        side = int(min(w, h) * rng.uniform(*spec.object_scale))
        ratios = rng.uniform(0.75, 1.25, size=2)
        bw, bh = (min(max(8, int(side * r)), d - 1) for r, d in zip(ratios, (w, h), strict=True))
        box = _free_box(rng, w, h, bw, bh, placed)
        if not box:
            continue
        placed.append(box)
        shape = _SHAPES[cls]
        polygons = shape_polygons(shape, box)
        mask = _rasterise(polygons, h, w, hole=shape == "ring")
        as_rle = shape == "ring" or rng.random() < spec.rle_fraction
        segmentation = _compressed(mask) if as_rle else [[round(v, 2) for v in p] for p in polygons]
        if not as_rle:  # the rounded polygon is the annotation: paint exactly what it rasterises to
            mask = _rasterise(segmentation, h, w, hole=False)
        objects.append({"cls": cls, "mask": mask, "segmentation": segmentation, "iscrowd": 0})
    if rng.random() < spec.crowd_fraction:
        side = max(12, int(min(w, h) * 0.3))
        box = _free_box(rng, w, h, min(side, w - 1), min(side, h - 1), placed)
        if box:
            cls, r = int(rng.integers(spec.num_classes)), max(2.0, side / 8)
            centres = rng.uniform([box[0] + r, box[1] + r], [box[2] - r, box[3] - r], size=(4, 2))
            angles = np.linspace(0, 2 * math.pi, 12, endpoint=False)
            blobs = [[float(v) for a in angles for v in (x + r * math.cos(a), y + r * math.sin(a))] for x, y in centres]
            mask = _rasterise(blobs, h, w, hole=False)
            objects.append({"cls": cls, "mask": mask, "segmentation": uncompressed_rle(mask), "iscrowd": 1})
    return objects


def _write_split(root: Path, split: str, count: int, spec: SyntheticInstanceSpec, rng: np.random.Generator) -> None:
    ids = list(spec.category_ids or range(1, spec.num_classes + 1))
    image_dir = root / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
        pixels = np.clip(rng.integers(40, 120, size=3) + rng.normal(0, 12, size=(h, w, 3)), 0, 255)
        for obj in _objects(rng, spec, w, h):
            pixels[obj["mask"].astype(bool)] = _COLOURS[obj["cls"]]
            rle = mask_utils.frPyObjects(obj["segmentation"], h, w) if obj["iscrowd"] else _rle_of(obj["mask"])
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": ids[obj["cls"]],
                "segmentation": obj["segmentation"], "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": obj["iscrowd"],
            })  # fmt: skip
        name = f"{split}_{i:05d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    categories = [{"id": ids[c], "name": _SHAPES[c], "supercategory": "shape"} for c in range(spec.num_classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def _rle_of(mask: np.ndarray) -> dict[str, Any]:
    return mask_utils.encode(np.asfortranarray(mask[..., None]))[0]


def generate_synthetic_instances(root: str | Path, spec: SyntheticInstanceSpec | None = None) -> Path:
    """Write a synthetic COCO instance-segmentation dataset under ``root`` (overwriting the same names).

    Args:
        root: Output folder; gets ``annotations/instances_{train,val}.json`` and ``{train,val}/images/``.
        spec: What to generate; the default is the instance quickstart's dataset.

    Returns:
        ``root`` as a ``Path``.
    """
    spec = spec or SyntheticInstanceSpec()
    if not 1 <= spec.num_classes <= len(_SHAPES):
        raise ValueError(f"num_classes must be 1..{len(_SHAPES)}, got {spec.num_classes}")
    if spec.category_ids is not None and len(spec.category_ids) != spec.num_classes:
        raise ValueError(f"category_ids {spec.category_ids} must have num_classes={spec.num_classes} entries")
    if spec.min_size < 32:
        raise ValueError(f"min_size must be at least 32 pixels, got {spec.min_size}")
    root = Path(root)
    # One generator per split, so changing num_val does not change the training images.
    for k, (split, count) in enumerate((("train", spec.num_train), ("val", spec.num_val))):
        _write_split(root, split, count, spec, np.random.default_rng([spec.seed, k]))
    return root


def ensure_synthetic_instances(root: str | Path, spec: SyntheticInstanceSpec | None = None) -> Path:
    """Generate the dataset unless ``root`` already holds both annotation files."""
    root = Path(root)
    if not all((root / "annotations" / f"instances_{s}.json").is_file() for s in ("train", "val")):
        generate_synthetic_instances(root, spec)
    return root


__all__ = [
    "SyntheticInstanceSpec",
    "ensure_synthetic_instances",
    "generate_synthetic_instances",
    "shape_polygons",
    "uncompressed_rle",
]
