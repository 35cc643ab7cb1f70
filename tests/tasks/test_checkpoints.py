"""``last.ckpt`` is the latest state: every epoch, every ``every_n_train_steps``, and ``--ckpt_path last`` finds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

from tasks.common.checkpoint_io import AtomicCheckpointIO  # noqa: E402
from tasks.common.checkpoints import ModelCheckpoint  # noqa: E402


class Tiny(L.LightningModule):
    """A linear model whose validation score peaks at epoch 0 (so top-k saves happen then only)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/score", -float(self.current_epoch))  # best (max) at epoch 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 steps per epoch


def _trainer(tmp_path: Path, epochs: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, plugins=[AtomicCheckpointIO()])  # fmt: skip


def test_last_holds_the_latest_epoch_while_best_stays_at_epoch_0(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_last=True, filename="best")
    _trainer(tmp_path, 3, [ckpt]).fit(Tiny(), _loader(), _loader())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 12)  # the third epoch (0-based), 3 x 4 steps
    assert best["epoch"] == 0


def test_plain_lightning_checkpoint_keeps_the_best_as_last(tmp_path):
    """What the subclass fixes: Lightning 2.6 rewrites last.ckpt only together with a top-k save."""
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    ckpt = LightningModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_last=True)
    _trainer(tmp_path, 3, [ckpt]).fit(Tiny(), _loader(), _loader())
    if torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 2:
        pytest.skip("this Lightning version already keeps last.ckpt at the latest epoch")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0


class _ReadLast(Callback):
    """Records the global step stored in last.ckpt at the start of each training batch."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.path.is_file():
            self.seen.append((trainer.global_step, torch.load(self.path, weights_only=True)["global_step"]))


def test_last_is_written_every_n_train_steps_also_before_the_first_validation(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    reader = _ReadLast(path)
    ckpt = ModelCheckpoint(dirpath=path.parent, monitor="val/score", mode="max", save_last=True,
                           every_n_train_steps=1, filename="best")  # fmt: skip
    _trainer(tmp_path, 1, [reader, ckpt]).fit(Tiny(), _loader(), _loader())
    # Each batch after the first sees the state of the step before it (val/score does not exist yet).
    assert reader.seen == [(1, 1), (2, 2), (3, 3)]
    assert torch.load(path, weights_only=True)["global_step"] == 4


def test_link_mode_writes_the_latest_state_too(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_last="link", filename="b")
    _trainer(tmp_path, 2, [ckpt]).fit(Tiny(), _loader(), _loader())
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_ckpt_path_last_finds_the_previous_version_and_resumes_from_its_last_epoch(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    def trainer(epochs: int) -> L.Trainer:
        return L.Trainer(default_root_dir=tmp_path, max_epochs=epochs, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                         callbacks=[ModelCheckpoint(monitor="val/score", mode="max", save_last=True)])  # fmt: skip

    trainer(2).fit(Tiny(), _loader(), _loader())
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    resumed = trainer(3)
    resumed.fit(Tiny(), _loader(), _loader(), ckpt_path="last")  # a new version_1: last.ckpt is in version_0
    assert resumed.ckpt_path is not None and "version_0" in str(resumed.ckpt_path)
    assert resumed.global_step == 12  # 2 epochs restored + 1 trained
