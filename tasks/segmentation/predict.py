"""Segmentation inference: mask and overlay PNGs of whole images (tiled by :mod:`tasks.segmentation.tiling`).

Three ways in: ``SegmentationTask.predict_step`` (``effbackbone predict``, with
:class:`SegmentationWriter` in the config's callbacks), :func:`predict_folder` from Python, and
the quickstart. All of them tile images larger than the task's ``tile_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tasks.common.images import default_stats, find_images, read_image
from tasks.common.writers import PredictionWriter
from tasks.segmentation.viz import class_palette, multilabel_to_ids, overlay, to_rgb

if TYPE_CHECKING:
    import lightning as L


class Predictor(Protocol):
    """What prediction needs of a model (``SegmentationTask`` has it): no import of the task here."""

    in_channels: int
    mean: list[float] | None
    std: list[float] | None
    class_names: list[str]

    def eval(self) -> Any: ...  # noqa: ANN401, D102
    def parameters(self) -> Any: ...  # noqa: ANN401, D102
    def predict_probabilities(self, image: Tensor) -> Tensor: ...  # noqa: D102
    def labels(self, probs: Tensor) -> Tensor: ...  # noqa: D102


def save_prediction(
    labels: np.ndarray, rgb: np.ndarray, stem: str, output_dir: Path, class_names: Sequence[str]
) -> tuple[Path, Path]:
    """Write ``<stem>_mask.png`` and ``<stem>_overlay.png``; returns their paths.

    The mask is a palette PNG: its pixel values are the class ids (read back by ``MaskDataModule``)
    and viewers show the class colours. Multilabel predictions (C x H x W) are saved as
    ``<stem>_mask.npy`` planes instead, and overlaid by their highest present class.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    palette = class_palette(class_names)
    if labels.ndim == 3:
        mask_path = output_dir / f"{stem}_mask.npy"
        np.save(mask_path, labels.astype(np.uint8))
        ids = multilabel_to_ids(labels)
    else:
        mask_path = output_dir / f"{stem}_mask.png"
        ids = labels
        if len(class_names) > 256:
            raise ValueError(f"{len(class_names)} classes do not fit an 8-bit mask PNG")
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        im.putpalette(palette.reshape(-1).tolist())
        im.save(mask_path)
    overlay_path = output_dir / f"{stem}_overlay.png"
    Image.fromarray(overlay(rgb, ids, palette)).save(overlay_path)
    return mask_path, overlay_path


def _normalise(image: np.ndarray, task: Predictor) -> Tensor:
    mean, std = task.mean, task.std
    if mean is None or std is None:
        mean, std = default_stats(task.in_channels)
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def predict_folder(
    task: Predictor, input_dir: str | Path, output_dir: str | Path, limit: int | None = None
) -> list[tuple[Path, Path]]:
    """Predict every image of ``input_dir`` (tiled when large) into ``output_dir``; returns the written paths."""
    task.eval()
    device = next(task.parameters()).device
    written = []
    for path in find_images(Path(input_dir))[:limit]:
        image = read_image(path, task.in_channels)
        probs = task.predict_probabilities(_normalise(image, task).to(device))
        labels = task.labels(probs)[0].cpu().numpy()
        written.append(save_prediction(labels, to_rgb(image), path.stem, Path(output_dir), task.class_names))
    return written


class SegmentationWriter(PredictionWriter):
    """Writes each predicted image's mask and overlay PNG during ``effbackbone predict``.

    Args:
        output_dir: Folder for the PNGs (default ``<log dir>/predictions``).
    """

    def write_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any) -> None:  # noqa: ANN401
        """Save the batch's masks and overlays (original pixels read back from the image files)."""
        out = self.output_path(trainer)
        names = getattr(pl_module, "class_names", None) or [str(i) for i in range(prediction["probs"][0].shape[0])]
        in_channels = getattr(pl_module, "in_channels", 3)
        for path, labels in zip(prediction["path"], prediction["labels"], strict=True):
            rgb = to_rgb(read_image(path, in_channels))
            save_prediction(labels.cpu().numpy(), rgb, Path(path).stem, out, names)
