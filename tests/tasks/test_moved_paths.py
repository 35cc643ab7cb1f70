"""Paths from before tasks/ was split by task keep working: old module paths, old YAML class paths, old checkpoints.

Checkpoints record the task's class path (``hyper_parameters["_class_path"]``, e.g. ``tasks.SegmentationTask``)
and the data module's; users' YAML files name the callbacks, writers and plugins by their module paths.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

import lightning  # noqa: E402

import tasks  # noqa: E402
from tasks.export import load_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# What the shipped YAML files and checkpoints named before the split.
OLD_CLASS_PATHS = {
    "tasks.SegmentationTask": "tasks.segmentation.task.SegmentationTask",
    "tasks.DetectionTask": "tasks.detection.task.DetectionTask",
    "tasks.data.MaskDataModule": "tasks.segmentation.data.MaskDataModule",
    "tasks.data.CocoDataModule": "tasks.detection.data.CocoDataModule",
    "tasks.callbacks.SegmentationOverlays": "tasks.segmentation.callbacks.SegmentationOverlays",
    "tasks.predict_seg.SegmentationWriter": "tasks.segmentation.predict.SegmentationWriter",
    "tasks.predict_det.DetectionWriter": "tasks.detection.predict.DetectionWriter",
    "tasks.checkpoint_io.AtomicCheckpointIO": "tasks.common.checkpoint_io.AtomicCheckpointIO",
    "tasks.data.masks.MaskDataModule": "tasks.segmentation.data.MaskDataModule",
    "tasks.data.coco.CocoDataModule": "tasks.detection.data.CocoDataModule",
    "tasks.eval.coco.coco_map": "tasks.detection.coco_eval.coco_map",
    "tasks.predict_seg.predict_folder": "tasks.segmentation.predict.predict_folder",
    "tasks.predict_det.predict_folder": "tasks.detection.predict.predict_folder",
}


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old", sorted(OLD_CLASS_PATHS))
def test_old_class_paths_are_the_same_objects(old):
    pytest.importorskip("effdet")
    assert _resolve(old) is _resolve(OLD_CLASS_PATHS[old])


def test_every_moved_module_imports():
    pytest.importorskip("effdet")
    for old, new in tasks.MOVED_MODULES.items():
        module = importlib.import_module(old)
        target = importlib.import_module(new)
        for name in target.__all__ if hasattr(target, "__all__") else []:
            assert getattr(module, name) is getattr(target, name), (old, name)


def test_old_yaml_class_paths_parse(tmp_path, capsys):
    """A user's YAML written against the old paths still parses (the shipped ones use the new paths)."""
    from tasks.cli import run_cli

    text = (ROOT / "tests" / "conf" / "seg_unet_b0.yaml").read_text()
    for old, new in OLD_CLASS_PATHS.items():
        text = text.replace(f"class_path: {new.replace('.task.', '.').replace('.data.', '.')}", f"class_path: {old}")
        text = text.replace(f"class_path: {new}", f"class_path: {old}")
    assert "tasks.SegmentationTask" in text and "tasks.callbacks.SegmentationOverlays" in text
    config = tmp_path / "old.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: tasks.SegmentationTask" in capsys.readouterr().out


def _old_checkpoint(task: lightning.LightningModule, class_path: str, path: Path) -> Path:
    """A checkpoint as LightningCLI wrote it before the split: the same keys, the old ``_class_path``."""
    hparams = {**task.hparams, "_class_path": class_path, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": lightning.__version__,
                "state_dict": task.state_dict(), "hparams_name": "kwargs", "hyper_parameters": hparams}, path)
    return path


def test_segmentation_checkpoint_from_before_the_move_loads(tmp_path):
    from tasks.segmentation import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3, decoder_options={"decoder_channels": [16, 8, 8, 8, 8]}).eval()
    ckpt = _old_checkpoint(task, "tasks.SegmentationTask", tmp_path / "old.ckpt")
    loaded = load_task(ckpt)
    assert type(loaded) is SegmentationTask
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task(x))


def test_detection_checkpoint_from_before_the_move_loads(tmp_path):
    pytest.importorskip("effdet")
    from tasks.detection import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(num_classes=2, image_size=128).eval()
    ckpt = _old_checkpoint(task, "tasks.DetectionTask", tmp_path / "old.ckpt")
    loaded = load_task(ckpt)
    assert type(loaded) is DetectionTask
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = loaded(x)[0], task(x)[0]
    torch.testing.assert_close(a["scores"], b["scores"])
