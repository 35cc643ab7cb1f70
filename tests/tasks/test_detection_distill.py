"""Knowledge distillation for detection (tasks/detection/distill.py): the per-anchor terms, the teacher, a CLI run."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("effdet")
pytest.importorskip("lightning")

import lightning as L  # noqa: E402

from tasks.detection import DetectionTask  # noqa: E402
from tasks.detection.distill import DetectionDistillConfig, distill_terms, distillation_losses, teacher_heads  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
SIZE = 128


def _heads(seed: int, num_classes: int = 2, anchors: int = 9) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    sizes = (16, 8, 4, 2, 1)  # P3-P7 at 128 px
    cls = [torch.randn(2, anchors * num_classes, s, s, generator=g) * 3 - 4 for s in sizes]
    box = [torch.randn(2, anchors * 4, s, s, generator=g) * 0.2 for s in sizes]
    return cls, box


def test_terms_are_zero_for_equal_heads_and_positive_otherwise():
    t_cls, t_box = _heads(0)
    zero_cls, zero_box = distillation_losses(t_cls, t_box, t_cls, t_box, 2, 2.0)
    assert zero_cls == pytest.approx(0.0, abs=1e-6) and zero_box == 0
    s_cls, s_box = _heads(1)
    kd_cls, kd_box = distillation_losses(s_cls, t_box, t_cls, t_box, 2, 2.0)
    assert kd_cls > 0.01 and kd_box == 0
    kd_cls, kd_box = distillation_losses(t_cls, s_box, t_cls, t_box, 2, 2.0)
    assert kd_cls == pytest.approx(0.0, abs=1e-6) and kd_box > 1e-3


def test_anchors_are_weighted_by_the_teachers_confidence():
    t_cls = [torch.full((1, 9 * 2, 4, 4), -8.0)]  # background everywhere ...
    t_cls[0][0, 0, 1, 1] = 4.0  # ... but class 0 of anchor 0 at (1, 1)
    t_box = [torch.zeros(1, 9 * 4, 4, 4)]
    off_object, on_object = [t.clone() for t in t_box], [t.clone() for t in t_box]
    off_object[0][0, 0:4, 3, 3] = 0.5  # the student's box differs where the teacher sees nothing
    on_object[0][0, 0:4, 1, 1] = 0.5  # ... or where it sees the object
    _, box_off = distillation_losses(t_cls, off_object, t_cls, t_box, 2, 1.0)
    _, box_on = distillation_losses(t_cls, on_object, t_cls, t_box, 2, 1.0)
    assert box_on > 100 * box_off > 0
    # T^2 scaling: the class term keeps its size as the temperature grows (the softened KL shrinks as 1/T^2).
    t_cls = [torch.randn(1, 9 * 2, 4, 4) * 2]
    s_cls = [t_cls[0] + torch.randn_like(t_cls[0])]
    at_4, at_8 = (distillation_losses(s_cls, t_box, t_cls, t_box, 2, t)[0] for t in (4.0, 8.0))
    assert 0.8 < at_8 / at_4 < 1.25


def test_bad_distill_options_are_named():
    assert DetectionDistillConfig.parse({"teacher": "t.ckpt"}) == DetectionDistillConfig("t.ckpt", 1.0, 1.0, 50.0)
    with pytest.raises(ValueError, match="and box_weight >= 0"):
        DetectionDistillConfig.parse({"teacher": "t.ckpt", "box_weight": -1})
    with pytest.raises(ValueError, match="may have 'temperature', 'weight', 'box_weight'; unknown keys: \\['t'\\]"):
        DetectionDistillConfig.parse({"teacher": "t.ckpt", "t": 2})


def _batch(num_classes: int = 3) -> dict:
    boxes = [torch.tensor([[10.0, 12.0, 70.0, 90.0]]), torch.tensor([[30.0, 20.0, 120.0, 60.0], [5, 5, 40, 40]])]
    return {"image": torch.randn(2, 3, SIZE, SIZE), "boxes_xyxy": boxes,
            "labels": [torch.tensor([0]), torch.tensor([1, num_classes - 1])], "image_id": torch.tensor([1, 2]),
            "img_scale": torch.ones(2), "img_size": torch.full((2, 2), float(SIZE))}  # fmt: skip


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A D1 teacher (with EMA) after one training step at 128 px, 3 classes: a real Lightning checkpoint."""
    torch.manual_seed(0)
    teacher = DetectionTask("d1", num_classes=3, image_size=SIZE, ema_decay=0.9, lr_schedule="constant")
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(teacher, train_dataloaders=torch.utils.data.DataLoader([_batch()], batch_size=None))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_student_equal_to_teacher_has_zero_distillation_and_the_teacher_is_frozen(teacher_ckpt):
    teacher = DetectionTask.load_from_checkpoint(teacher_ckpt, weights_only=True)
    student = DetectionTask("d1", num_classes=3, image_size=SIZE, distill={"teacher": str(teacher_ckpt)})
    student.detector.load_state_dict(teacher.ema.module.state_dict())  # the teacher answers with its EMA
    student.eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        kd_cls, kd_box = distill_terms(student, images, *student.detector.model(images))
        assert kd_cls == pytest.approx(0.0, abs=1e-7) and kd_box == pytest.approx(0.0, abs=1e-7)
        for head in (student.detector.model.class_net, student.detector.model.box_net):
            for p in head.parameters():
                p.add_(0.05 * torch.randn_like(p))  # the student's heads move away from the teacher's
        kd_cls, kd_box = distill_terms(student, images, *student.detector.model(images))
        assert kd_cls > 1e-5 and kd_box > 1e-4, (kd_cls, kd_box)
    frozen = student._teacher[0]
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not any("teacher" in k for k in student.state_dict())  # not saved with the student
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the student's precision reaches the teacher
        assert teacher_heads(frozen, images, next(student.parameters()))[0][0].dtype == torch.bfloat16


