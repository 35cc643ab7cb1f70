"""Sliding-window inference: images larger than the training crops are predicted in overlapping tiles."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``0..length`` with the last tile flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


@torch.no_grad()
def sliding_window(
    fn: Callable[[Tensor], Tensor], image: Tensor, tile: int, overlap: float = 0.25, batch_size: int = 4
) -> Tensor:
    """Apply ``fn`` (1 x C x h x w -> 1 x K x h x w) over overlapping tiles and average where they overlap.

    Images no larger than ``tile`` on both sides go through ``fn`` whole. Each pixel's output is
    the plain mean over the tiles that cover it (uniform weights); every pixel is covered because
    the last tile in each direction is placed flush with the border.

    Args:
        fn: The per-tile function, e.g. probabilities of a model.
        image: 1 x C x H x W.
        tile: Tile side in pixels.
        overlap: Overlap between neighbouring tiles as a fraction of ``tile`` (0 <= overlap < 1).
        batch_size: Tiles per ``fn`` call.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _, _, h, w = image.shape
    if h <= tile and w <= tile:
        return fn(image)
    th, tw = min(tile, h), min(tile, w)
    stride = max(1, int(tile * (1 - overlap)))
    boxes = [(y, x) for y in _starts(h, th, stride) for x in _starts(w, tw, stride)]
    total: Tensor | None = None
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        out = fn(torch.cat([image[..., y : y + th, x : x + tw] for y, x in chunk]))
        if total is None:  # float32 sums even when fn runs under autocast
            total = out.new_zeros(1, out.shape[1], h, w, dtype=torch.float32)
        for k, (y, x) in enumerate(chunk):
            total[..., y : y + th, x : x + tw] += out[k].float()
            count[..., y : y + th, x : x + tw] += 1
    assert total is not None
    return total / count
