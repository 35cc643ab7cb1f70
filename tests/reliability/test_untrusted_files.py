"""Untrusted files: a crafted pickle checkpoint is refused on every CLI path, and its payload never runs."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import main  # noqa: E402
from tasks.common.checkpoint_io import UnsafeCheckpointError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "tests" / "conf"


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that looks like Lightning's (zip format, usual keys) but carries a payload."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"note": _Payload(marker)}}, path)  # fmt: skip
    return path, marker


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> Path:
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    return generate_masks(tmp_path_factory.mktemp("seg"), SyntheticMaskSpec(num_train=2, num_val=1, size=32))


@pytest.mark.parametrize("command", ["fit", "validate", "predict"])
def test_cli_refuses_a_crafted_checkpoint(evil, seg_root, tmp_path, command):
    path, marker = evil
    args = [command, "--config", str(CONF / "seg_unet_b0.yaml"), f"--data.root={seg_root}",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--ckpt_path={path}"]  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.ckpt: it is not a weights-only"):
        main(args)
    assert not marker.exists()


def test_cli_without_the_plugin_in_the_config_still_refuses(evil, tmp_path):
    # det_d0.yaml names no checkpoint plugin: the CLI adds AtomicCheckpointIO itself.
    pytest.importorskip("effdet")
    path, marker = evil
    args = ["validate", "--config", str(CONF / "det_d0.yaml"), f"--data.root={tmp_path / 'det'}",
            f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"]  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt"):
        main(args)
    assert not marker.exists()


def test_export_refuses_a_crafted_checkpoint(evil, tmp_path):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt"):
        main(["export", "--ckpt", str(path), "--output", str(tmp_path / "m.onnx")])
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_checkpoint_naming_a_foreign_class(tmp_path):
    # Weights-only, but its _class_path names something that is not a LightningModule.
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system"}}, path)
    with pytest.raises(ValueError, match=r"odd\.ckpt names class 'os\.system', which is not a LightningModule"):
        main(["export", "--ckpt", str(path), "--output", str(tmp_path / "m.onnx")])


def test_detection_predict_folder_refuses_a_crafted_checkpoint(evil, tmp_path):
    pytest.importorskip("effdet")
    from tasks.detection.predict import predict_folder

    path, marker = evil
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global|evil\.ckpt"):
        predict_folder(str(path), tmp_path, tmp_path / "out")
    assert not marker.exists()


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """``(line, has weights_only=True)`` for each ``torch.load(...)`` call in a Python file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load_from_checkpoint") or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load_from_checkpoint"
        ):  # fmt: skip
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)  # fmt: skip
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_package_is_weights_only():
    """Grep-as-a-test: library code never unpickles without ``weights_only=True``."""
    unsafe = [f"{py.relative_to(REPO)}:{line}"
              for pkg in ("effbackbone", "tasks") for py in sorted((REPO / pkg).rglob("*.py"))
              for line, safe in _torch_load_calls(py) if not safe]  # fmt: skip
    assert not unsafe, f"torch.load / load_from_checkpoint without weights_only=True: {unsafe}"
    found = sum(len(_torch_load_calls(py)) for pkg in ("effbackbone", "tasks") for py in (REPO / pkg).rglob("*.py"))
    assert found >= 3  # the scan sees the known call sites (weights.py, checkpoint_io.py, export.py)
