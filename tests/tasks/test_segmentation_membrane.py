"""The membrane recipe on the real ISBI 2012 data (skipped, naming the dataset, when it is absent)."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import run_cli  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "segmentation" / "membrane_unet_b0.yaml"


def test_membrane_config_reads_the_data_and_runs_a_step(membrane_data, tmp_path):
    root = membrane_data
    args = [
        "fit", "--config", str(CONFIG), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
    ]  # fmt: skip
    cli = run_cli(args)
    model, data = cli.model, cli.datamodule
    assert (data.num_classes, data.class_names, data.in_channels) == (2, ["membrane", "cell"], 1)
    assert (model.mode, model.num_classes, model.in_channels) == ("binary", 2, 1)
    train = next(iter(data.train_dataloader()))
    assert train["image"].shape == (4, 1, 256, 256) and set(train["mask"].unique().tolist()) <= {0, 1}
    val = next(iter(data.val_dataloader()))
    assert val["image"].shape == (2, 1, 512, 512)
    assert len(data.datasets["train"]) == 4 * 24 and len(data.datasets["val"]) == 6
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])
