"""What the segmentation and detection prediction writers share: where they write, and the hook.

Lightning's ``write_on_batch_end`` has a long fixed signature; the writers only need the trainer, the
module and the batch's prediction, so they implement :meth:`PredictionWriter.write_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


def run_subdir(trainer: L.Trainer, name: str, override: str | Path | None = None) -> Path:
    """``override`` if given, else ``<the trainer's log dir>/<name>`` (the run's own folder)."""
    if override:
        return Path(override)
    return Path(trainer.log_dir or trainer.default_root_dir) / name


class PredictionWriter(BasePredictionWriter):
    """A batch-interval prediction writer whose files go to ``output_dir`` or ``<log dir>/predictions``.

    Args:
        output_dir: Where to write (default ``<log dir>/predictions``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def output_path(self, trainer: L.Trainer) -> Path:
        """The folder this run's predictions go to."""
        return run_subdir(trainer, "predictions", self.output_dir)

    def write_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any) -> None:  # noqa: ANN401
        """Handle one batch's ``predict_step`` output."""
        raise NotImplementedError

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,  # noqa: ANN401 - whatever predict_step returned
        batch_indices: Sequence[int] | None,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Lightning's hook: passes the prediction on to :meth:`write_batch`."""
        self.write_batch(trainer, pl_module, prediction)
