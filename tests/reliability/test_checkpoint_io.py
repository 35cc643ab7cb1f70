import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lightning")

from tasks.common.checkpoint_io import AtomicCheckpointIO, UnsafeCheckpointError, atomic_torch_save, safe_torch_load


class _Payload:
    """Pickling this object would run os.system when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        safe_torch_load(path)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    ckpt = {"state_dict": {"w": torch.arange(3.0)}, "epoch": 2, "hyper_parameters": {"lr": 0.1}}
    io.save_checkpoint(ckpt, tmp_path / "sub" / "last.ckpt")
    back = io.load_checkpoint(tmp_path / "sub" / "last.ckpt")
    assert back["epoch"] == 2 and torch.equal(back["state_dict"]["w"], torch.arange(3.0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["last.ckpt"]  # no temp file left


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL a process while it writes a big checkpoint: the old file must stay loadable."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"version": 1, "w": torch.zeros(4)}, path)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from tasks.common.checkpoint_io import atomic_torch_save
        print("ready", flush=True)
        while True:
            atomic_torch_save({{"version": 2, "w": torch.randn(20_000_000)}}, {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for _ in range(5):  # kill at some point during the repeated 80 MB writes
        try:
            proc.wait(timeout=0.7)
        except subprocess.TimeoutExpired:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    back = safe_torch_load(path)
    assert back["version"] in (1, 2)
    assert back["w"].numel() in (4, 20_000_000)
