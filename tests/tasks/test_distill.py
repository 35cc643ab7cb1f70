"""Knowledge distillation for segmentation (tasks/segmentation/distill.py): the KL term and a CLI run."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

import lightning as L  # noqa: E402

from tasks.segmentation import SegmentationTask  # noqa: E402
from tasks.segmentation.distill import DistillConfig, distillation_kl  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = {"decoder_channels": [16, 16, 8, 8, 8]}


@pytest.mark.parametrize(("mode", "channels"), [("multiclass", 3), ("binary", 1), ("multilabel", 3)])
def test_kl_is_zero_for_equal_outputs_and_positive_otherwise(mode, channels):
    torch.manual_seed(0)
    teacher = torch.randn(2, channels, 8, 8)
    target = torch.randint(0, 2, (2, channels, 8, 8) if mode == "multilabel" else (2, 8, 8))
    assert distillation_kl(teacher.clone(), teacher, target, mode, 2.0, -100) == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(teacher + torch.randn_like(teacher), teacher, target, mode, 2.0, -100) > 0.01


def test_multiclass_kl_is_the_t_squared_scaled_kl_div_over_kept_pixels():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))
    target[0, :3] = -100
    t = 3.0
    per_pixel = F.kl_div((student / t).log_softmax(1), (teacher / t).log_softmax(1), log_target=True,
                         reduction="none").sum(1)  # fmt: skip
    expected = per_pixel[target != -100].mean() * t**2
    torch.testing.assert_close(distillation_kl(student, teacher, target, "multiclass", t, -100), expected)


def test_ignored_pixels_do_not_contribute():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    target = torch.randint(0, 3, (1, 8, 8))
    target[..., :4] = -100
    changed = student.clone()
    changed[..., :4] += 10 * torch.randn(1, 3, 8, 4)  # only the ignored half differs
    base = distillation_kl(student, teacher, target, "multiclass", 1.0, -100)
    torch.testing.assert_close(distillation_kl(changed, teacher, target, "multiclass", 1.0, -100), base)
    student.requires_grad_(True)
    distillation_kl(student, teacher, target, "multiclass", 1.0, -100).backward()
    assert student.grad[..., :4].abs().max() == 0 and student.grad[..., 4:].abs().max() > 0
    everything_ignored = torch.full_like(target, -100)
    assert distillation_kl(student, teacher, everything_ignored, "multiclass", 1.0, -100) == 0


def test_bad_distill_options_are_named():
    with pytest.raises(ValueError, match="must have the key 'teacher'"):
        DistillConfig.parse({"temperature": 2.0})
    with pytest.raises(ValueError, match="unknown keys: \\['temp'\\]"):
        DistillConfig.parse({"teacher": "t.ckpt", "temp": 2.0})
    with pytest.raises(ValueError, match="temperature > 0"):
        DistillConfig.parse({"teacher": "t.ckpt", "temperature": 0})


def _checkpoint(task: SegmentationTask, path: Path) -> Path:
    """A real Lightning checkpoint of ``task`` after one training step on random data."""
    batches = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 4, (2, 32, 32))}]
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    # Another decoder than the students' U-Net, with an EMA (the teacher answers with its EMA weights).
    teacher = SegmentationTask(num_classes=4, decoder="fpn", ema_decay=0.9, lr_schedule="constant")
    return _checkpoint(teacher, tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


def test_student_equal_to_teacher_has_zero_distillation_loss(teacher_ckpt):
    teacher = SegmentationTask.load_from_checkpoint(teacher_ckpt, weights_only=True)
    student = SegmentationTask(num_classes=4, decoder="fpn", distill={"teacher": str(teacher_ckpt), "weight": 0.5})
    student.model.load_state_dict(teacher.ema.module.state_dict())
    student.eval()
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    with torch.no_grad():
        kd = student.distill_loss(images, student(images), target)
        assert kd == pytest.approx(0.0, abs=1e-5)
        other = SegmentationTask(num_classes=4, decoder_options=SMALL, distill={"teacher": str(teacher_ckpt)}).eval()
        assert other.distill_loss(images, other(images), target) > 1e-3
    teacher_net = student._teacher[0]
    assert not teacher_net.training and not any(p.requires_grad for p in teacher_net.parameters())
    assert not any("teacher" in k for k in student.state_dict())  # not saved with the student


def test_a_teacher_of_another_task_shape_or_a_missing_file_is_refused(teacher_ckpt, tmp_path):
    images, target, logits = torch.randn(1, 3, 32, 32), torch.randint(0, 2, (1, 32, 32)), torch.zeros(1, 2, 32, 32)
    student = SegmentationTask(num_classes=2, decoder_options=SMALL, distill={"teacher": str(teacher_ckpt)})
    with pytest.raises(ValueError, match="num_classes=4, .* but the student is .*num_classes=2"):
        student.distill_loss(images, logits, target)
    missing = SegmentationTask(num_classes=2, decoder_options=SMALL, distill={"teacher": str(tmp_path / "no.ckpt")})
    with pytest.raises(FileNotFoundError, match="no.ckpt not found; train the teacher first"):
        missing.distill_loss(images, logits, target)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cli_fast_dev_run_distills_from_a_teacher_checkpoint(teacher_ckpt, tmp_path, precision):
    pytest.importorskip("jsonargparse")
    from tasks.cli import run_cli
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    root = generate_masks(tmp_path / "d", SyntheticMaskSpec(num_train=4, num_val=2, size=32))
    overlay = tmp_path / "distill.yaml"
    distill = {"teacher": str(teacher_ckpt), "temperature": 2.0, "weight": 0.5}
    overlay.write_text(json.dumps({"model": {"class_path": "tasks.segmentation.SegmentationTask",
                                             "init_args": {"distill": distill}}}))  # fmt: skip
    cli = run_cli([
        "fit", "--config", str(CONF / "seg_unet_b0.yaml"), "--config", str(overlay), f"--data.root={root}",
        "--data.image_size=32", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true",
        f"--trainer.precision={precision}",
    ])  # fmt: skip
    kd = float(cli.trainer.callback_metrics["train/loss_kd_step"])
    assert math.isfinite(kd) and kd > 0
    assert cli.model.distill == DistillConfig(str(teacher_ckpt), 2.0, 0.5)
