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
from tasks.segmentation.io import MASK_SUFFIXES, read_mask
from tasks.segmentation.viz import class_palette, multilabel_to_ids, render_overlay, render_panel, to_rgb

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


def find_mask(image_path: str | Path) -> Path | None:
    """The ground-truth mask of ``<split>/images/<stem>.*``: ``<split>/masks/<stem>.*`` when it exists."""
    image_path = Path(image_path)
    if image_path.parent.name != "images":
        return None
    for suffix in MASK_SUFFIXES:
        candidate = image_path.parent.parent / "masks" / f"{image_path.stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_truth(
    image_path: str | Path,
    num_classes: int,
    datamodule: Any = None,  # noqa: ANN401 - any data module
) -> np.ndarray | None:
    """HxW class ids of the image's mask (:func:`find_mask`), or ``None`` when there is none.

    Read as the data module reads masks (its ``class_colors``, ``label_map`` and ``ignore_index``) when one
    is given; values that are no class id come back as -1 (ignored in the picture). Multilabel masks are
    not drawn.
    """
    mask_path = find_mask(image_path)
    if mask_path is None or getattr(datamodule, "mode", "multiclass") == "multilabel":
        return None
    hp = getattr(datamodule, "hparams", {})
    ids = read_mask(mask_path, class_colors=getattr(datamodule, "class_colors", None), label_map=hp.get("label_map"))
    ids = ids.astype(np.int64)
    ids[(ids < 0) | (ids >= num_classes)] = -1  # the ignore value, or values the model cannot predict
    return ids if ids.ndim == 2 else None


def save_prediction(
    labels: np.ndarray,
    rgb: np.ndarray,
    stem: str,
    output_dir: Path,
    class_names: Sequence[str],
    truth: np.ndarray | None = None,
) -> list[Path]:
    """Write ``<stem>_mask.png``, ``<stem>_overlay.png`` and, with ``truth``, ``<stem>_panel.png``.

    The mask is a palette PNG: its pixel values are the class ids (read back by ``MaskDataModule``)
    and viewers show the class colours. Multilabel predictions (C x H x W) are saved as
    ``<stem>_mask.npy`` planes instead, and overlaid by their highest present class. The overlay tints
    a grey copy of the image in the class colours, with a legend; the panel is the validation
    picture: image | truth | prediction | errors.

    Returns:
        The paths written.
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
    written = [mask_path, output_dir / f"{stem}_overlay.png"]
    render_overlay(rgb, ids, class_names, title=f"{stem}: prediction").save(written[1])
    if truth is not None and truth.shape == ids.shape:
        written.append(output_dir / f"{stem}_panel.png")
        render_panel([(rgb, truth, ids)], class_names, title=f"{stem}: image | truth | prediction | errors").save(
            written[2]
        )
    return written


def _normalise(image: np.ndarray, task: Predictor) -> Tensor:
    mean, std = task.mean, task.std
    if mean is None or std is None:
        mean, std = default_stats(task.in_channels)
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def predict_folder(
    task: Predictor, input_dir: str | Path, output_dir: str | Path, limit: int | None = None
) -> list[Path]:
    """Predict every image of ``input_dir`` (tiled when large) into ``output_dir``; returns the written paths.

    Images in a ``<split>/images`` folder whose mask is in ``<split>/masks`` also get the panel of
    :func:`save_prediction` (mask values that are no class id are drawn as ignored).
    """
    task.eval()
    device = next(task.parameters()).device
    written: list[Path] = []
    for path in find_images(Path(input_dir))[:limit]:
        image = read_image(path, task.in_channels)
        probs = task.predict_probabilities(_normalise(image, task).to(device))
        labels = task.labels(probs)[0].cpu().numpy()
        truth = read_truth(path, len(task.class_names)) if labels.ndim == 2 else None
        written += save_prediction(labels, to_rgb(image), path.stem, Path(output_dir), task.class_names, truth)
    return written


class SegmentationWriter(PredictionWriter):
    """Writes each image's mask and overlay PNG (and a panel when it has a mask) during ``effbackbone predict``.

    Args:
        output_dir: Folder for the PNGs (default ``<log dir>/predictions``).
    """

    def write_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any) -> None:  # noqa: ANN401
        """Save the batch's masks, overlays and (for images with a mask) panels.

        The original pixels are read back from the image files.
        """
        out = self.output_path(trainer)
        names = getattr(pl_module, "class_names", None) or [str(i) for i in range(prediction["probs"][0].shape[0])]
        in_channels = getattr(pl_module, "in_channels", 3)
        for path, labels in zip(prediction["path"], prediction["labels"], strict=True):
            rgb = to_rgb(read_image(path, in_channels))
            ids = labels.cpu().numpy()
            truth = read_truth(path, len(names), getattr(trainer, "datamodule", None)) if ids.ndim == 2 else None
            self.record(save_prediction(ids, rgb, Path(path).stem, out, names, truth))
