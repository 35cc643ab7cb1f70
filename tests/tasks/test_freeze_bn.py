"""``freeze_bn_stats``: BatchNorm trains in eval mode (statistics kept, scale and shift learned); and checkpoints of a
plain ``Trainer.fit`` (no LightningCLI ``_class_path``) load as the task that wrote them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import run_cli  # noqa: E402
from tasks.export import DEFAULT_CLASS, load_task, task_class_of  # noqa: E402
from tasks.segmentation import SegmentationTask  # noqa: E402
from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = {"decoder_channels": [16, 16, 8, 8, 8]}


def _fit(task: SegmentationTask, root: Path, steps: int = 3) -> L.Trainer:
    torch.manual_seed(0)
    batches = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))} for _ in range(steps)]
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip  # two epochs: Lightning puts the module back in train mode at each epoch start
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def _norms(task: SegmentationTask) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in task.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "plain"])
def test_freeze_bn_stats_keeps_the_statistics_and_trains_the_rest(tmp_path: Path, frozen: bool) -> None:
    task = SegmentationTask(variant="b0", num_classes=2, decoder_options=SMALL, freeze_bn_stats=frozen, ema_decay=0.9)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    _fit(task, tmp_path)
    after = task.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    affine = [f"{n}.weight" for n in _norms(task)]
    assert len(stats) == 3 * len(_norms(task)) > 30
    assert all(torch.equal(before[k], after[k]) for k in stats) == frozen
    assert any(not torch.equal(before[k], after[k]) for k in affine)  # BN scales still learn
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("conv_pw.weight"))
    assert task.model.training and any(m.training for m in _norms(task).values()) != frozen  # BN: eval iff frozen


def test_freeze_bn_stats_with_batch_renorm_is_refused() -> None:
    with pytest.raises(ValueError, match="freeze_bn_stats and batch_renorm"):
        SegmentationTask(variant="b0", num_classes=2, decoder_options=SMALL, freeze_bn_stats=True, batch_renorm=True)


def test_segmentation_cli_fast_dev_run_with_freeze_bn_stats(tmp_path: Path) -> None:
    data = generate_masks(tmp_path / "data", SyntheticMaskSpec(num_train=4, num_val=2, size=32))
    cli = run_cli([
        "fit", "--config", str(CONF / "seg_unet_b0.yaml"), f"--data.root={data}", "--data.image_size=32",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.fast_dev_run=true", "--model.init_args.freeze_bn_stats=true",
    ])  # fmt: skip
    assert cli.model.freeze_bn_stats and cli.model.hparams["freeze_bn_stats"] is True
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss_step"]))


def test_plain_trainer_checkpoints_load_as_their_task(tmp_path: Path) -> None:
    """No ``_class_path`` (a checkpoint of ``Trainer.fit`` from Python): the state dict names the task."""
    pytest.importorskip("effdet")
    from tasks.detection import DetectionTask

    segmentation = SegmentationTask(variant="b0", num_classes=2, decoder_options=SMALL)
    trainer = _fit(segmentation, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "seg.ckpt")
    assert "_class_path" not in torch.load(tmp_path / "seg.ckpt", weights_only=False)["hyper_parameters"]
    assert type(load_task(tmp_path / "seg.ckpt")) is SegmentationTask
    detection = DetectionTask(num_classes=2, image_size=128, freeze_bn_stats=True)
    assert task_class_of(detection.state_dict()) == "tasks.detection.DetectionTask"
    assert task_class_of(segmentation.state_dict()) == DEFAULT_CLASS
    checkpoint = {"state_dict": detection.state_dict(), "hyper_parameters": dict(detection.hparams),
                  "pytorch-lightning_version": L.__version__}  # fmt: skip
    torch.save(checkpoint, tmp_path / "det.ckpt")
    loaded = load_task(tmp_path / "det.ckpt")
    assert type(loaded) is DetectionTask and loaded.freeze_bn_stats
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.detector.model(x), detection.eval().detector.model(x))
