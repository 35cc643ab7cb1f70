"""Progressive learning (EfficientNetV2, Tan & Le 2021, §4): image size and regularisation grow stage by stage.

Training is split into stages; each stage trains at its own image size with its own regularisation strength
(stochastic-depth rate of the encoder, dropout, RandAugment magnitude), small images with weak regularisation
first and large images with strong regularisation last (V2, Algorithm 1). Stages switch at epoch boundaries. The
model and the optimizer are never rebuilt: a stage sets attributes of modules that have no parameters
(:mod:`tasks.common.regularization`) and swaps the training pipeline of the data (:class:`StagedTransform`).

The stage is a pure function of the epoch, everywhere: the training sampler hands each sample the epoch it is
drawn for (:class:`tasks.common.sampling.EpochSampler`), so data-loader workers (persistent or not) pick the
epoch's pipeline themselves, and a run resumed from any checkpoint (end of an epoch or mid-epoch) trains its
remaining epochs exactly as the uninterrupted run would; nothing about the stage needs saving.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from tasks.common.regularization import count_dropout, set_drop_path_rate, set_dropout

#: Values a stage sets (``None``: leave it as the model and data have it).
STAGE_VALUES = ("image_size", "drop_path_rate", "dropout", "magnitude")
#: Every key of the ``progressive`` block (both forms).
OPTION_KEYS = ("num_stages", "stages", *STAGE_VALUES, "keep_scale")
#: The data-side values (the rest act on the model).
DATA_VALUES = ("image_size", "magnitude")


@dataclass(frozen=True)
class Stage:
    """One stage: from ``epoch`` on, train at ``image_size`` with this regularisation (``None``: unchanged)."""

    epoch: int
    image_size: int | None = None
    drop_path_rate: float | None = None
    dropout: float | None = None
    magnitude: float | None = None


@dataclass(frozen=True)
class ProgressiveSchedule:
    """Stages in order of their first epoch; the first starts at epoch 0.

    ``keep_scale`` (segmentation): a smaller stage crops a smaller region at the data's scale instead of
    resizing the same region to the smaller size.
    """

    stages: tuple[Stage, ...]
    keep_scale: bool = False

    def index_at(self, epoch: int) -> int:
        """Index of the stage that trains ``epoch`` (the last one started by then)."""
        return max(i for i, s in enumerate(self.stages) if s.epoch <= max(epoch, 0))

    def at(self, epoch: int) -> Stage:
        """The stage that trains ``epoch``."""
        return self.stages[self.index_at(epoch)]

    def sets(self, name: str) -> bool:
        """Whether any stage sets value ``name``."""
        return any(getattr(s, name) is not None for s in self.stages)

    def describe(self) -> str:
        """One line per stage, for the log."""
        rows = []
        for s in self.stages:
            values = ", ".join(f"{k} {v:g}" for k, v in asdict(s).items() if k != "epoch" and v is not None)
            rows.append(f"  from epoch {s.epoch}: {values or 'no change'}")
        return "\n".join(rows)


def _pair(name: str, value: Any) -> tuple[float, float] | None:  # noqa: ANN401 - a YAML value
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    raise ValueError(f"progressive {name} must be a number or [first, last], got {value!r}")


def _round_size(size: float, multiple: int) -> int:
    return max(multiple, int(round(size / multiple)) * multiple)


def _check_stage(stage: Stage, where: str, multiple: int) -> None:
    if stage.image_size is not None and (stage.image_size <= 0 or stage.image_size % multiple):
        lower = max(multiple, stage.image_size // multiple * multiple)
        raise ValueError(
            f"progressive {where}: image_size {stage.image_size} is not a positive multiple of {multiple} (the "
            f"model's size divisibility); use {lower} or {lower + multiple}"
        )
    for name in ("drop_path_rate", "dropout"):
        value = getattr(stage, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"progressive {where}: {name} must be in [0, 1), got {value}")
    if stage.magnitude is not None and not 0.0 <= stage.magnitude <= 30.0:
        raise ValueError(f"progressive {where}: magnitude must be in [0, 30] (RandAugment's scale), got "
                         f"{stage.magnitude}")  # fmt: skip


def check_config(config: Mapping[str, Any]) -> None:
    """Check the keys and shapes of a ``progressive`` block without resolving epochs (fails at construction)."""
    resolve_schedule(config, max_epochs=max(1, int(config.get("num_stages") or 1)), size_multiple=1)


def check_keys(option: Mapping[str, Any]) -> None:
    """Refuse keys of the ``progressive`` block that are not in :data:`OPTION_KEYS`, naming the valid ones."""
    unknown = set(option) - set(OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown progressive key(s) {sorted(unknown)}; valid: {', '.join(OPTION_KEYS)}")


def resolve_schedule(config: Mapping[str, Any], max_epochs: int | None, size_multiple: int) -> ProgressiveSchedule:
    """The stages of a ``progressive`` block.

    Two forms:

    * ``{num_stages: M, image_size: [first, last], drop_path_rate: [a, b], dropout: [a, b], magnitude: [a, b]}``:
      V2's Algorithm 1. The run's ``max_epochs`` are split into ``M`` equal stages (epoch ``e`` trains stage
      ``floor(e * M / max_epochs)``); stage ``i`` gets ``first + (last - first) * i / (M - 1)`` of each value
      given (a single number keeps it constant), sizes rounded to the nearest multiple of ``size_multiple``.
    * ``{stages: [{epoch: 0, image_size: 128, drop_path_rate: 0.0, magnitude: 5}, {epoch: 10, ...}, ...]}``:
      explicit stages by first epoch (the first at epoch 0, increasing); a value left out is unchanged.

    Either form takes ``keep_scale: true`` (segmentation only; see :class:`ProgressiveSchedule`).

    Args:
        config: The block.
        max_epochs: The trainer's ``max_epochs`` (needed by the ``num_stages`` form).
        size_multiple: Image sizes must be multiples of this (32 for the U-Nets, 128 for EfficientDet).

    Raises:
        ValueError: Unknown keys, both or neither form, bad values; each message names the key and a fix.
    """
    check_keys(config)
    keys = set(config) - {"keep_scale"}
    keep_scale = config.get("keep_scale", False)
    if not isinstance(keep_scale, bool):
        raise ValueError(f"progressive keep_scale must be true or false, got {keep_scale!r}")
    if "stages" in keys:
        if keys - {"stages"}:
            raise ValueError(f"progressive: give either 'stages' (explicit) or 'num_stages' with [first, last] "
                             f"values, not both (got {sorted(keys)})")  # fmt: skip
        return replace(_explicit(config["stages"], size_multiple), keep_scale=keep_scale)
    if "num_stages" not in keys:
        raise ValueError("progressive needs 'num_stages' (with [first, last] values) or a 'stages' list")
    num = config["num_stages"]
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"progressive num_stages must be an integer >= 1, got {num!r}")
    pairs = {k: _pair(k, config.get(k)) for k in STAGE_VALUES}
    if all(p is None for p in pairs.values()):
        raise ValueError(f"progressive sets nothing: give [first, last] for at least one of {list(STAGE_VALUES)}")
    if max_epochs is None or max_epochs < 1:
        raise ValueError("progressive num_stages splits trainer.max_epochs into stages: set trainer.max_epochs, or "
                         "give explicit 'stages' with their first epochs")  # fmt: skip
    stages = []
    for i in range(num):
        t = i / (num - 1) if num > 1 else 0.0
        values = {k: p[0] + (p[1] - p[0]) * t for k, p in pairs.items() if p is not None}
        if "image_size" in values:
            values["image_size"] = _round_size(values["image_size"], size_multiple)
        # The first epoch e with floor(e * num / max_epochs) >= i; stages that get no epoch are never used.
        stage = Stage(epoch=math.ceil(i * max_epochs / num), **values)  # type: ignore[arg-type]
        _check_stage(stage, f"stage {i}", size_multiple)
        stages.append(stage)
    return ProgressiveSchedule(tuple(stages), keep_scale)


def _explicit(rows: Any, size_multiple: int) -> ProgressiveSchedule:  # noqa: ANN401 - a YAML list
    if not isinstance(rows, Sequence) or not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError(f"progressive stages must be a non-empty list of mappings, got {rows!r}")
    stages = []
    for i, row in enumerate(rows):
        unknown = set(row) - {"epoch", *STAGE_VALUES}
        if unknown:
            raise ValueError(f"progressive stages[{i}]: unknown key(s) {sorted(unknown)}; valid: epoch, "
                             f"{', '.join(STAGE_VALUES)}")  # fmt: skip
        if not isinstance(row.get("epoch"), int):
            raise ValueError(f"progressive stages[{i}] needs its first epoch as an integer ('epoch: N')")
        stage = Stage(**row)
        if stage.image_size is not None:
            stage = replace(stage, image_size=int(stage.image_size))
        _check_stage(stage, f"stages[{i}]", size_multiple)
        stages.append(stage)
    epochs = [s.epoch for s in stages]
    if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"progressive stages must start at epoch 0 and increase, got epochs {epochs}")
    return ProgressiveSchedule(tuple(stages))


class StagedTransform:
    """A training pipeline that follows the schedule: ``set_epoch`` picks the pipeline of that epoch's stage.

    Called like the albumentations ``Compose`` it replaces; :func:`tasks.common.sampling.reseed` seeds the
    current stage's pipeline. Picklable (workers get a copy) when ``build`` is.

    Args:
        schedule: The stages.
        build: ``build(image_size, magnitude)`` -> the pipeline of a stage.
        image_size: The data's own size (stages without one use it).
        magnitude: The data's RandAugment magnitude (stages without one use it; ``None``: RandAugment off).
    """

    def __init__(
        self,
        schedule: ProgressiveSchedule,
        build: Callable[[int, float | None], Callable[..., Any]],
        image_size: int,
        magnitude: float | None,
    ) -> None:
        self.schedule, self.build = schedule, build
        self.image_size, self.magnitude = image_size, magnitude
        self._pipelines: dict[int, Callable[..., Any]] = {}
        self._index = -1
        self.set_epoch(0)

    def stage_values(self, epoch: int) -> tuple[int, float | None]:
        """``(image_size, magnitude)`` of the pipeline used in ``epoch``."""
        stage = self.schedule.at(epoch)
        size = stage.image_size if stage.image_size is not None else self.image_size
        return size, stage.magnitude if stage.magnitude is not None else self.magnitude

    def set_epoch(self, epoch: int) -> None:
        """Use the pipeline of ``epoch``'s stage (built once per stage)."""
        self._index = self.schedule.index_at(epoch)
        if self._index not in self._pipelines:
            self._pipelines[self._index] = self.build(*self.stage_values(epoch))

    @property
    def pipeline(self) -> Callable[..., Any]:
        """The current stage's pipeline."""
        return self._pipelines[self._index]

    def set_random_seed(self, seed: int) -> None:
        """Seed the current pipeline (per sample, by :class:`tasks.common.sampling.SeededDataset`)."""
        self.pipeline.set_random_seed(seed)  # type: ignore[attr-defined]

    def __call__(self, **data: Any) -> dict[str, Any]:  # noqa: ANN401 - albumentations targets
        """Apply the current stage's pipeline."""
        return self.pipeline(**data)  # type: ignore[no-any-return]


