"""Progressive learning (tasks/common/progressive.py): stages switch at the right epochs, resume to the same state."""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("segmentation_models_pytorch")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from tasks.cli import run_cli  # noqa: E402
from tasks.common.checkpoint_io import RngState  # noqa: E402
from tasks.common.progressive import ProgressiveLearning, Stage, resolve_schedule  # noqa: E402
from tasks.common.regularization import drop_path_rates, set_drop_path_rate, set_dropout  # noqa: E402
from tasks.segmentation import MaskDataModule, SegmentationTask  # noqa: E402
from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = {"decoder_channels": [16, 16, 8, 8, 8]}
# Three explicit stages: size, drop path and RandAugment magnitude all change at epochs 1 and 2.
STAGES = [
    {"epoch": 0, "image_size": 32, "drop_path_rate": 0.0, "magnitude": 5},
    {"epoch": 1, "image_size": 64, "drop_path_rate": 0.1, "magnitude": 10},
    {"epoch": 2, "image_size": 96, "drop_path_rate": 0.2, "magnitude": 15},
]


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    return generate_masks(tmp_path_factory.mktemp("seg"), SyntheticMaskSpec(num_train=6, num_val=2, size=32))


def test_num_stages_follow_efficientnetv2_algorithm_1():
    config = {"num_stages": 4, "image_size": [128, 256], "drop_path_rate": [0.0, 0.3], "magnitude": [5, 15]}
    schedule = resolve_schedule(config, max_epochs=10, size_multiple=32)
    assert len(schedule.stages) == 4
    for i, stage in enumerate(schedule.stages):
        t = i / 3  # V2: value_i = first + (last - first) * i / (M - 1)
        assert stage.image_size == 32 * round((128 + 128 * t) / 32)
        assert stage.drop_path_rate == pytest.approx(0.3 * t) and stage.magnitude == pytest.approx(5 + 10 * t)
    for epoch in range(10):  # equal stages: epoch e trains stage floor(e * M / E)
        assert schedule.index_at(epoch) == epoch * 4 // 10
    # Fewer epochs than stages (fast_dev_run): the first epoch still trains the first stage.
    assert resolve_schedule(config, max_epochs=1, size_multiple=32).index_at(0) == 0
    constant = resolve_schedule({"num_stages": 2, "image_size": 64}, max_epochs=4, size_multiple=32)
    assert [s.image_size for s in constant.stages] == [64, 64]


def test_explicit_stages_and_bad_blocks_are_refused_with_a_fix():
    schedule = resolve_schedule({"stages": STAGES}, max_epochs=None, size_multiple=32)
    assert schedule.stages[1] == Stage(epoch=1, image_size=64, drop_path_rate=0.1, magnitude=10)
    assert [schedule.index_at(e) for e in range(5)] == [0, 1, 2, 2, 2]
    bad = {
        "unknown progressive key.*'size'": {"num_stages": 2, "size": [1, 2]},
        "either 'stages'.*or 'num_stages'": {"stages": STAGES, "num_stages": 2},
        "must start at epoch 0 and increase": {"stages": [STAGES[1], STAGES[0]]},
        "image_size 100 is not a positive multiple of 32.*use 96 or 128": {"stages": [{"epoch": 0,
                                                                                         "image_size": 100}]},
        "drop_path_rate must be in": {"num_stages": 2, "drop_path_rate": [0, 1.5]},
        "sets nothing": {"num_stages": 2},
        "needs its first epoch": {"stages": [{"image_size": 64}]},
    }  # fmt: skip
    for message, config in bad.items():
        with pytest.raises(ValueError, match=message):
            resolve_schedule(config, max_epochs=4, size_multiple=32)
    with pytest.raises(ValueError, match="set trainer.max_epochs"):
        resolve_schedule({"num_stages": 2, "image_size": [32, 64]}, max_epochs=-1, size_multiple=32)
    with pytest.raises(ValueError, match="unknown progressive key"):  # at construction, not when the fit starts
        SegmentationTask(num_classes=2, decoder_options=SMALL, progressive={"num_stage": 2})


def test_regularisation_changes_without_touching_parameters():
    task = SegmentationTask(num_classes=2, decoder_options=SMALL)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    params = [id(p) for p in task.parameters()]
    n = set_drop_path_rate(task.encoder, 0.2)
    built = SegmentationTask(num_classes=2, decoder_options=SMALL, encoder_options={"drop_path_rate": 0.2})
    assert drop_path_rates(task.encoder) == drop_path_rates(built.encoder)  # the ramp the encoder is built with
    assert max(drop_path_rates(task.encoder)) == pytest.approx(0.2 * (n - 1) / n)
    assert [id(p) for p in task.parameters()] == params
    assert task.state_dict().keys() == before.keys()
    assert set_dropout(task.network, 0.3) == 0  # a U-Net has no dropout layer
    task_dl = SegmentationTask(num_classes=2, decoder="deeplabv3plus")
    assert set_dropout(task_dl.network, 0.3) > 0
    assert all(m.p == 0.3 for m in task_dl.network.modules() if isinstance(m, torch.nn.Dropout))


