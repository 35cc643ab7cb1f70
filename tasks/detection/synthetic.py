"""A deterministic synthetic COCO dataset: coloured shapes with their boxes.

Used by the detection quickstart (no download) and by the tests. Each class is a shape
(rectangle, ellipse, triangle, cross, ...) with its own colour, drawn on a noisy background,
so a detector trained for a few minutes on CPU reaches a clearly non-zero mAP. The layout is
the one ``CocoDataModule`` reads: ``annotations/instances_<split>.json`` and
``<split>/images/*.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "ring")
_COLOURS = ((230, 60, 60), (60, 200, 80), (70, 110, 240), (240, 200, 40), (200, 70, 220), (40, 210, 220))


@dataclass(frozen=True)
class SyntheticCocoSpec:
    """What to generate.

    Attributes:
        num_train: Images in the ``train`` split.
        num_val: Images in the ``val`` split.
        num_classes: Distinct shapes (at most 6).
        category_ids: COCO category id of each class (sparse ids are allowed); default 1..n.
        min_size: Smallest image side in pixels (image sizes vary so letterboxing is exercised).
        max_size: Largest image side in pixels.
        max_objects: At most this many shapes per image.
        empty_fraction: Share of images with no object (negatives).
        object_scale: Range of the shape size as a fraction of the shorter image side.
        seed: Seed of everything random; the same spec gives the same bytes.
    """

    num_train: int = 160
    num_val: int = 40
    num_classes: int = 3
    category_ids: tuple[int, ...] | None = None
    min_size: int = 160
    max_size: int = 320
    max_objects: int = 3
    empty_fraction: float = 0.1
    object_scale: tuple[float, float] = (0.2, 0.5)
    seed: int = 0


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=colour)
    elif shape == "cross":
        w, h = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle((x1 + w, y1, x2 - w, y2), fill=colour)
        draw.rectangle((x1, y1 + h, x2, y2 - h), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)
    else:  # ring: its box is still the outer extent, which makes the class less trivially "a blob"
        draw.ellipse(box, outline=colour, width=max(2, (x2 - x1) // 6))


def _make_image(rng: np.random.Generator, spec: SyntheticCocoSpec) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
    w, h = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    base = rng.integers(40, 120, size=3)
    noise = rng.normal(0, 12, size=(h, w, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects: list[tuple[int, list[int]]] = []
    n = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        cls = int(rng.integers(spec.num_classes))
        side = int(min(w, h) * rng.uniform(*spec.object_scale))
        bw, bh = (max(8, int(side * r)) for r in rng.uniform(0.75, 1.25, size=2))
        bw, bh = min(bw, w - 1), min(bh, h - 1)
        # A few tries to avoid overlap, so no shape hides another (the boxes stay exact).
        for _try in range(10):
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = (x1, y1, x1 + bw, y1 + bh)
            if not any(box[0] <= p[2] and p[0] <= box[2] and box[1] <= p[3] and p[1] <= box[3] for p in placed):
                break
        else:
            continue
        placed.append(box)
        _draw_shape(draw, _SHAPES[cls], box, _COLOURS[cls])
        # PIL fills the end pixel too, so the painted extent is bw + 1 pixels wide.
        objects.append((cls, [x1, y1, bw + 1, bh + 1]))
    return image, objects


def _write_split(root: Path, split: str, count: int, spec: SyntheticCocoSpec, rng: np.random.Generator) -> None:
    ids = list(spec.category_ids or range(1, spec.num_classes + 1))
    image_dir = root / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = _make_image(rng, spec)
        name = f"{split}_{i:05d}.png"
        image.save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": image.width, "height": image.height})
        for cls, bbox in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": ids[cls], "bbox": bbox,
                 "area": float(bbox[2] * bbox[3]), "iscrowd": 0}
            )
    categories = [{"id": ids[c], "name": _SHAPES[c], "supercategory": "shape"} for c in range(spec.num_classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def generate_synthetic_coco(root: str | Path, spec: SyntheticCocoSpec | None = None) -> Path:
    """Write a synthetic COCO dataset under ``root`` (overwriting what the same names hold).

    Args:
        root: Output folder; gets ``annotations/instances_{train,val}.json`` and
            ``{train,val}/images/``.
        spec: What to generate; the default is the quickstart dataset.

    Returns:
        ``root`` as a ``Path``.
    """
    spec = spec or SyntheticCocoSpec()
    if not 1 <= spec.num_classes <= len(_SHAPES):
        raise ValueError(f"num_classes must be 1..{len(_SHAPES)}, got {spec.num_classes}")
    if spec.category_ids is not None and len(spec.category_ids) != spec.num_classes:
        raise ValueError(f"category_ids {spec.category_ids} must have num_classes={spec.num_classes} entries")
    root = Path(root)
    # One generator per split, so changing num_val does not change the training images.
    for k, (split, count) in enumerate((("train", spec.num_train), ("val", spec.num_val))):
        _write_split(root, split, count, spec, np.random.default_rng([spec.seed, k]))
    return root


def ensure_synthetic_coco(root: str | Path, spec: SyntheticCocoSpec | None = None) -> Path:
    """Generate the dataset unless ``root`` already holds both annotation files."""
    root = Path(root)
    if not all((root / "annotations" / f"instances_{s}.json").is_file() for s in ("train", "val")):
        generate_synthetic_coco(root, spec)
    return root
