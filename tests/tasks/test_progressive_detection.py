"""Progressive learning for EfficientDet: training at stage sizes with anchors per size, evaluation at image_size."""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("effdet")
pytest.importorskip("pycocotools")
pytest.importorskip("jsonargparse")

import lightning as L  # noqa: E402
from effdet import DetBenchTrain  # noqa: E402

from effbackbone.integrations.effdet import create_efficientdet  # noqa: E402
from tasks.cli import run_cli  # noqa: E402
from tasks.common.regularization import drop_path_rates  # noqa: E402
from tasks.detection.sizes import loss_at_size, make_size_flexible  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        class_out, box_out = model(x)
    return [*class_out, *box_out]


def test_a_detector_built_for_256_trains_at_128_exactly_as_one_built_for_128():
    torch.manual_seed(0)
    big = create_efficientdet("d0", 3, image_size=256).eval()
    small = create_efficientdet("d0", 3, image_size=128).eval()
    small.load_state_dict(big.state_dict())
    x = torch.randn(1, 3, 256, 256)
    before = _outputs(big, x)
    assert make_size_flexible(big) > 0 and make_size_flexible(big) == 0  # idempotent
    for a, b in zip(before, _outputs(big, x), strict=True):  # unchanged at the build size
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    target = {"bbox": [torch.tensor([[10.0, 20, 60, 90]]), torch.tensor([[5.0, 5, 100, 50], [50, 50, 120, 120]])],
              "cls": [torch.tensor([1.0]), torch.tensor([2.0, 3])]}  # fmt: skip
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours = loss_at_size(DetBenchTrain(big).eval(), x, target, {})
        native = DetBenchTrain(small).eval()(x, {**target, "img_scale": torch.ones(2),
                                                 "img_size": torch.full((2, 2), 128.0)})  # fmt: skip
    for key in ("loss", "class_loss", "box_loss"):
        torch.testing.assert_close(ours[key], native[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="square inputs with sides a multiple of 128"):
        loss_at_size(DetBenchTrain(big), torch.randn(1, 3, 192, 192), target, {})


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONF / "det_d0.yaml"), "--config", str(CONF / "det_progressive.yaml"),
        f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}", *extra,
    ]  # fmt: skip


def test_detection_cli_fast_dev_run_with_progressive_and_randaugment(tmp_path):
    cli = run_cli(["fit", *_args(tmp_path, "--trainer.fast_dev_run=true")])  # trains at 128, evaluates at 256
    assert cli.datamodule.randaugment is not None and cli.model.image_size == 256
    for key in ("train/loss", "val/loss"):
        assert math.isfinite(float(cli.trainer.callback_metrics[key])), key


def test_keep_scale_is_refused_for_detection(tmp_path):
    from tasks.common.progressive import resolve_schedule
    from tasks.detection.data import CocoDataModule

    schedule = resolve_schedule({"num_stages": 2, "image_size": [128, 256], "keep_scale": True}, 2, 128)
    with pytest.raises(ValueError, match="keep_scale is for segmentation crops"):
        CocoDataModule(str(tmp_path), image_size=256).set_progressive(schedule)


class _Sizes(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen[trainer.current_epoch] = (batch["image"].shape[-1], max(drop_path_rates(pl_module.encoder)))


def test_detection_trains_each_stage_at_its_size_and_validates_at_image_size(tmp_path):
    cli = run_cli(_args(tmp_path, "--trainer.max_epochs=2", "--trainer.limit_train_batches=1",
                        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"), run=False)  # fmt: skip
    sizes = _Sizes()
    cli.trainer.callbacks.append(sizes)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sizes.seen[0] == (128, 0.0)
    assert sizes.seen[1][0] == 256 and sizes.seen[1][1] == pytest.approx(0.1 * 15 / 16)  # D0's B0: 16 blocks
    assert cli.model.detector.anchors.boxes.shape == (sum(9 * (256 // 2**lvl) ** 2 for lvl in range(3, 8)), 4)
    assert "val/AP" in cli.trainer.callback_metrics
