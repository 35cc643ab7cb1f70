"""Knowledge distillation for detection: a frozen teacher's class and box head outputs, per anchor, as targets.

The student matches, on every anchor of every level P3-P7, the teacher's class probabilities softened by a
temperature T and the teacher's box regressions (Hinton et al. 2015 for the softened targets; Chen et al. 2017,
"Learning Efficient Object Detection Models with Knowledge Distillation", distil both the classification and the
box-regression outputs of a detector, beside the hard loss). EfficientDet classifies with one sigmoid per class
(focal loss), so the class term is the Bernoulli KL of each class, ``T^2``-scaled; the box term is effdet's own Huber
loss (delta 0.1) on the encoded box offsets. Nearly all anchors are background, where both networks agree on
"nothing": each anchor is weighted by the teacher's confidence (its highest class probability), and both terms are
weighted means over the anchors, so they measure the disagreement where the teacher sees objects. The distillation
term added to the hard loss is ``weight * (class_term + box_weight * box_term)``; ``box_weight`` defaults to
effdet's ``box_loss_weight`` (50), the balance of the hard loss.

The anchors must be the same for both (same ``image_size``, levels, scales and aspect ratios): the heads' outputs
are then compared anchor by anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.common.distill import TeacherConfig, load_frozen_teacher, ready_teacher

if TYPE_CHECKING:
    from tasks.detection.task import DetectionTask

HUBER_DELTA = 0.1  # effdet's box loss delta (about the size of the encoded offsets)


@dataclass(frozen=True)
class DetectionDistillConfig(TeacherConfig):
    """The ``distill`` option of ``DetectionTask``.

    Args:
        teacher: A ``DetectionTask`` checkpoint (any model; same classes, ``image_size`` and anchors).
        temperature: Softening temperature T (> 0) of the class logits of both networks.
        weight: Weight of the whole distillation term added to the hard loss (>= 0).
        box_weight: Weight of the box term relative to the class term (>= 0; effdet's ``box_loss_weight``).
    """

    box_weight: float = 50.0


def _per_anchor(outputs: list[Tensor], width: int) -> Tensor:
    """Head outputs of all levels (``N x (A * width) x H x W`` each) as ``N x anchors x width``, effdet's order."""
    return torch.cat([o.permute(0, 2, 3, 1).reshape(o.shape[0], -1, width) for o in outputs], 1).float()


def distillation_losses(
    student_class: list[Tensor], student_box: list[Tensor], teacher_class: list[Tensor], teacher_box: list[Tensor],
    num_classes: int, temperature: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The class and box distillation terms, teacher-confidence-weighted means over all anchors of all levels.

    Args:
        student_class: Student class logits per level, ``N x (A * num_classes) x H x W``.
        student_box: Student box regressions per level, ``N x (A * 4) x H x W``.
        teacher_class: Teacher class logits, same shapes.
        teacher_box: Teacher box regressions, same shapes.
        num_classes: Classes of both heads.
        temperature: T of the class term.

    Returns:
        ``(class_term, box_term)``: the Bernoulli KL(teacher || student) of the T-softened class probabilities
        summed over classes, times ``T^2``; and the Huber loss (delta 0.1) of the box offsets, averaged over the
        four coordinates; each averaged over anchors with the teacher's highest class probability as weight.
    """
    s_cls, t_cls = _per_anchor(student_class, num_classes), _per_anchor(teacher_class, num_classes)
    s_box, t_box = _per_anchor(student_box, 4), _per_anchor(teacher_box, 4)
    s, t = s_cls / temperature, t_cls / temperature
    p = t.sigmoid()  # p log(p/q) + (1-p) log((1-p)/(1-q)), from the logits for stability
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    weight = t_cls.sigmoid().amax(-1)  # N x anchors: the teacher's confidence at T = 1
    total = weight.sum().clamp_min(1e-6)
    class_term = (weight * kl.sum(-1)).sum() / total * temperature**2
    box = F.huber_loss(s_box, t_box, reduction="none", delta=HUBER_DELTA).mean(-1)
    return class_term, (weight * box).sum() / total


def load_teacher(config: DetectionDistillConfig, student: DetectionTask) -> DetectionTask:
    """The frozen teacher (:func:`~tasks.common.distill.load_frozen_teacher`), checked against the student.

    Its ``image_size`` and anchors (saved fitted ones included) must equal the student's, so that the heads'
    outputs line up anchor by anchor; call it once the student's anchors are final (when the fit starts).
    """
    from tasks.detection.task import DetectionTask

    teacher = load_frozen_teacher(DetectionTask, config.teacher, backbone_weights=None, pretrained=None,
                                  pretrained_path=None)  # fmt: skip
    where = f"distill teacher {config.teacher}"
    if teacher.num_classes != student.num_classes:
        raise ValueError(f"{where} has num_classes={teacher.num_classes} but the student {student.num_classes}; "
                         "use a teacher trained on the same categories")  # fmt: skip
    if teacher.image_size != student.image_size:
        raise ValueError(f"{where} was trained at image_size={teacher.image_size} but the student runs at "
                         f"{student.image_size}; train the teacher at the student's image_size (its anchors must "
                         "match the student's)")  # fmt: skip
    t_anchors, s_anchors = teacher.detector.anchors.boxes, student.detector.anchors.boxes
    if t_anchors.shape != s_anchors.shape or not torch.allclose(t_anchors.cpu(), s_anchors.cpu()):
        raise ValueError(
            f"{where} has other anchors than the student (teacher: {teacher.current_anchors()}, levels "
            f"{teacher.detector.config.min_level}-{teacher.detector.config.max_level}; student: "
            f"{student.current_anchors()}, levels {student.detector.config.min_level}-"
            f"{student.detector.config.max_level}); give the student the teacher's anchors (the same `anchors` "
            "option and detector_options anchor settings, on the same data)"
        )
    return teacher


def teacher_of(student: DetectionTask) -> DetectionTask:
    """The student's frozen teacher, loaded and checked on first use (kept outside its modules)."""
    if student.distill is None:
        raise RuntimeError("a teacher needs the distill option (a teacher checkpoint)")
    if not student._teacher:
        student._teacher.append(load_teacher(student.distill, student))
    return student._teacher[0]


def distill_terms(
    student: DetectionTask, images: Tensor, class_out: list[Tensor], box_out: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """The unweighted class and box terms (:func:`distillation_losses`) of the student's outputs on ``images``."""
    teacher = teacher_of(student)
    t_class, t_box = teacher_heads(teacher, images, next(student.detector.parameters()))
    assert student.distill is not None
    return distillation_losses(class_out, box_out, t_class, t_box, student.num_classes, student.distill.temperature)


def distilled_losses(student: DetectionTask, images: Tensor, target: dict[str, Tensor]) -> dict[str, Tensor]:
    """The effdet training losses of ``student``, with the distillation term added to ``loss``.

    The student's head outputs are taken from inside effdet's training bench (a forward hook), so the hard loss
    is effdet's own. The result also holds ``loss_kd`` (unweighted: class term + ``box_weight`` x box term),
    ``loss_kd_class`` and ``loss_kd_box``.
    """
    config = student.distill
    if config is None:
        raise RuntimeError("distilled_losses needs a student with the distill option")
    heads: list[tuple[list[Tensor], list[Tensor]]] = []
    hook = student.detector.model.register_forward_hook(lambda _m, _i, out: heads.append(out))
    try:
        out = student.detector(images, target)
    finally:
        hook.remove()
    kd_class, kd_box = distill_terms(student, images, *heads[0])
    kd = kd_class + config.box_weight * kd_box
    loss = out["loss"] + config.weight * kd
    return {**out, "loss": loss, "loss_kd": kd, "loss_kd_class": kd_class, "loss_kd_box": kd_box}


@torch.no_grad()
def teacher_heads(teacher: DetectionTask, images: Tensor, like: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The teacher's class and box outputs per level (its EMA weights when it has them), on ``like``'s device/dtype.

    Called inside the student's step, so it runs under the same autocast (the student's precision).
    """
    teacher = ready_teacher(teacher, like)
    class_out, box_out = teacher.eval_bench().model(teacher.prepare_images(images))
    return list(class_out), list(box_out)


__all__ = [
    "DetectionDistillConfig",
    "distill_terms",
    "distillation_losses",
    "distilled_losses",
    "load_teacher",
    "teacher_heads",
    "teacher_of",
]