def test_staged_pipelines_follow_the_epoch_in_persistent_workers(seg_data):
    data = MaskDataModule(str(seg_data), image_size=32, batch_size=2, num_workers=1,
                          randaugment={"num_ops": 2, "magnitude": 9})  # fmt: skip
    data.setup("fit")
    data.set_progressive(resolve_schedule({"stages": STAGES}, None, 32))
    loader = data.train_dataloader()
    for epoch, stage in [(0, STAGES[0]), (2, STAGES[2]), (1, STAGES[1])]:
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        batch = next(iter(loader))
        assert batch["image"].shape[-2:] == (stage["image_size"],) * 2
        assert set(batch["mask"].unique().tolist()) <= {-100, 0, 1, 2, 3}  # shifted-in pixels are ignored
    with pytest.raises(ValueError, match="RandAugment is off: set data.init_args.randaugment"):
        MaskDataModule(str(seg_data), image_size=32).set_progressive(resolve_schedule({"stages": STAGES}, None, 32))


def test_keep_scale_crops_smaller_regions_at_the_data_scale(seg_data):
    data = MaskDataModule(str(seg_data), image_size=64, crop_scale=(0.2, 0.4))
    data.setup("fit")
    config = {"num_stages": 2, "image_size": [32, 64]}
    for keep_scale, first_scale in ((False, (0.2, 0.4)), (True, (0.05, 0.1))):  # area x (32 / 64)^2
        data.set_progressive(resolve_schedule({**config, "keep_scale": keep_scale}, max_epochs=2, size_multiple=32))
        transform = data.datasets["train"].transform
        for epoch, (scale, size) in enumerate([(first_scale, 32), ((0.2, 0.4), 64)]):
            transform.set_epoch(epoch)
            crop = transform.pipeline.transforms[0]
            assert crop.scale == pytest.approx(scale) and crop.size == (size, size)
    with pytest.raises(ValueError, match="keep_scale must be true or false"):
        resolve_schedule({**config, "keep_scale": "yes"}, max_epochs=2, size_multiple=32)


class _Record(L.Callback):
    """Per epoch: input side, encoder drop-path rates, the data pipeline's stage, optimizer identity and steps."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, object]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch in self.epochs:
            return
        optimizer = trainer.optimizers[0]
        steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
        transform = trainer.datamodule.datasets["train"].transform
        self.epochs[trainer.current_epoch] = {
            "size": batch["image"].shape[-1], "rates": drop_path_rates(pl_module.encoder),
            "pipeline": transform.stage_values(trainer.current_epoch), "index": transform._index,
            "optimizer": id(optimizer), "model": id(pl_module.model), "steps": max(steps, default=0),
        }  # fmt: skip


def _fit(root, out, max_epochs, ckpt_path=None):
    task = SegmentationTask(num_classes=4, decoder_options=SMALL, progressive={"stages": STAGES},
                            optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))  # fmt: skip
    data = MaskDataModule(str(root), image_size=32, batch_size=2, randaugment={"num_ops": 2, "magnitude": 9})
    record = _Record()
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=str(out),
        callbacks=[record, RngState(), ModelCheckpoint(dirpath=str(out), filename="{epoch}", save_top_k=-1)],
    )  # fmt: skip
    L.seed_everything(0)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return trainer, record


def test_stages_switch_at_their_epochs_and_a_resumed_run_reaches_the_same_state(seg_data, tmp_path):
    trainer, record = _fit(seg_data, tmp_path / "full", max_epochs=3)
    for epoch, stage in enumerate(STAGES):
        seen = record.epochs[epoch]
        assert seen["size"] == stage["image_size"]
        assert max(seen["rates"]) == pytest.approx(stage["drop_path_rate"] * 15 / 16)  # B0: 16 blocks
        assert seen["pipeline"] == (stage["image_size"], stage["magnitude"]) and seen["index"] == epoch
        assert seen["steps"] == 3 * epoch + 1  # 6 images, batch 2: the optimizer state carries over
    assert len({r["optimizer"] for r in record.epochs.values()}) == 1  # never rebuilt
    assert len({r["model"] for r in record.epochs.values()}) == 1
    metrics = trainer.callback_metrics
    assert metrics["train/image_size"] == 96 and metrics["train/magnitude"] == 15
    # Resumed from the end of epoch 1 (stage 1 of 3): epoch 2 switches to stage 2 and ends on the same weights.
    resumed, again = _fit(seg_data, tmp_path / "resumed", max_epochs=3, ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert list(again.epochs) == [2]
    assert {k: v for k, v in again.epochs[2].items() if k not in ("optimizer", "model")} == {
        k: v for k, v in record.epochs[2].items() if k not in ("optimizer", "model")
    }
    full, end = trainer.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    for key, value in full.items():
        torch.testing.assert_close(end[key], value, rtol=0, atol=0, msg=key)


def test_segmentation_cli_fast_dev_run_with_progressive_and_randaugment(seg_data, tmp_path):
    cli = run_cli([
        "fit", "--config", str(CONF / "seg_unet_b0.yaml"), "--config", str(CONF / "seg_progressive.yaml"),
        f"--data.root={seg_data}", "--data.image_size=32", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true",
    ])  # fmt: skip
    assert any(isinstance(c, ProgressiveLearning) for c in cli.trainer.callbacks)
    assert cli.datamodule.randaugment is not None
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss_step"]))
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
