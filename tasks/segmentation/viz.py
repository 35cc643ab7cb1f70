"""Drawing segmentation results: class colours, overlays, and image | truth | prediction | errors panels.

Overlays tint a grey copy of the image: saturated class colours then stand apart from whatever colours
the objects have themselves (a red object tinted red would vanish on the colour image), and white
outlines mark every region border. Every picture carries a legend of the classes it shows; ignored
pixels (negative ids) are white and get an "ignored" entry instead of a class name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from tasks.common.drawing import CANVAS_RGB, TEXT_RGB, LegendEntry, draw_legend, font, legend_height

# Distinct saturated colours (Kelly/Tableau-like); class i gets PALETTE[i % len]. Ignored pixels are white.
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


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Class colours blended over a grey copy of an HxWx3 uint8 image, region borders in white.

    The grey copy (luma squeezed into 30-190) keeps the image's structure while no object colour can
    hide a tint; background-named (black) classes stay untinted.
    """
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.repeat((30 + luma * (160 / 255))[..., None], 3, axis=2)
    colours = colorize(labels, palette).astype(np.float32)
    tint = colours.any(axis=2, keepdims=True) & (labels >= 0)[..., None]
    out = np.where(tint, (1 - alpha) * grey + alpha * colours, grey).round().astype(np.uint8)
    out[boundaries(labels)] = 255
    return out


def error_map(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """HxWx3: wrong pixels red, right ones dark grey, ignored (negative truth) black."""
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


def legend_entries(
    class_names: Sequence[str], palette: np.ndarray, *label_maps: np.ndarray | None
) -> list[LegendEntry]:
    """``(colour, text)`` for each class present in ``label_maps`` (all classes when none are given).

    In class-id order, plus an "ignored" entry when a map has negative (ignored) pixels.
    """
    maps = [m for m in label_maps if m is not None]
    present = set(np.unique(np.concatenate([m.ravel() for m in maps])).tolist()) if maps else None
    entries: list[LegendEntry] = [
        ((int(palette[k][0]), int(palette[k][1]), int(palette[k][2])), f"{k} {name}")
        for k, name in enumerate(class_names)
        if present is None or k in present
    ]
    if present is not None and any(v < 0 for v in present):
        entries.append((IGNORE_RGB, "ignored (not scored)"))
    return entries


def _text_size(cell_h: int) -> int:
    return max(11, min(18, cell_h // 10))


def render_overlay(
    rgb: np.ndarray, labels: np.ndarray, class_names: Sequence[str], min_side: int = 256, title: str = ""
) -> Image.Image:
    """An overlay (:func:`overlay`) with a title line and a legend of the classes it shows below it.

    Small images are enlarged (nearest, an integer factor) until their shorter side reaches ``min_side``,
    so that the legend's text stays readable beside them.
    """
    palette = class_palette(class_names)
    h, w = labels.shape
    scale = max(1, -(-min_side // min(h, w)))
    image = Image.fromarray(overlay(rgb, labels, palette)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    size = _text_size(image.height)
    entries = legend_entries(class_names, palette, labels)
    header = size + 8 if title else 0
    canvas = Image.new("RGB", (image.width, header + image.height + legend_height(entries, image.width, size)),
                       CANVAS_RGB)  # fmt: skip
    if title:
        ImageDraw.Draw(canvas).text((4, 4), title, fill=TEXT_RGB, font=font(size))
    canvas.paste(image, (0, header))
    draw_legend(canvas, entries, header + image.height + 4, size)
    return canvas


def render_panel(
    rows: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    class_names: Sequence[str],
    title: str = "",
    min_side: int = 160,
) -> Image.Image:
    """A grid with one row per sample: image | ground truth | prediction | errors, plus a legend.

    Truth and prediction are drawn as plain class-colour maps (easiest to compare); the error column
    marks wrong pixels in red. Rows may differ in size: each is scaled (nearest) to fit the cell.

    Args:
        rows: ``(rgb uint8 HxWx3, truth ids HxW or None, prediction ids HxW)`` per sample.
        class_names: Legend names, in class-id order (the legend lists those present in the rows).
        title: Text on the header line (e.g. the epoch).
        min_side: Small images are enlarged (nearest) until their shorter side reaches this.
    """
    palette = class_palette(class_names)
    h = max(r[0].shape[0] for r in rows)
    w = max(r[0].shape[1] for r in rows)
    scale = max(1, -(-min_side // min(h, w)))
    cell_w, cell_h, gap = w * scale, h * scale, 4
    size = _text_size(cell_h)
    header = size + 8
    cols = ("image", "ground truth", "prediction", "errors (red: wrong)")
    width = 4 * cell_w + 5 * gap
    entries = legend_entries(class_names, palette, *(m for r in rows for m in (r[1], r[2])))
    height = 2 * header + len(rows) * (cell_h + gap) + legend_height(entries, width, size)
    canvas = Image.new("RGB", (width, height), CANVAS_RGB)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill=TEXT_RGB, font=font(size))
    for j, name in enumerate(cols):
        draw.text((gap + j * (cell_w + gap), header + 4), name, fill=TEXT_RGB, font=font(size))
    for i, (rgb, truth, pred) in enumerate(rows):
        blank = np.zeros_like(rgb)
        truth_cell = colorize(truth, palette) if truth is not None else blank
        errors = error_map(truth, pred) if truth is not None else blank
        y = 2 * header + i * (cell_h + gap)
        rh, rw = rgb.shape[:2]
        fit = min(cell_w / rw, cell_h / rh)  # keep the aspect ratio inside the cell
        shown = (max(1, round(rw * fit)), max(1, round(rh * fit)))
        for j, cell in enumerate((rgb, truth_cell, colorize(pred, palette), errors)):
            canvas.paste(Image.fromarray(cell).resize(shown, Image.Resampling.NEAREST), (gap + j * (cell_w + gap), y))
    draw_legend(canvas, entries, 2 * header + len(rows) * (cell_h + gap), size)
    return canvas