class ProgressiveLearning(L.Callback):
    """Switches the stages of a progressive schedule (:func:`resolve_schedule`) at epoch boundaries.

    Set it with the tasks' ``progressive`` option (the task adds this callback) or list it in
    ``trainer.callbacks`` with the same keys. Image size and RandAugment magnitude go to the data module's
    ``set_progressive`` (both data modules have it); ``drop_path_rate`` ramps over the encoder's blocks as when
    the encoder is built (``rate * i / n_blocks``); ``dropout`` sets every dropout layer of the network.
    Validation and test keep the data's fixed evaluation size. ``train/image_size``, ``train/drop_path_rate``,
    ``train/dropout`` and ``train/magnitude`` are logged per epoch for the values the current stage sets.

    Args:
        num_stages: Number of equal stages over ``trainer.max_epochs`` (V2 uses 4), with [first, last] values.
        image_size: ``[first, last]`` training image size (or one number).
        drop_path_rate: ``[first, last]`` stochastic-depth rate of the encoder's last block.
        dropout: ``[first, last]`` probability of the network's dropout layers.
        magnitude: ``[first, last]`` RandAugment magnitude (needs the data's ``randaugment``).
        stages: Explicit stages instead: ``[{epoch: 0, image_size: 128, ...}, ...]``.
        keep_scale: Segmentation: smaller stages crop smaller regions at the data's scale (instead of resizing
            the same region to the smaller size).
    """

    def __init__(
        self,
        num_stages: int | None = None,
        image_size: int | list[int] | None = None,
        drop_path_rate: float | list[float] | None = None,
        dropout: float | list[float] | None = None,
        magnitude: float | list[float] | None = None,
        stages: list[dict[str, Any]] | None = None,
        keep_scale: bool = False,
    ) -> None:
        given = {"num_stages": num_stages, "image_size": image_size, "drop_path_rate": drop_path_rate,
                 "dropout": dropout, "magnitude": magnitude, "stages": stages}  # fmt: skip
        self.config: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if keep_scale:
            self.config["keep_scale"] = keep_scale
        check_config(self.config)
        self.schedule: ProgressiveSchedule | None = None
        self._applied: int | None = None

    @classmethod
    def from_option(cls, option: Mapping[str, Any]) -> ProgressiveLearning:
        """The callback of a task's ``progressive`` option (the same keys)."""
        check_keys(option)
        return cls(**dict(option))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the stages for this run and hand the data its part (before any data loader is built)."""
        if stage != "fit":
            return
        multiple = int(getattr(pl_module, "size_divisibility", 1))
        self.schedule = schedule = resolve_schedule(self.config, trainer.max_epochs, multiple)
        if any(schedule.sets(k) for k in DATA_VALUES):
            datamodule = trainer.datamodule
            if not callable(getattr(datamodule, "set_progressive", None)):
                raise TypeError(f"progressive image_size/magnitude need a data module with set_progressive "
                                f"(MaskDataModule, CocoDataModule); got {type(datamodule).__name__}")  # fmt: skip
            datamodule.set_progressive(schedule)
        if schedule.sets("dropout") and not count_dropout(_network(pl_module)):
            raise ValueError(f"progressive dropout: {type(pl_module).__name__}'s network has no dropout layer to "
                             "set; leave dropout out (use drop_path_rate) or pick a decoder that has one")  # fmt: skip
        if schedule.sets("drop_path_rate") and getattr(pl_module, "encoder", None) is None:
            raise ValueError(f"progressive drop_path_rate: {type(pl_module).__name__} names no encoder")
        self._applied = None
        rank_zero_info(f"progressive learning, {len(schedule.stages)} stage(s):\n{schedule.describe()}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,  # noqa: ANN401
                             batch_idx: int) -> None:  # fmt: skip
        """Set the model's regularisation for the current epoch (also right after any resume)."""
        if self.schedule is None:
            return
        index = self.schedule.index_at(trainer.current_epoch)
        if index == self._applied:
            return
        stage = self.schedule.stages[index]
        if stage.drop_path_rate is not None:
            set_drop_path_rate(pl_module.encoder, stage.drop_path_rate)  # type: ignore[arg-type]
        if stage.dropout is not None:
            set_dropout(_network(pl_module), stage.dropout)
        self._applied = index

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's stage values."""
        if self.schedule is None:
            return
        stage = self.schedule.at(trainer.current_epoch)
        for name in STAGE_VALUES:
            value = getattr(stage, name)
            if value is not None:
                pl_module.log(f"train/{name}", float(value), on_step=False, on_epoch=True)


def _network(pl_module: L.LightningModule) -> Any:  # noqa: ANN401 - the task's network
    return getattr(pl_module, "network", pl_module)


__all__ = [
    "ProgressiveLearning",
    "ProgressiveSchedule",
    "Stage",
    "StagedTransform",
    "check_config",
    "resolve_schedule",
]
