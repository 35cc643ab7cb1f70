"""The CLI end to end on generated data: fit, resume, predict (tiled), export, and that it learns."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import main, run_cli  # noqa: E402
from tasks.cli import main as effbackbone_main  # noqa: E402
from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks, write_split  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "seg_unet_b0.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    spec = SyntheticMaskSpec(num_train=8, num_val=4, size=64)
    generate_masks(root, spec)
    # Larger than the 64-pixel tiles of the config, odd sizes: predicted in overlapping tiles.
    write_split(root, "large", SyntheticMaskSpec(size=(70, 150), seed=5), 2)
    return root


def _args(data, out, *extra):
    return [
        "--config", str(CONF), f"--data.root={data}", f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_fast_dev_run(data, tmp_path, precision):
    # Through the console script's entry point: `effbackbone fit --config ...`; bf16 autocast runs on CPU too.
    args = ["fit", *_args(data, tmp_path), "--trainer.fast_dev_run=true", f"--trainer.precision={precision}"]
    assert effbackbone_main(args) == 0


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cli = run_cli(["fit", *_args(data, out)])
    return cli, out


def test_fit_writes_checkpoints_metrics_and_overlays(trained):
    cli, _ = trained
    ckpt = cli.trainer.checkpoint_callback
    assert Path(ckpt.best_model_path).name == "best.ckpt" and Path(ckpt.last_model_path).name == "last.ckpt"
    log_dir = Path(cli.trainer.log_dir)
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/miou", "val/iou_background", "val/dice_triangle", "train/miou", "val/pixel_acc"} <= set(header)
    overlay = Image.open(log_dir / "overlays" / "epoch_000.png")
    assert overlay.width > 3 * 64 and overlay.mode == "RGB"
    # Linked from the data module: names from classes.json, ImageNet statistics.
    assert cli.model.class_names == ["background", "ellipse", "square", "triangle"] and cli.model.num_classes == 4


def test_resume_restores_optimizer_scheduler_and_epoch(data, trained, tmp_path):
    cli, _ = trained
    last = cli.trainer.checkpoint_callback.last_model_path
    first = torch.load(last, weights_only=True)  # weights-only loadable (AtomicCheckpointIO reads it so)
    resumed = run_cli(["fit", *_args(data, tmp_path), f"--ckpt_path={last}", "--trainer.max_epochs=2"])
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 2 * first["global_step"]
    second = torch.load(resumed.trainer.checkpoint_callback.last_model_path, weights_only=True)
    steps = {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert steps == {2.0 * first["global_step"]}  # Adam moments continued, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 2
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.003 * 0.25)


def test_predict_tiles_large_images_to_mask_and_overlay_pngs(data, trained, tmp_path):
    cli, _ = trained
    best = cli.trainer.checkpoint_callback.best_model_path
    out = tmp_path / "pred"
    predicted = run_cli([
        "predict", *_args(data, tmp_path), f"--ckpt_path={best}", f"--data.predict_dir={data / 'large' / 'images'}",
        f"--trainer.callbacks.init_args.output_dir={out}",
    ])  # fmt: skip
    assert predicted.model.tile_size == 64
    for name in ("large_0000", "large_0001"):
        mask = Image.open(out / f"{name}_mask.png")
        assert mask.mode == "P" and mask.size == (150, 70)
        assert set(np.unique(np.array(mask))) <= {0, 1, 2, 3}
        overlay = Image.open(out / f"{name}_overlay.png")  # enlarged 4x (shorter side >= 256), legend below
        assert overlay.width == 4 * 150 and overlay.height > 4 * 70
        panel = Image.open(out / f"{name}_panel.png")  # the large split has masks: image | truth | pred | errors
        assert panel.width > 4 * 150


def test_export_is_dynamic_in_batch_height_and_width(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    cli, _ = trained
    onnx_path = tmp_path / "seg.onnx"
    assert main(["export", "--ckpt", cli.trainer.checkpoint_callback.best_model_path,
                 "--output", str(onnx_path), "--height", "64", "--width", "96"]) == 0  # fmt: skip
    assert f"export: {tmp_path} (2 files: seg.onnx, seg.onnx.json)" in capsys.readouterr().out
    import json

    info = json.loads(Path(f"{onnx_path}.json").read_text())
    assert info["input"]["shape"] == ["batch", 3, "height", "width"] and info["class_names"][1] == "ellipse"
    assert info["max_abs_diff"] < 1e-4 and len(info["verified_sizes"]) == 2  # onnxruntime at two sizes
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = cli.model.eval()
    for shape in ((1, 3, 45, 77), (3, 3, 128, 64)):  # odd and other sizes than the export example
        x = torch.randn(shape)
        got = session.run(["logits"], {"image": x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (shape[0], 4, *shape[2:]) and np.abs(got - expected).max() < 1e-4


def test_static_export_fixes_height_and_width(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cli, _ = trained
    onnx_path = tmp_path / "static.onnx"
    assert main(["export", "--ckpt", cli.trainer.checkpoint_callback.best_model_path, "--output", str(onnx_path),
                 "--static", "--height", "64", "--width", "96", "--no-verify"]) == 0  # fmt: skip
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[2:] == [64, 96]
    assert session.run(["logits"], {"image": np.zeros((2, 3, 64, 96), np.float32)})[0].shape == (2, 4, 64, 96)


def test_overlays_go_to_tensorboard(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_cli([
        "fit", *_args(data, tmp_path), "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path}", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
    ])  # fmt: skip
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "overlays" / "epoch_000.png").is_file()
    events = EventAccumulator(str(log_dir)).Reload()
    assert "val/overlays" in events.Tags()["images"] and "val/miou" in events.Tags()["scalars"]


def test_learns(tmp_path):
    """48 generated 64x64 images, 3 classes, 60 steps: val mIoU must rise well above an untrained model's."""
    root = generate_masks(tmp_path / "d", SyntheticMaskSpec(num_train=48, num_val=16, size=64, num_shapes=2))
    conf = CONF.parent / "seg_learn.yaml"
    args = ["--config", str(conf), f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}"]
    cli = run_cli(args, run=False)
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/miou"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = float(cli.trainer.callback_metrics["val/miou"])
    print(f"val mIoU before {before:.3f} after {after:.3f}")
    assert before < 0.45 and after > 0.7, (before, after)


@pytest.mark.slow
def test_quickstart_one_epoch(tmp_path, capsys):
    """`effbackbone quickstart` end to end, shortened to one epoch (the full run takes about 3 CPU minutes)."""
    out = tmp_path / "runs"
    code = effbackbone_main(["quickstart", f"--root={tmp_path / 'data'}", f"--output={out}", "--trainer.max_epochs=1"])
    printed = capsys.readouterr().out
    assert code == 0 and "val mIoU (best checkpoint):" in printed and "last checkpoint:" in printed
    assert len(list(out.glob("lightning_logs/version_0/predictions/*_overlay.png"))) == 4
    assert len(list(out.glob("lightning_logs/version_0/predictions/*_panel.png"))) == 4  # large/ has masks
    assert "training curves:" in printed and (out / "lightning_logs/version_0/curves.png").is_file()
    assert list(out.glob("lightning_logs/version_0/checkpoints/best-*.ckpt"))
