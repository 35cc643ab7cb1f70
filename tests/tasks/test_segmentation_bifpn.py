"""SegmentationTask(decoder="bifpn"): any size, the task options, the CLI, ONNX export, and that it learns."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("effdet")
pytest.importorskip("segmentation_models_pytorch")

import lightning as L  # noqa: E402

from tasks.cli import main, run_cli  # noqa: E402
from tasks.segmentation import SegmentationTask  # noqa: E402
from tasks.segmentation.export import export_segmentation_onnx  # noqa: E402
from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "seg_bifpn_b0.yaml"
TINY = {"fpn_channels": 16, "fpn_repeats": 1, "head_repeats": 1}


def _task(**kw):
    kw.setdefault("decoder_options", TINY)
    return SegmentationTask(decoder="bifpn", **kw)


@pytest.mark.parametrize(("variant", "options"), [("b0", {}), ("lite0", {"min_level": 3, "max_level": 6})])
def test_forward_pads_to_the_bifpn_multiple_and_crops_back(variant, options):
    task = _task(variant=variant, num_classes=3, decoder_options={**TINY, **options}).eval()
    assert task.size_divisibility == 2 ** options.get("max_level", 7)
    with torch.no_grad():
        for size in ((45, 70), (129, 33)):
            assert task(torch.randn(1, 3, *size)).shape == (1, 3, *size)


def test_binary_mode_losses_and_ignored_pixels():
    task = _task(mode="binary", num_classes=2, loss="ce+dice", in_channels=1, channels_last=True)
    image, target = torch.randn(2, 1, 64, 64), torch.randint(0, 2, (2, 64, 64))
    target[..., :8] = -100
    logits = task(image)
    assert logits.shape == (2, 1, 64, 64)
    loss = task.criterion(logits, target)
    loss.backward()
    assert all(p.grad is not None for p in task.model.parameters())  # no dead parameters (DDP-safe)
    other = logits.detach().clone()
    other[..., :8] = torch.randn_like(other[..., :8]) * 10
    assert torch.isclose(task.criterion(other, target), loss.detach())  # ignored pixels do not count


def test_tiled_prediction_of_a_large_image():
    task = _task(num_classes=3, tile_size=64).eval()
    probs = task.predict_probabilities(torch.randn(1, 3, 90, 150))
    assert probs.shape == (1, 3, 90, 150)
    assert torch.allclose(probs.sum(1), torch.ones(1, 90, 150), atol=1e-5)


def test_cli_fast_dev_run(tmp_path):
    root = generate_masks(tmp_path / "data", SyntheticMaskSpec(num_train=4, num_val=2, size=64))
    args = ["fit", "--config", str(CONF), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true"]  # fmt: skip
    assert main(args) == 0


def test_onnx_export_any_size(tmp_path):
    pytest.importorskip("onnxruntime")
    task = _task(num_classes=3).eval()
    info = export_segmentation_onnx(task, tmp_path / "bifpn.onnx", height=64, width=96)
    # onnxruntime vs PyTorch at 64x96 and 81x129: neither a multiple of 128, padded in the graph.
    assert info["max_abs_diff"] < 1e-4 and info["verified_sizes"] == [[64, 96], [81, 129]]


def test_learns(tmp_path):
    """The U-Net learning check's data and optimizer, shortened (32 generated 64x64 images, 3 classes, 24 steps),
    with BiFPN: the training loss falls and val mIoU rises well above an untrained model's."""
    root = generate_masks(tmp_path / "d", SyntheticMaskSpec(num_train=32, num_val=16, size=64, num_shapes=2))
    args = ["--config", str(CONF.parent / "seg_learn.yaml"), f"--data.root={root}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=6", "--model.decoder=bifpn",
            "--model.decoder_options={fpn_channels: 32, fpn_repeats: 2, head_repeats: 1, max_level: 6}"]  # fmt: skip
    cli = run_cli(args, run=False)
    losses: list[float] = []
    cli.trainer.callbacks.append(_LossLog(losses))
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/miou"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = float(cli.trainer.callback_metrics["val/miou"])
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # the first and the last epoch
    print(f"loss {first:.3f} -> {last:.3f}, val mIoU before {before:.3f} after {after:.3f}")
    assert last < 0.7 * first and after > before + 0.3, (first, last, before, after)


class _LossLog(L.Callback):
    def __init__(self, losses: list[float]) -> None:
        self.losses = losses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
