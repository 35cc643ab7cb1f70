"""SIGKILL a real ``fit`` mid-epoch, resume it from ``last.ckpt``: it ends exactly where an uninterrupted run does.

Exact equality holds because nothing random is left to chance: the training order and every sample's
augmentation come from ``(seed, epoch)`` (``tasks.common.sampling``), the position inside the epoch is
saved in the checkpoint (``ResumableDataLoader``), the RNG states are saved and restored
(``tasks.common.checkpoint_io.RngState``), and all runs use one CPU thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEPS_PER_EPOCH, EPOCHS, EVERY, KILL_AT = 4, 2, 3, 6  # 8 images / batch 2; killed in epoch 1, after step 6's save


def _extra_config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"""
trainer:
  max_epochs: {EPOCHS}
  enable_checkpointing: true
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp / name / 'ckpt'}, every_n_train_steps: {EVERY}, save_last: true}}
    - class_path: reliability_callbacks.HangAtStep
    - class_path: reliability_callbacks.DumpMetrics
      init_args: {{path: {tmp / name / 'metrics.json'}}}
    - class_path: tasks.common.checkpoint_io.RngState
  plugins:
    - class_path: tasks.common.checkpoint_io.AtomicCheckpointIO
""")
    return path


def _command(root: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", "fit", "--config", str(HERE / "conf" / "seg_tiny.yaml"),
            "--config", str(_extra_config(tmp, name)), f"--data.root={root}",
            f"--trainer.default_root_dir={tmp / name}", *extra]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 150) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    return generate_masks(tmp_path_factory.mktemp("seg"), SyntheticMaskSpec(num_train=8, num_val=2, size=40))


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(root, tmp_path):
    # 1. The run that gets killed: it blocks after the checkpoint of step KILL_AT; kill -9 it there.
    marker = tmp_path / "hanging"
    env = _env(EB_HANG_AT_STEP=str(KILL_AT), EB_HANG_MARKER=str(marker))
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would block the child
    with log.open("w") as out:
        proc = subprocess.Popen(_command(root, tmp_path, "killed"), cwd=REPO, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 150
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), f"the run never reached step {KILL_AT}: {log.read_text()[-3000:]}"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert marker.read_text().strip() == f"epoch 1 batch {KILL_AT - STEPS_PER_EPOCH}"  # mid-epoch
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)  # intact and weights-only
    assert state["global_step"] == KILL_AT and not (tmp_path / "killed" / "metrics.json.pt").exists()
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]

    # 2. Resume it (same command, `--ckpt_path last`), and 3. run the same config without interruption.
    _run(_command(root, tmp_path, "killed", "--ckpt_path=last"), _env())
    _run(_command(root, tmp_path, "straight"), _env())

    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert resumed["global_step"] == straight["global_step"] == STEPS_PER_EPOCH * EPOCHS
    for key in ("val/miou", "val/loss", "val/pixel_acc"):
        assert resumed[key] == straight[key], (key, resumed, straight)
    a = torch.load(tmp_path / "killed" / "metrics.json.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "metrics.json.pt", weights_only=True)
    differing = [k for k in b if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
