"""Reproducible, resumable training order and augmentation (evaluation under DDP: :mod:`tasks.common.distributed`).

* :class:`EpochSampler` draws the order of an epoch from ``(seed, epoch)`` only, and a seed for each
  sample's augmentation with it. ``torch``'s ``RandomSampler`` draws from the global RNG, and
  albumentations without a seed from the OS, so neither is reproduced by ``seed_everything``
  nor by a resumed run.
* :class:`SeededDataset` applies the per-sample seed to the wrapped dataset's albumentations
  pipeline, in the worker that loads the sample, so the result does not depend on ``num_workers``.
  With ``with_epoch`` the sampler also hands each sample its epoch, which the pipeline's ``set_epoch`` gets
  first (progressive learning's per-stage pipelines, :mod:`tasks.common.progressive`): workers, persistent or
  not, then follow the epoch without the loader being rebuilt.
* :class:`ResumableDataLoader` counts the batches of the running epoch and is "stateful" for
  Lightning: the count goes into every checkpoint, and a mid-epoch resume skips exactly the
  samples already trained on (single process; under DDP the epoch's order restarts, see
  ``load_state_dict``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def default_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``, the same on every DDP rank), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochSampler(Sampler[tuple[int, ...]]):
    """Yields ``(index, sample_seed[, epoch])``; order and seeds depend only on ``seed`` and the epoch.

    Args:
        length: Dataset length.
        seed: Base seed (e.g. :func:`default_seed` plus the data module's own seed).
        shuffle: Shuffle the order each epoch (else ``0..length-1``, still with per-sample seeds).
        with_epoch: Yield ``(index, sample_seed, epoch)``.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, with_epoch: bool = False) -> None:
        self.length, self.seed, self.shuffle, self.with_epoch = length, seed, shuffle, with_epoch
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch (and forwarded by its DDP sampler wrapper)."""
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        """Skip the first ``samples`` of ``epoch`` the next time that epoch is iterated."""
        self.epoch, self._resume = epoch, (epoch, samples)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        seeds = torch.randint(0, 2**31 - 1, (self.length,), generator=g)
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        for pos in range(start, self.length):
            index, seed = int(order[pos]), int(seeds[pos])
            yield (index, seed, self.epoch) if self.with_epoch else (index, seed)


def reseed(dataset: Any, seed: int) -> None:  # noqa: ANN401 - any dataset
    """Seed the albumentations pipeline(s) of ``dataset`` (attributes ``transform``/``transforms``).

    A dataset with its own ``set_random_seed`` (the mixing wrappers of :mod:`tasks.common.mixing`) is seeded
    through it instead.
    """
    if callable(getattr(dataset, "set_random_seed", None)):
        dataset.set_random_seed(seed)
        return
    for name in ("transform", "transforms"):
        pipeline = getattr(dataset, name, None)
        if callable(getattr(pipeline, "set_random_seed", None)):
            pipeline.set_random_seed(seed)


def set_epoch(dataset: Any, epoch: int) -> None:  # noqa: ANN401 - any dataset
    """Tell the pipeline(s) of ``dataset`` that have a ``set_epoch`` (staged pipelines) the sample's epoch.

    A wrapper (the mixing datasets of :mod:`tasks.common.mixing`) passes it on to the dataset it wraps.
    """
    for name in ("transform", "transforms"):
        pipeline = getattr(dataset, name, None)
        if callable(getattr(pipeline, "set_epoch", None)):
            pipeline.set_epoch(epoch)
    inner = getattr(dataset, "dataset", None)
    if isinstance(inner, Dataset):
        set_epoch(inner, epoch)


class SeededDataset(Dataset[Any]):
    """Wraps a dataset: ``(index, seed[, epoch])`` items set its augmentation first; plain ints pass through."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, ...]) -> Any:  # noqa: ANN401 - the wrapped dataset's sample
        if isinstance(item, tuple):
            item, seed, *epoch = item
            if epoch:
                set_epoch(self.dataset, epoch[0])
            reseed(self.dataset, seed)
        return self.dataset[item]

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the wrapped dataset's attributes
        if name == "dataset":  # not set yet (unpickling in a worker): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict``/``load_state_dict`` (Lightning saves it in checkpoints).

    Use it with an :class:`EpochSampler` and a fixed ``batch_size``. The state is the epoch and the
    number of batches already yielded in it; loading it makes the sampler skip those samples.
    """

    _batches_done = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = _epoch_sampler(self)
        resume = sampler._resume if sampler is not None else None
        self._batches_done = resume[1] // (self.batch_size or 1) if resume and resume[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}`` of the running epoch."""
        sampler = _epoch_sampler(self)
        return {"epoch": sampler.epoch if sampler is not None else 0, "batches": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` stopped: the same epoch, minus the batches already trained on."""
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        inner = _epoch_sampler(self)
        if inner is None:
            return
        if batches >= len(self):  # the epoch had finished: the next one starts from its beginning
            inner.set_epoch(epoch + 1)
            return
        if self.sampler is not inner:  # Lightning's DDP wrapper shards the order: skipping would misalign it
            inner.set_epoch(epoch)
            if batches:
                warnings.warn(
                    f"resuming mid-epoch under DDP: epoch {epoch} restarts its sample order, and its remaining "
                    f"batches come from the start of it ({batches} batch(es) were done before the checkpoint)",
                    UserWarning,
                    stacklevel=2,
                )
            return
        inner.resume_at(epoch, batches * (self.batch_size or 1))


def _epoch_sampler(loader: DataLoader) -> EpochSampler | None:
    """The loader's :class:`EpochSampler`, also when Lightning wrapped it for DDP."""
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        return sampler
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DistributedSamplerWrapper
    return inner if isinstance(inner, EpochSampler) else None


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    collate_fn: Any,  # noqa: ANN401 - the task's collate function
    num_workers: int = 0,
    train: bool = False,
) -> DataLoader:
    """The data loader of a split, the same for every task.

    Training: seeded order and augmentation, resumable mid-epoch (:class:`ResumableDataLoader`), and a
    short last batch dropped (BatchNorm fails on a batch of one, e.g. EfficientDet's 1x1 top level).
    Evaluation: each image to one rank only under DDP (:func:`~tasks.common.distributed.unrepeated_eval_sampler`),
    so padded repeats do not count twice.
    """
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "collate_fn": collate_fn,
                              "persistent_workers": num_workers > 0}  # fmt: skip
    if train:
        sampler = EpochSampler(len(dataset), default_seed(), with_epoch=True)  # type: ignore[arg-type]
        return ResumableDataLoader(SeededDataset(dataset), sampler=sampler, drop_last=len(dataset) > batch_size,  # type: ignore[arg-type]
                                   **common)  # fmt: skip
    from tasks.common.distributed import unrepeated_eval_sampler

    return DataLoader(dataset, sampler=unrepeated_eval_sampler(dataset), **common)


__all__ = [
    "EpochSampler",
    "ResumableDataLoader",
    "SeededDataset",
    "default_seed",
    "make_loader",
    "reseed",
    "set_epoch",
]