def test_a_teacher_with_other_size_anchors_or_classes_or_a_missing_file_is_refused(teacher_ckpt, tmp_path):
    images = torch.randn(1, 3, 256, 256)

    def terms(**options):
        student = DetectionTask("d0", **{"num_classes": 3, "image_size": SIZE, **options},
                                distill={"teacher": str(teacher_ckpt)})  # fmt: skip
        return distill_terms(student, images, [], [])

    with pytest.raises(ValueError, match="image_size=128 but the student runs at 256; train the teacher at"):
        terms(image_size=256)
    with pytest.raises(ValueError, match="num_classes=3 but the student 2"):
        terms(num_classes=2)
    with pytest.raises(ValueError, match="other anchors than the student .*anchor_scale=4.0.*anchor_scale=3.0"):
        terms(detector_options={"anchor_scale": 3.0})
    missing = DetectionTask("d0", num_classes=3, image_size=SIZE, distill={"teacher": str(tmp_path / "no.ckpt")})
    with pytest.raises(FileNotFoundError, match="no.ckpt not found; train the teacher first"):
        distill_terms(missing, images, [], [])


def test_cli_fast_dev_run_distills_a_d0_from_a_d1_teacher(teacher_ckpt, tmp_path):
    pytest.importorskip("jsonargparse")
    from tasks.cli import run_cli

    overlay = tmp_path / "distill.yaml"
    distill = {"teacher": str(teacher_ckpt), "temperature": 2.0, "weight": 0.5, "box_weight": 20.0}
    overlay.write_text(json.dumps({"model": {"class_path": "tasks.detection.DetectionTask",
                                             "init_args": {"distill": distill}}}))  # fmt: skip
    cli = run_cli([
        "fit", "--config", str(CONF / "det_d0.yaml"), "--config", str(overlay),
        f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.fast_dev_run=true",
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    kd, kd_cls, kd_box = (float(metrics[f"train/loss_kd{k}"]) for k in ("", "_class", "_box"))
    assert math.isfinite(kd) and kd > 0 and kd == pytest.approx(kd_cls + 20.0 * kd_box, rel=1e-4)
    assert cli.model.distill == DetectionDistillConfig(str(teacher_ckpt), 2.0, 0.5, 20.0)
