"""Checkpoint I/O that never leaves a broken file and never runs code from one.

* **Atomic save**: the checkpoint is written to a temporary file in the same directory, flushed
  and fsynced, then ``os.replace``d over the target. A process killed mid-save leaves the previous
  ``last.ckpt`` intact (plus, at worst, a stray ``.tmp`` file that the next save removes).
* **Safe load**: checkpoints are read with ``torch.load(weights_only=True)``; a file that needs
  arbitrary pickled objects is refused with a message naming it, and its payload never runs.
* **RNG state**: :class:`RngState` stores the torch, numpy and Python generators in each checkpoint
  (as tensors and plain tuples, so it still loads weights-only) and restores them when training
  resumes: dropout and drop-path continue exactly as in an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Init arguments that fetch starting weights: a checkpoint already holds every weight, so loading one for
# predict/export/validate must neither need those files nor download them again.
WEIGHT_SOURCES_OFF = {"backbone_weights": None, "pretrained": None, "pretrained_path": None}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint could not be read with ``weights_only=True``."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:  # noqa: ANN401 - any picklable object
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)  # atomic on POSIX within one filesystem
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:  # noqa: ANN401
    """``torch.load(weights_only=True)`` with an error that names the file and the fix."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise unsafe_checkpoint_error(path, e) from e


def unsafe_checkpoint_error(path: str | os.PathLike[str], error: BaseException) -> UnsafeCheckpointError:
    """The error for a file that ``torch.load(weights_only=True)`` refused (``error``)."""
    reason = str(error).strip().splitlines()
    detail = next((line for line in reason if "GLOBAL" in line), reason[0] if reason else "")
    return UnsafeCheckpointError(
        f"refused to load {path}: it is not a weights-only checkpoint ({type(error).__name__}: {detail.strip()}). "
        "Loading it would execute pickled code; only load files you trust, and re-save them with "
        "torch.save(state_dict) or safetensors"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic writes, weights-only reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:  # noqa: ANN401
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None  # noqa: ANN401
    ) -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True`` (the argument cannot turn that off)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return safe_torch_load(path, map_location if map_location is not None else "cpu")


class RngState(L.Callback):
    """Save the global RNG states in checkpoints; restore them when training (re)starts from one."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The generators' states as tensors and plain tuples (weights-only loadable)."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate(),
        }  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the states until training starts (model building and setup draw from the RNGs too)."""
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the states of the checkpoint being resumed from, if any."""
        state, self._pending = self._pending, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
