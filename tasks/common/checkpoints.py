"""``ModelCheckpoint`` whose ``last.ckpt`` is always the latest training state.

Lightning's ``ModelCheckpoint(save_last=True)`` (2.6) rewrites ``last.ckpt`` only when a top-k save happens
at the same step, so with a monitored metric ``last.ckpt`` holds the best epoch, not the last one, and
``--ckpt_path last`` resumes from the wrong place; ``save_last="link"`` links to that same best file.
This subclass writes ``last.ckpt`` at the end of every epoch and at every ``every_n_train_steps``
step as well (also before the monitored metric exists, i.e. mid-way through the first epoch). The
CLI gives every plain ``ModelCheckpoint`` of a config this behaviour (:mod:`tasks.lightning_cli`).

What a checkpoint holds (both ``best-*.ckpt`` and ``last.ckpt``): the weights (``state_dict``, with
the EMA copy when the task keeps one), the task's hyperparameters (``hyper_parameters``: the model
settings linked from the data, so prediction and export need no data config), the optimizer and
scheduler states, the loop counters (epoch, global step), the callbacks' states (including the RNG
states of :class:`~tasks.common.checkpoint_io.RngState`) and, for detection, the label -> category id
map. Only the resume needs the optimizer state; prediction and export read the weights and
hyperparameters alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` rewritten at every epoch end (and step interval).

    Takes Lightning's arguments unchanged. ``save_last="link"`` is treated as ``True`` whenever the
    link would point at an older file (a link is still made when a top-k file was written at the
    same step).
    """

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """``last*.ckpt`` for ``--ckpt_path last``: Lightning's search, and the logger's earlier versions.

        Without a ``dirpath`` the checkpoints live in ``<logger dir>/version_N/checkpoints``, and a new run
        gets a new ``N``, where Lightning finds nothing to resume; the newest ``last.ckpt`` of any version
        is meant (Lightning takes the most recently written of the candidates).
        """
        found = set(super()._find_last_checkpoints(trainer))
        resolve = getattr(self, "_ModelCheckpoint__resolve_ckpt_dir", None)  # Lightning's own folder rule
        if found or self.dirpath is not None or resolve is None:
            return found
        this_run = Path(resolve(trainer))
        if this_run.parent.name.startswith("version_"):
            pattern = f"version_*/{this_run.name}/{self.CHECKPOINT_NAME_LAST}*{self.FILE_EXTENSION}"
            found = {str(p) for p in this_run.parent.parent.glob(pattern)}
        return found

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the folder as Lightning does; note whether this run trains."""
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; outside ``fit`` without Lightning's warning that the folder changed.

        Validate, test and predict save nothing, so which best/last files the state names does not matter.
        """
        if not getattr(self, "_fitting", True):
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)

    def _save_latest(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` unless nothing is due (not fitting, sanity check, already saved at this step)."""
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        link, self.save_last = self.save_last, True  # a link would point at an older top-k file
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self.save_last = link

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,  # noqa: ANN401 - whatever training_step returned
        batch: Any,  # noqa: ANN401
        batch_idx: int,
    ) -> None:
        """Lightning's step-interval save; when it defers (no metric yet), write ``last.ckpt`` now anyway.

        Not on the epoch's last batch: the epoch-end save follows at that same step, and it must stay
        free to write the top-k file.
        """
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        last_batch = getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False)
        if due and self._defer_save_until_validation and not last_batch:
            self._save_latest(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's save, then ``last.ckpt`` if no file was written at this step."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's save, then ``last.ckpt`` if no file was written at this step."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)
