"""A deterministic synthetic segmentation dataset: shapes of several classes on textured backgrounds.

Used by ``effbackbone quickstart`` (nothing to download) and by the tests. Each class is a shape
(ellipse, square, triangle, ...) drawn in a jittered class colour with its own texture, on a
background of smooth colour blotches plus pixel noise; shapes overlap and are partly cut by the
border, so the model has to use both colour and shape. The layout is the one ``MaskDataModule``
reads: ``<root>/<split>/images/*.png``, ``<root>/<split>/masks/*.png`` (class ids, or colours with
``mask_format="palette"``) and ``<root>/classes.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "square", "triangle", "cross", "ring")
# Class colours for the images (class 0 is the background); the palette masks use PALETTE.
_COLOURS = ((220, 60, 50), (60, 190, 80), (70, 100, 235), (235, 200, 40), (190, 70, 210))
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180))


@dataclass(frozen=True)
class SyntheticMaskSpec:
    """What to generate.

    Attributes:
        num_train: Images in ``train``.
        num_val: Images in ``val`` (0: no val folder, the data module then splits ``train``).
        num_test: Images in ``test`` (0: none).
        num_shapes: Shape classes besides the background (at most 5): 3 gives ellipse, square, triangle.
        size: Image side in pixels, or ``(height, width)``.
        channels: 1 (grayscale PNG) or 3 (RGB PNG).
        max_objects: Shapes per image, 1..max_objects.
        object_scale: Range of the shape size as a fraction of the shorter side.
        mask_format: ``"ids"`` (8-bit class ids) or ``"palette"`` (RGB colours of ``PALETTE``).
        seed: Seed of everything random; the same spec gives the same bytes.
        num_large: Images in ``large``: ``large_size`` images with shapes of the same pixel size as in
            ``train`` (more of them), for tiled prediction; masks included (0: none).
        large_size: ``(height, width)`` of the ``large`` images.
    """

    num_train: int = 64
    num_val: int = 16
    num_test: int = 0
    num_shapes: int = 3
    size: int | tuple[int, int] = 96
    channels: int = 3
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.2, 0.45)
    mask_format: Literal["ids", "palette"] = "ids"
    seed: int = 0
    num_large: int = 0
    large_size: tuple[int, int] = (192, 256)

    @property
    def class_names(self) -> list[str]:
        """``background`` followed by the shape names."""
        return ["background", *SHAPES[: self.num_shapes]]

    def large_spec(self) -> SyntheticMaskSpec:
        """The spec of the ``large`` split: shapes as many pixels wide as in ``train``, 2.5x as many per image."""
        side = min((self.size, self.size) if isinstance(self.size, int) else self.size)
        factor = side / min(self.large_size)  # object_scale is relative to the shorter side
        scale = (round(self.object_scale[0] * factor, 4), round(self.object_scale[1] * factor, 4))
        return replace(self, size=self.large_size, max_objects=self.max_objects * 5 // 2, object_scale=scale,
                       seed=self.seed + 1, num_large=0)  # fmt: skip


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour blotches (upsampled coarse noise) plus fine pixel noise, float32 HxWx3."""
    coarse = rng.uniform(50, 200, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return smooth + rng.normal(0, 10, size=(h, w, 3))


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int, scale: tuple[float, float]) -> np.ndarray:
    """A boolean HxW mask of one randomly placed, sized and rotated shape."""
    r = rng.uniform(*scale) * min(h, w) / 2
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)  # centres anywhere: shapes get cut by the border
    angle = rng.uniform(0, 2 * math.pi)
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)

    def poly(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "ellipse":
        # PIL ellipses are axis-aligned; the aspect ratio alone varies.
        ry = r * rng.uniform(0.6, 1.0)
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=1)
    elif kind == "square":
        draw.polygon(poly([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=1)
    elif kind == "triangle":
        draw.polygon(poly([(r * math.cos(t), r * math.sin(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]), fill=1)
    elif kind == "cross":
        a = r / 3
        draw.polygon(poly([(-r, -a), (r, -a), (r, a), (-r, a)]), fill=1)
        draw.polygon(poly([(-a, -r), (a, -r), (a, r), (-a, r)]), fill=1)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=0)
    else:
        raise ValueError(f"unknown shape {kind!r}; valid: {', '.join(SHAPES)}")
    return np.asarray(layer, dtype=bool)


def make_sample(spec: SyntheticMaskSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (HxWx3 or HxW uint8) and class-id mask (HxW uint8) number ``index`` of ``spec``."""
    if not 1 <= spec.num_shapes <= len(SHAPES):
        raise ValueError(f"num_shapes={spec.num_shapes} must be in 1..{len(SHAPES)}")
    h, w = (spec.size, spec.size) if isinstance(spec.size, int) else spec.size
    rng = np.random.default_rng([spec.seed, index])
    image = _background(rng, h, w)
    mask = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        cls = int(rng.integers(1, spec.num_shapes + 1))
        region = _shape_mask(rng, SHAPES[cls - 1], h, w, spec.object_scale)
        colour = np.clip(np.array(_COLOURS[cls - 1]) + rng.normal(0, 25, size=3), 0, 255)
        # A per-class stripe texture, so grayscale images still separate the classes.
        stripes = 25 * np.sin((xx * math.cos(cls) + yy * math.sin(cls)) * (0.3 + 0.25 * cls))
        fill = colour[None, None, :] + stripes[..., None] + rng.normal(0, 8, size=(h, w, 1))
        image[region] = fill[region]
        mask[region] = cls
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    if spec.channels == 1:
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))
    elif spec.channels != 3:
        raise ValueError(f"channels={spec.channels} must be 1 or 3")
    return pixels, mask


def write_split(root: str | Path, split: str, spec: SyntheticMaskSpec, count: int, start: int = 0) -> None:
    """Write samples ``start .. start + count - 1`` of ``spec`` to ``<root>/<split>/{images,masks}``."""
    folder = Path(root) / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        image, mask = make_sample(spec, index)
        name = f"{split}_{index:04d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        if spec.mask_format == "palette":
            Image.fromarray(np.asarray(PALETTE, dtype=np.uint8)[mask]).save(folder / "masks" / name)
        else:
            Image.fromarray(mask).save(folder / "masks" / name)


def _spec_json(spec: SyntheticMaskSpec) -> dict[str, object]:
    return json.loads(json.dumps(asdict(spec)))  # tuples -> lists, as read back from classes.json


def generate_masks(root: str | Path, spec: SyntheticMaskSpec | None = None) -> Path:
    """Write the dataset of ``spec`` under ``root`` (overwriting its files) and return ``root``."""
    spec = spec or SyntheticMaskSpec()
    root = Path(root)
    start = 0
    for split, count in (("train", spec.num_train), ("val", spec.num_val), ("test", spec.num_test)):
        if count:
            write_split(root, split, spec, count, start)
        start += count
    if spec.num_large:
        write_split(root, "large", spec.large_spec(), spec.num_large)
    meta: dict[str, object] = {
        "classes": spec.class_names,
        "num_classes": spec.num_shapes + 1,
        "ignore_index": None,
        "spec": _spec_json(spec),
    }
    if spec.mask_format == "palette":
        meta["colors"] = [list(c) for c in PALETTE[: spec.num_shapes + 1]]
    (root / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def holds_other_data(root: str | Path) -> bool:
    """Whether ``root`` holds a dataset this module did not generate (a ``train`` folder, no recorded spec)."""
    root = Path(root)
    meta_path = root / "classes.json"
    generated = meta_path.is_file() and "spec" in json.loads(meta_path.read_text())
    return (root / "train").exists() and not generated


def ensure_masks(root: str | Path, spec: SyntheticMaskSpec | None = None) -> Path:
    """Generate the dataset under ``root`` unless its ``classes.json`` records the same spec.

    A generated dataset of another spec is replaced; a folder holding other data is never written to.
    """
    spec = spec or SyntheticMaskSpec()
    meta_path = Path(root) / "classes.json"
    if meta_path.is_file():
        if json.loads(meta_path.read_text()).get("spec") == _spec_json(spec):
            return Path(root)
    if holds_other_data(root):
        raise FileExistsError(f"{root} holds a dataset that was not generated here; generating the synthetic one "
                              "would overwrite it: choose another folder for the synthetic data")  # fmt: skip
    return generate_masks(root, spec)
