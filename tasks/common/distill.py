"""What knowledge distillation shares between the tasks: the ``distill`` option, loading and running the teacher.

The teacher is a checkpoint of the same task. It is loaded weights-only on the CPU when the student's fit starts,
frozen (eval mode, no gradients), kept outside the student's modules (not optimised, not saved), and run inside
the student's training step, so under the student's autocast; with a ``*-true`` precision its weights are cast
to the student's dtype. Each task adds its own distillation loss (:mod:`tasks.segmentation.distill`,
:mod:`tasks.detection.distill`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

ConfigT = TypeVar("ConfigT", bound="TeacherConfig")
TaskT = TypeVar("TaskT", bound=nn.Module)


@dataclass(frozen=True)
class TeacherConfig:
    """The ``distill`` option: a teacher checkpoint, a temperature and the weight of the distillation term.

    Args:
        teacher: A checkpoint of the same task (a larger variant, typically).
        temperature: Softening temperature T (> 0) of both the student's and the teacher's logits.
        weight: Weight of the distillation term added to the hard loss (>= 0).
    """

    teacher: str
    temperature: float = 1.0
    weight: float = 1.0

    @classmethod
    def parse(cls: type[ConfigT], value: dict[str, Any]) -> ConfigT:
        """Check the keys and values of a ``distill`` dict, naming the wrong one."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if "teacher" not in value or unknown:
            others = ", ".join(f"'{k}'" for k in known[1:])
            raise ValueError(
                f"distill={value} must have the key 'teacher' (a checkpoint path) and may have {others}; "
                f"unknown keys: {unknown}"
            )
        config = cls(**{k: str(v) if k == "teacher" else float(v) for k, v in value.items()})
        weights = {f.name: getattr(config, f.name) for f in fields(cls) if f.name.endswith("weight")}
        if config.temperature <= 0 or any(w < 0 for w in weights.values()):
            raise ValueError(f"distill needs temperature > 0 and {' and '.join(weights)} >= 0, got {config}")
        return config


def load_frozen_teacher(task_class: type[TaskT], path: str | Path, **overrides: Any) -> TaskT:  # noqa: ANN401
    """``task_class`` loaded from ``path`` (weights-only, on the CPU), in eval mode and without gradients.

    Its own ``distill`` is cleared (a teacher that was itself a student does not load its teacher); ``overrides``
    clear its starting-weights options (the checkpoint has all weights: nothing is downloaded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"distill teacher checkpoint {path} not found; train the teacher first "
            "(effbackbone fit ...) and set model.init_args.distill.teacher to its .ckpt file"
        )
    teacher = task_class.load_from_checkpoint(  # type: ignore[attr-defined]
        path, map_location="cpu", weights_only=True, distill=None, **overrides
    )
    teacher.eval().requires_grad_(False)
    return teacher


def ready_teacher(teacher: TaskT, like: Tensor) -> TaskT:
    """``teacher`` in eval mode on ``like``'s device and dtype (the student's weights), moved once."""
    if (p := next(teacher.parameters())).device != like.device or p.dtype != like.dtype:
        teacher.to(device=like.device, dtype=like.dtype)
    return teacher.eval()


__all__ = ["TeacherConfig", "load_frozen_teacher", "ready_teacher"]
