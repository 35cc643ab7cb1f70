"""Seeded, resumable training order and augmentation; RNG state through a weights-only checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
A = pytest.importorskip("albumentations")

from lightning.fabric.utilities.distributed import DistributedSamplerWrapper  # noqa: E402
from lightning.fabric.utilities.types import _Stateful  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tasks.common.checkpoint_io import AtomicCheckpointIO, RngState  # noqa: E402
from tasks.common.sampling import EpochSampler, ResumableDataLoader, SeededDataset  # noqa: E402


class Augmented(Dataset):
    """Index -> a randomly flipped and cropped ramp, through albumentations (as the real datasets)."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self.transform = A.Compose([A.HorizontalFlip(p=0.5), A.RandomResizedCrop(size=(4, 4), scale=(0.3, 1.0))])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        image = np.arange(64, dtype=np.float32).reshape(8, 8, 1) + 100 * i
        return torch.from_numpy(self.transform(image=image)["image"])


def _epoch(loader) -> torch.Tensor:
    return torch.cat([b.flatten() for b in loader])


def test_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(a)
    torch.manual_seed(456)
    assert list(b) == first and sorted(i for i, _ in first) == list(range(10))
    a.set_epoch(1)
    assert [i for i, _ in a] != [i for i, _ in first]
    assert [i for i, _ in EpochSampler(10, seed=4)] != [i for i, _ in first]


def test_augmentation_is_reproducible_and_independent_of_workers():
    loader = lambda workers: DataLoader(SeededDataset(Augmented()), batch_size=2, sampler=EpochSampler(10, seed=0),  # noqa: E731
                                        num_workers=workers)  # fmt: skip
    single = _epoch(loader(0))
    assert torch.equal(single, _epoch(loader(0)))
    assert torch.equal(single, _epoch(loader(2)))
    # Unseeded albumentations (what the loaders used before) differs from run to run.
    plain = DataLoader(Augmented(), batch_size=2)
    assert not all(torch.equal(_epoch(plain), _epoch(plain)) for _ in range(3))


def test_loader_state_resumes_mid_epoch_exactly():
    full = ResumableDataLoader(SeededDataset(Augmented()), batch_size=2, sampler=EpochSampler(10, seed=0))
    assert isinstance(full, _Stateful)
    full.sampler.set_epoch(2)
    batches = list(full)
    # A loader that stopped after 2 batches of epoch 2 ...
    first = ResumableDataLoader(SeededDataset(Augmented()), batch_size=2, sampler=EpochSampler(10, seed=0))
    first.sampler.set_epoch(2)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    # ... and a fresh one given its state yield exactly the remaining batches.
    resumed = ResumableDataLoader(SeededDataset(Augmented()), batch_size=2, sampler=EpochSampler(10, seed=0))
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, batches[2:], strict=True))
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    assert len(list(resumed)) == 5  # the skip applies once


def test_state_of_a_finished_epoch_starts_the_next_one():
    loader = ResumableDataLoader(SeededDataset(Augmented()), batch_size=2, sampler=EpochSampler(10, seed=0))
    loader.load_state_dict({"epoch": 0, "batches": 5})
    assert loader.sampler.epoch == 1 and len(list(loader)) == 5


def test_under_the_ddp_wrapper_the_epoch_is_forwarded_and_no_sample_is_skipped():
    inner = EpochSampler(10, seed=0)
    wrapped = DistributedSamplerWrapper(inner, num_replicas=2, rank=1, shuffle=False)
    loader = ResumableDataLoader(SeededDataset(Augmented()), batch_size=2, sampler=wrapped)
    wrapped.set_epoch(3)
    assert inner.epoch == 3
    with pytest.warns(UserWarning, match="resuming mid-epoch under DDP: epoch 3 restarts its sample order"):
        loader.load_state_dict({"epoch": 3, "batches": 1})
    indices = [i for i, _ in wrapped]
    assert indices == [i for i, _ in inner][1::2]  # rank 1's full share, nothing skipped or misaligned


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    cb = RngState()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    AtomicCheckpointIO().save_checkpoint({"callbacks": {"RngState": cb.state_dict()}}, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    back = AtomicCheckpointIO().load_checkpoint(tmp_path / "c.ckpt")  # weights_only=True
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restored = RngState()
    restored.load_state_dict(back["callbacks"]["RngState"])
    restored.on_train_start(None, None)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
