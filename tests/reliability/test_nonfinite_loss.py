"""A NaN or inf loss in a real (tiny) fit: ``nonfinite_loss: raise`` stops naming the step, ``skip`` drops
the batch without letting the NaN into the weights or the BatchNorm statistics."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import run_cli  # noqa: E402
from tasks.common.guards import NonFiniteLossError  # noqa: E402

CONF = Path(__file__).resolve().parent / "conf"


class PoisonBatch(L.Callback):
    """Fill the images of the batch at ``step`` with ``value`` (as a corrupt input would)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            batch["image"].fill_(self.value)


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> Path:
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    return generate_masks(tmp_path_factory.mktemp("seg"), SyntheticMaskSpec(num_train=6, num_val=2, size=32))


def _fit(args: list[str], poison: PoisonBatch) -> L.LightningModule:
    cli = run_cli(args, run=False)
    cli.trainer.callbacks.append(poison)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model


def _all_finite(module: torch.nn.Module) -> bool:
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _seg_args(root: Path, tmp_path: Path, policy: str) -> list[str]:
    return ["--config", str(CONF / "seg_tiny.yaml"), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.nonfinite_loss={policy}", "--trainer.limit_val_batches=0"]  # fmt: skip


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "(NaN|infinite)")])
def test_seg_raise_names_the_step(seg_root, tmp_path, value, kind):
    with pytest.raises(NonFiniteLossError, match=rf"training loss is {kind} .* at global step 1\b.*nonfinite_loss"):
        _fit(_seg_args(seg_root, tmp_path, "raise"), PoisonBatch(1, value))


def test_seg_skip_drops_the_batch_and_keeps_weights_and_statistics_finite(seg_root, tmp_path):
    with pytest.warns(UserWarning, match=r"skipped a batch: training loss is NaN .* at global step 1"):
        model = _fit(_seg_args(seg_root, tmp_path, "skip"), PoisonBatch(1, float("nan")))
    assert model.trainer.state.finished and _all_finite(model)


@pytest.fixture(scope="module")
def det_root(tmp_path_factory) -> Path:
    pytest.importorskip("effdet")
    return tmp_path_factory.mktemp("det")


def _det_args(root: Path, tmp_path: Path, policy: str) -> list[str]:
    return ["--config", str(CONF / "det_tiny.yaml"), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.nonfinite_loss={policy}", "--trainer.limit_val_batches=0"]  # fmt: skip


def test_det_raise_names_the_step(det_root, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"training loss is NaN .* at global step 1 \(class_loss=.*box_loss="):
        _fit(_det_args(det_root, tmp_path, "raise"), PoisonBatch(1, float("nan")))


def test_det_skip_drops_the_batch_and_keeps_weights_and_statistics_finite(det_root, tmp_path):
    args = [*_det_args(det_root, tmp_path, "skip"), "--model.init_args.ema_decay=0.9"]
    with pytest.warns(UserWarning, match=r"skipped a batch: training loss is NaN .* at global step 0"):
        model = _fit(args, PoisonBatch(0, float("nan")))
    assert model.trainer.state.finished and _all_finite(model)  # the EMA copy included
