"""Knowledge distillation for segmentation: a frozen teacher checkpoint's softened per-pixel outputs as extra targets.

Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": the student matches the teacher's class
distribution softened by a temperature T, with the KL term scaled by T^2 so that its gradients keep the same size
as T changes; the hard (ground-truth) loss is kept beside it. Applied per pixel, over the pixels that count
(``ignore_index`` excluded), as in dense-prediction distillation (Liu et al. 2019, "Structured Knowledge Distillation
for Semantic Segmentation", pixel-wise term).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.common.distill import TeacherConfig, load_frozen_teacher, ready_teacher

if TYPE_CHECKING:
    from tasks.segmentation.task import SegmentationTask


class DistillConfig(TeacherConfig):
    """The ``distill`` option of ``SegmentationTask``.

    Args:
        teacher: A ``SegmentationTask`` checkpoint (any variant and decoder; same mode and classes).
        temperature: Softening temperature T (> 0) of both the student's and the teacher's logits.
        weight: Weight of the distillation term added to the hard loss (>= 0).
    """


def distillation_kl(
    student: Tensor, teacher: Tensor, target: Tensor, mode: str, temperature: float, ignore_index: int
) -> Tensor:
    """Mean per-pixel KL(teacher || student) of the T-softened outputs, times T^2, over non-ignored pixels.

    Args:
        student: Student logits N x C x H x W (C = 1 for binary).
        teacher: Teacher logits, same shape.
        target: The hard target (N x H x W ids, or N x C x H x W for multilabel); only its ignore mask is used.
        mode: ``multiclass`` (softmax over classes) or ``binary``/``multilabel`` (a Bernoulli per channel).
        temperature: T.
        ignore_index: Target value whose pixels are left out of the mean.
    """
    s, t = student.float() / temperature, teacher.float() / temperature
    if mode == "multiclass":
        kl = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1)  # N x H x W
    else:  # Bernoulli KL of each sigmoid channel: p log(p/q) + (1-p) log((1-p)/(1-q))
        p = t.sigmoid()
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        kl = kl[:, 0] if mode == "binary" else kl
    valid = target != ignore_index
    if not valid.any():
        return student.sum() * 0.0  # keeps the graph: a fully ignored batch contributes nothing
    return kl[valid].mean() * temperature**2


def load_teacher(config: DistillConfig, student: SegmentationTask) -> SegmentationTask:
    """The frozen teacher (:func:`~tasks.common.distill.load_frozen_teacher`), checked against the student."""
    from tasks.segmentation.task import SegmentationTask

    teacher = load_frozen_teacher(SegmentationTask, config.teacher, encoder_weights=None)
    shape = (teacher.mode, teacher.num_classes, teacher.in_channels)
    if shape != (student.mode, student.num_classes, student.in_channels):
        raise ValueError(
            f"teacher {config.teacher} is mode={teacher.mode}, num_classes={teacher.num_classes}, in_channels="
            f"{teacher.in_channels} but the student is mode={student.mode}, num_classes="
            f"{student.num_classes}, in_channels={student.in_channels}; use a teacher of the same task"
        )
    return teacher


@torch.no_grad()
def teacher_logits(teacher: SegmentationTask, images: Tensor, like: Tensor) -> Tensor:
    """The teacher's logits (its EMA weights when it has them), on ``like``'s device and parameter dtype.

    Called inside the student's step, so it runs under the same autocast (the student's precision); with a
    ``*-true`` precision the teacher's weights are cast to the student's dtype.
    """
    return ready_teacher(teacher, like)(images)
