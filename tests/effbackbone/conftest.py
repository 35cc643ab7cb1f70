"""Fixtures for the encoder tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each test on one intra-op thread.

    These tests use small inputs, where a second OpenMP thread gains little; on a shared, busy
    machine its spin-waiting made forwards up to 50x slower (measured: b0 at 65x97, 0.05 s with one
    thread vs 1-2 s with two at load average 10).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
