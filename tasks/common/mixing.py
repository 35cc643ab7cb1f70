"""Sample-mixing augmentations (CutMix, Mosaic, MixUp) as training-dataset wrappers, seeded per sample.

A mixing wrapper combines a training sample with other samples of the same dataset, after each one went through
the dataset's own pipeline (crop, letterbox, jitter, normalisation). Every random choice (whether to mix, with
which samples, where, and the seeds of those samples' own augmentations) comes from one generator seeded with the
sample seed that :class:`~tasks.common.sampling.EpochSampler` draws from ``(seed, epoch)``; the seed reaches the
wrapper through :func:`~tasks.common.sampling.reseed` in the worker that loads the sample. A mixed batch therefore
depends on the run's seed and the epoch only: the same with any ``num_workers``, on every DDP rank (which shard
the sampler's ``(index, seed)`` pairs), and after a resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from tasks.common.sampling import reseed


def check_probability(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` naming the data option when it is not a probability."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"data option {name}={value} is a probability: set it in [0, 1] (0 turns it off)")
    return float(value)


class MixingDataset(Dataset[dict[str, Any]]):
    """Base of the mixing wrappers: per-sample seeding and access to the other samples.

    Subclasses implement :meth:`mix`, drawing every random choice from :attr:`rng` and reading samples with
    :meth:`sample` (never ``dataset[i]`` directly, whose augmentation would then not be seeded).

    Args:
        dataset: The training dataset (its samples must share one size, as training crops and letterboxes do).
    """

    def __init__(self, dataset: Dataset[dict[str, Any]]) -> None:
        self.dataset = dataset
        self.rng = np.random.default_rng()  # replaced by a seeded one before each sample in training

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_random_seed(self, seed: int) -> None:
        """Seed the next :meth:`__getitem__` (called by :func:`~tasks.common.sampling.reseed`)."""
        self.rng = np.random.default_rng(seed)

    def sample(self, index: int) -> dict[str, Any]:
        """Sample ``index`` of the wrapped dataset, its own augmentation seeded from :attr:`rng`."""
        reseed(self.dataset, int(self.rng.integers(2**31 - 1)))
        return self.dataset[index]

    def other_index(self) -> int:
        """A uniformly drawn index of the wrapped dataset (the partner of a mix)."""
        return int(self.rng.integers(len(self)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.mix(index)

    def mix(self, index: int) -> dict[str, Any]:
        """Sample ``index``, mixed or not."""
        raise NotImplementedError


__all__ = ["MixingDataset", "check_probability"]
