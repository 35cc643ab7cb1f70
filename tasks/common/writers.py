"""What the segmentation and detection prediction writers share: where they write, the hook, the report.

Lightning's ``write_on_batch_end`` has a long fixed signature; the writers only need the trainer, the
module and the batch's prediction, so they implement :meth:`PredictionWriter.write_batch`. Each writer
records the files it writes, and prints the folder and the count of files when prediction ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


def run_subdir(trainer: L.Trainer, name: str, override: str | Path | None = None) -> Path:
    """``override`` if given, else ``<the trainer's log dir>/<name>`` (the run's own folder)."""
    if override:
        return Path(override)
    return Path(trainer.log_dir or trainer.default_root_dir) / name


def describe_files(paths: Iterable[Path]) -> str:
    """``"4 files: 2 *_mask.png, 2 *_overlay.png"``: the count, by the part of the name after the stem."""
    paths = list(paths)
    kinds = Counter(f"*_{p.name.rsplit('_', 1)[-1]}" if "_" in p.stem else p.name for p in paths)
    detail = ", ".join(f"{n} {kind}" if n > 1 or kind.startswith("*") else kind for kind, n in sorted(kinds.items()))
    return f"{len(paths)} file{'s' if len(paths) != 1 else ''}" + (f": {detail}" if detail else "")


class PredictionWriter(BasePredictionWriter):
    """A batch-interval prediction writer whose files go to ``output_dir`` or ``<log dir>/predictions``.

    ``effbackbone predict`` runs without a logger, so ``<log dir>`` is the trainer's ``default_root_dir``
    there: the config's ``runs/<name>/predictions``, rewritten by each call.

    Args:
        output_dir: Where to write (default ``<log dir>/predictions``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.written: list[Path] = []

    def output_path(self, trainer: L.Trainer) -> Path:
        """The folder this run's predictions go to."""
        return run_subdir(trainer, "predictions", self.output_dir)

    def record(self, paths: Iterable[Path]) -> None:
        """Note files written (they are counted in the report at the end of prediction)."""
        self.written.extend(paths)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a new count."""
        self.written = []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print where the predictions went and how many files were written (rank 0)."""
        folder = self.output_path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            print(f"predictions: {folder} ({describe_files(self.written)})")

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
