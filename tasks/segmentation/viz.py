"""Drawing segmentation results: class colours, overlays, and image | truth | prediction panels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct colours (Tableau/Kelly-like); class i gets PALETTE[i % len]. Ignored pixels are white.
PALETTE = np.array(
    [
        (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
        (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
        (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (250, 190, 212), (128, 128, 128),
    ],
    dtype=np.uint8,
)  # fmt: skip
IGNORE_RGB = (255, 255, 255)


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """One RGB colour per class; a class named ``background`` is black, the others distinct colours."""
    colours = []
    shift = 0 if class_names and class_names[0].lower() == "background" else 1
    for i in range(len(class_names)):
        colours.append(PALETTE[(i + shift) % len(PALETTE)] if i + shift else PALETTE[0])
    return np.stack(colours) if colours else PALETTE[:0]


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxW class ids (negative = ignored) -> HxWx3 uint8 colours."""
    out = palette[np.clip(labels, 0, len(palette) - 1)]
    out[labels < 0] = IGNORE_RGB
    return out


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxWxC float in [0, 1] (any C) -> HxWx3 uint8; grayscale is repeated, extra channels dropped."""
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """HxW bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an HxWx3 uint8 image and outline the regions in white.

    Background-named (black) classes stay untinted. The outline keeps regions visible where a
    class colour resembles the image's own colour.
    """
    colours = colorize(labels, palette).astype(np.float32)
    tint = colours.any(axis=2, keepdims=True)
    out = np.where(tint, (1 - alpha) * rgb + alpha * colours, rgb).round().astype(np.uint8)
    out[boundaries(labels)] = 255
    return out


def error_map(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """HxWx3: wrong pixels red, right ones dark gray, ignored (negative truth) black."""
    out = np.full((*truth.shape, 3), 60, dtype=np.uint8)
    out[(pred != truth) & (truth >= 0)] = (255, 40, 40)
    out[truth < 0] = 0
    return out


def multilabel_to_ids(planes: np.ndarray) -> np.ndarray:
    """C x H x W 0/1 planes -> H x W ids of the highest present class (0 when none), for display."""
    ids = np.zeros(planes.shape[1:], dtype=np.int64)
    for c in range(planes.shape[0]):
        ids[planes[c] > 0] = c
    ids[(planes < 0).any(0)] = -1
    return ids


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text(xy, text, fill=(255, 255, 255), font=ImageFont.load_default())


def render_panel(
    rows: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    class_names: Sequence[str],
    title: str = "",
    min_side: int = 160,
) -> Image.Image:
    """A grid with one row per sample: image | ground truth | prediction | errors, plus a legend.

    Truth and prediction are drawn as plain class-colour maps (easiest to compare); the error
    column marks wrong pixels in red.

    Args:
        rows: ``(rgb uint8 HxWx3, truth ids HxW or None, prediction ids HxW)`` per sample.
        class_names: Legend names, in class-id order.
        title: Text on the header line (e.g. the epoch).
        min_side: Small images are enlarged (nearest) until their shorter side reaches this.
    """
    palette = class_palette(class_names)
    h, w = rows[0][0].shape[:2]
    scale = max(1, -(-min_side // min(h, w)))
    cell_w, cell_h, gap, header = w * scale, h * scale, 4, 18
    cols = ("image", "ground truth", "prediction", "errors")
    legend_h = 16 * (1 + (len(class_names) - 1) // 4)
    ncols = 4
    size = (ncols * cell_w + (ncols + 1) * gap, header * 2 + len(rows) * (cell_h + gap) + legend_h + gap)
    canvas = Image.new("RGB", size, (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    _text(draw, (gap, 3), title)
    for j, name in enumerate(cols):
        _text(draw, (gap + j * (cell_w + gap), header + 3), name)
    for i, (rgb, truth, pred) in enumerate(rows):
        blank = np.zeros_like(rgb)
        truth_cell = colorize(truth, palette) if truth is not None else blank
        errors = error_map(truth, pred) if truth is not None else blank
        cells = [rgb, truth_cell, colorize(pred, palette), errors]
        y = 2 * header + i * (cell_h + gap)
        for j, cell in enumerate(cells):
            im = Image.fromarray(cell).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(im, (gap + j * (cell_w + gap), y))
    y0 = 2 * header + len(rows) * (cell_h + gap)
    slot = (canvas.width - gap) // 4  # four legend entries per line
    for k, name in enumerate(class_names):
        x, y = gap + (k % 4) * slot, y0 + (k // 4) * 16
        draw.rectangle((x, y + 2, x + 11, y + 13), fill=tuple(int(v) for v in palette[k]), outline=(200, 200, 200))
        _text(draw, (x + 16, y + 2), f"{k} {name}")
    return canvas
