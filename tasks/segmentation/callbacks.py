"""Segmentation callback: a few validation predictions drawn each epoch, next to image and truth.

Plots live here rather than in ``validation_step``: the task only returns its predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from tasks.common.writers import run_subdir
from tasks.segmentation.viz import multilabel_to_ids, render_panel, to_rgb


def _display(image: Tensor, datamodule: Any) -> np.ndarray:  # noqa: ANN401 - any data module
    """A normalised C x H x W image as HxWx3 uint8, through the data module's ``denormalize`` if it has one."""
    denormalize = getattr(datamodule, "denormalize", None)
    if denormalize is not None:
        unit = denormalize(image.float())
    else:  # stretch to [0, 1]: enough to see the content
        unit = (image - image.amin()) / (image.amax() - image.amin()).clamp_min(1e-6)
    return to_rgb(unit.permute(1, 2, 0).cpu().numpy())


def _ids(labels: Tensor) -> np.ndarray:
    array = labels.cpu().numpy()
    return multilabel_to_ids(array) if array.ndim == 3 else array


def spread_sample(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``0..total-1`` (first and last included), sorted and distinct.

    Consecutive images of a dataset are often near-duplicates (video frames, tiles of one slide), so the
    first ``count`` would show one scene; spread indices show the range of the split.
    """
    if total <= 0 or count <= 0:
        return []
    n = min(count, total)
    return sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)})


def _eval_length(trainer: L.Trainer) -> int:
    """Samples this rank's validation loop goes through (after ``limit_val_batches``)."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, Sequence) else loaders
    batches = trainer.num_val_batches
    n_batches = batches[0] if isinstance(batches, Sequence) else batches
    try:
        total = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
    except (AttributeError, TypeError):
        return 0
    batch_size = getattr(loader, "batch_size", None)
    if batch_size and n_batches is not None and n_batches != float("inf"):
        total = min(total, int(n_batches) * batch_size)
    return total


class SegmentationOverlays(Callback):
    """Save ``num_samples`` validation images with ground truth and prediction side by side.

    Each validation epoch writes ``<log dir>/overlays/epoch_<n>.png`` (and an image to TensorBoard
    when a ``TensorBoardLogger`` is attached). The samples are spread evenly over the validation split
    (its first and last image included) and are the same every epoch, so the PNGs show the model learning.

    Args:
        num_samples: Rows in each panel.
        every_n_epochs: Draw every n-th validation epoch.
        min_side: Small images are enlarged (nearest) to at least this many pixels.
    """

    def __init__(self, num_samples: int = 4, every_n_epochs: int = 1, min_side: int = 160) -> None:
        super().__init__()
        self.num_samples, self.every_n_epochs, self.min_side = num_samples, every_n_epochs, min_side
        self._rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
        self._wanted: set[int] = set()
        self._seen = 0
        self.last_path: Path | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a new panel and choose which samples go in it."""
        self._rows, self._seen = [], 0
        self._wanted = set(spread_sample(_eval_length(trainer), self.num_samples)) if self._active(trainer) else set()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,  # noqa: ANN401 - whatever validation_step returned
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the chosen samples' image, truth and prediction (cropped to each sample's own size)."""
        first, self._seen = self._seen, self._seen + len(batch["image"])
        if dataloader_idx or not isinstance(outputs, dict) or "preds" not in outputs:
            return
        sizes = batch["size"].tolist() if "size" in batch else [batch["image"].shape[-2:]] * len(batch["image"])
        for i in range(len(batch["image"])):
            if first + i not in self._wanted:
                continue
            h, w = sizes[i]
            rgb = _display(batch["image"][i, :, :h, :w], trainer.datamodule)
            truth = _ids(batch["mask"][i][..., :h, :w]) if "mask" in batch else None
            self._rows.append((rgb, truth, _ids(outputs["preds"][i][..., :h, :w])))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render and save the panel (here rather than at epoch end: the epoch's mIoU is logged by now)."""
        if not self._active(trainer):
            return
        out_dir = run_subdir(trainer, "overlays")  # on every rank: trainer.log_dir is a collective under DDP
        if not self._rows or not trainer.is_global_zero:
            return
        rows = self._rows
        names = getattr(pl_module, "class_names", None) or [str(i) for i in range(1 + max(r[2].max() for r in rows))]
        miou = trainer.callback_metrics.get("val/miou")
        title = f"epoch {trainer.current_epoch}" + (f"  val mIoU {float(miou):.3f}" if miou is not None else "")
        panel = render_panel(rows, names, title=title, min_side=self.min_side)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = out_dir / f"epoch_{trainer.current_epoch:03d}.png"
        panel.save(self.last_path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/overlays", np.asarray(panel), trainer.global_step, dataformats="HWC")
