"""Pruned encoders in the tasks: levels kept, trained by ``fit``, saved and reloaded as normal checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

from effbackbone.model import EfficientNet  # noqa: E402
from effbackbone.prune import expansion_widths  # noqa: E402
from tasks.common.pruning import main as prune_main  # noqa: E402
from tasks.segmentation import SegmentationTask  # noqa: E402

SMALL = {"decoder_channels": [16, 16, 8, 8, 8]}


def _task(**kw: object) -> SegmentationTask:
    return SegmentationTask(variant="b0", num_classes=2, decoder_options=SMALL, channels_last=True, **kw)


def _fit(task: SegmentationTask, root: Path, steps: int = 2) -> L.Trainer:
    batches = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))}] * steps
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def _encoder(task: SegmentationTask) -> EfficientNet:
    return next(m for m in task.model.modules() if isinstance(m, EfficientNet))


def test_prune_option_keeps_levels_and_fine_tunes_then_reloads(tmp_path: Path) -> None:
    dense, task = _task(), _task(prune=0.5)
    before, after = expansion_widths(dense.model), expansion_widths(task.model)
    assert set(before) == set(after) and all(after[k] < before[k] for k in before)
    encoder = _encoder(task)
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 64))
    assert [(s.name, s.channels) for s in encoder.feature_specs] == [(k, v.shape[1]) for k, v in features.items()]
    assert encoder.feature_specs == _encoder(dense).feature_specs  # the levels a decoder reads are unchanged
    weights = {k: v.clone() for k, v in task.state_dict().items()}
    trainer = _fit(task, tmp_path)
    assert any(not torch.equal(weights[k], v) for k, v in task.state_dict().items() if k.endswith("conv_pw.weight"))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    loaded = SegmentationTask.load_from_checkpoint(tmp_path / "pruned.ckpt", weights_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task.eval()(x))


def test_pruned_checkpoint_of_a_trained_task_loads_and_fine_tunes(tmp_path: Path) -> None:
    task = _task(ema_decay=0.9)
    _fit(task, tmp_path).save_checkpoint(tmp_path / "dense.ckpt")
    assert prune_main([str(tmp_path / "dense.ckpt"), str(tmp_path / "p.ckpt"), "--ratio", "0.25"]) == 0
    record = torch.load(tmp_path / "p.ckpt", weights_only=True)
    assert record["pruning"]["ratio"] == 0.25 and "optimizer_states" not in record
    # Built dense from the hyper-parameters, resized to the file's widths while loading.
    pruned = SegmentationTask.load_from_checkpoint(tmp_path / "p.ckpt", weights_only=True)
    assert expansion_widths(pruned.model) == record["pruning"]["widths"]
    assert expansion_widths(pruned.ema.module) == record["pruning"]["widths"]
    _fit(pruned, tmp_path / "ft").save_checkpoint(tmp_path / "ft.ckpt")  # the optimizer holds the pruned weights
    reloaded = SegmentationTask.load_from_checkpoint(tmp_path / "ft.ckpt", weights_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned.eval()(x))


def test_prune_option_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match=r"prune=1.5 must be a fraction"):
        _task(prune=1.5)
