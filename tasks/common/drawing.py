"""Picture helpers both tasks draw with: a font at any size, and a legend of colour swatches."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

CANVAS_RGB = (40, 40, 40)
TEXT_RGB = (235, 235, 235)
LegendEntry = tuple[tuple[int, int, int] | None, str]  # colour (None: text only), text


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` pixels (its fixed bitmap font when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def draw_legend(canvas: Image.Image, entries: Sequence[LegendEntry], top: int, size: int, pad: int = 4) -> None:
    """Draw ``entries`` as swatch + text, left to right, wrapping, from ``top`` (see :func:`legend_height`)."""
    draw = ImageDraw.Draw(canvas)
    x, y, f = pad, top, font(size)
    for colour, text in entries:
        swatch = 0 if colour is None else size + 4
        width = swatch + int(draw.textlength(text, font=f)) + 3 * pad
        if x > pad and x + width > canvas.width:
            x, y = pad, y + size + pad
        if colour is not None:
            draw.rectangle((x, y + 1, x + size - 2, y + size - 1), fill=colour, outline=(200, 200, 200))
        draw.text((x + swatch, y), text, fill=TEXT_RGB, font=f)
        x += width


def legend_height(entries: Sequence[LegendEntry], width: int, size: int, pad: int = 4) -> int:
    """Height :func:`draw_legend` needs for ``entries`` on a canvas ``width`` pixels wide."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, x = 1, pad
    for colour, text in entries:
        w = (0 if colour is None else size + 4) + int(probe.textlength(text, font=font(size))) + 3 * pad
        if x > pad and x + w > width:
            lines, x = lines + 1, pad
        x += w
    return lines * (size + pad) + pad
