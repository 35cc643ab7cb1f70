"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Real datasets for the few tests that use them: $EFFBACKBONE_TEST_DATA/<name>, by default the data folder
# next to the repository (../shared/data). What each one is, in the words of a skip message:
_DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA = Path(os.environ.get("EFFBACKBONE_TEST_DATA", _DEFAULT_DATA))
REAL_DATASETS = {
    "raccoon": "the raccoon detection dataset (COCO format: annotations/instances_{train,val}.json and "
    "{train,val}/images, 160 + 40 photos, one class)",
    "isbi2012_membrane": "the ISBI 2012 EM membrane dataset (train/ and val/ with images/ and masks/, 24 + 6 "
    "grayscale 512x512 slices, classes.json)",
}


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


def real_dataset(name: str) -> Path:
    """The folder of real dataset ``name``; the test is skipped, naming the dataset and where it is read
    from, when it is absent (users and most CI machines do not have it)."""
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"needs {REAL_DATASETS[name]}; the test reads it from {root} (set EFFBACKBONE_TEST_DATA to "
                    f"the folder that holds {name}/)")  # fmt: skip
    return root


@pytest.fixture
def raccoon_data() -> Path:
    """The raccoon COCO dataset (skips when absent)."""
    return real_dataset("raccoon")


@pytest.fixture
def membrane_data() -> Path:
    """The ISBI 2012 membrane dataset (skips when absent)."""
    return real_dataset("isbi2012_membrane")


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty HF and torch.hub caches, no weights dir, and no connection but to 127.0.0.1 (the download tests)."""
    from hub_server import loopback_only, use_hub

    from effbackbone.hub import WEIGHTS_DIR_ENV

    loopback_only(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf-hub", offline=True)
    return tmp_path


@pytest.fixture
def server() -> Iterator[object]:
    """A weights server on 127.0.0.1 (:mod:`hub_server`) for the test's duration."""
    from hub_server import serving

    with serving() as s:
        yield s
