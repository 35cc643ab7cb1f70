"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each test on one intra-op thread.

    The tests use small inputs, where a second OpenMP thread gains little; on a busy 2-core machine
    its spin-waiting made forwards up to 50x slower (b0 at 65x97: 0.05 s with one thread vs 1-2 s
    with two at load average 10). Deterministic thresholds are tuned with this setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    """The real datasets in ``../shared/data``; skips when absent (users do not have them)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
