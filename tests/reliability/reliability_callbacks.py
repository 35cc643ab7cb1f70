"""Callbacks that the subprocess tests name in their configs (``PYTHONPATH`` includes this folder)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch


class HangAtStep(L.Callback):
    """With ``EB_HANG_AT_STEP=<n>`` set, block at the start of the batch after step ``n``.

    The batch-end checkpoint of step ``n`` is written by then, so the test can kill the process at
    a known point mid-epoch instead of racing it; ``EB_HANG_MARKER`` is touched when it blocks.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = os.environ.get("EB_HANG_AT_STEP")
        if step is not None and trainer.global_step == int(step):
            Path(os.environ["EB_HANG_MARKER"]).write_text(f"epoch {trainer.current_epoch} batch {batch_idx}\n")
            while True:
                time.sleep(1)


class DumpMetrics(L.Callback):
    """Write ``trainer.callback_metrics`` as json to ``path`` (rank 0) when validation/fit ends.

    At the end of ``fit`` the final weights go to ``<path>.pt`` too.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _dump(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            metrics["global_step"] = trainer.global_step
            metrics["world_size"] = trainer.world_size
            Path(self.path).write_text(json.dumps(metrics, indent=1, sort_keys=True))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer)
        if trainer.is_global_zero:
            torch.save(pl_module.state_dict(), f"{self.path}.pt")
