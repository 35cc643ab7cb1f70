"""A few dozen CPU steps of Mask R-CNN on tiny generated data must lower the loss, the mask loss included."""

from __future__ import annotations

from functools import partial

import pytest
import torch

pytest.importorskip("pycocotools")
import lightning as L  # noqa: E402

from tasks.instance import CocoInstanceDataModule, InstanceTask  # noqa: E402
from tasks.instance.synthetic import SyntheticInstanceSpec  # noqa: E402

# Eight 64-pixel images with one large shape each, no augmentation: 32 steps of batch 4 (16 epochs).
EASY = SyntheticInstanceSpec(num_train=8, num_val=2, num_classes=2, min_size=56, max_size=64, max_objects=1,
                             empty_fraction=0.0, object_scale=(0.4, 0.6), crowd_fraction=0.0, seed=0)  # fmt: skip
STEPS = 32


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def test_loss_falls_over_a_few_dozen_steps(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread avoids oversubscription stalls
    try:
        L.seed_everything(0, workers=True)
        dm = CocoInstanceDataModule(root=str(tmp_path / "easy"), image_size=64, batch_size=4, augment=False,
                                    synthetic=EASY)  # fmt: skip
        task = InstanceTask(
            num_classes=dm.num_classes, image_size=64, fpn_channels=32, box_head_width=64, mask_head_width=32,
            anchor_sizes=[8, 16, 32, 64, 128], backbone_options={"phi": -3}, lr_schedule="constant",
            optimizer=partial(torch.optim.AdamW, lr=2e-3),
            detector_options={"rpn_post_nms_top_n_train": 50, "box_batch_size_per_image": 32},
        )  # fmt: skip
        losses = _Losses()
        trainer = L.Trainer(
            max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[losses],
        )  # fmt: skip
        trainer.fit(task, dm)
    finally:
        torch.set_num_threads(n)
    assert len(losses.steps) == STEPS

    def mean(key: str, steps: list[dict[str, float]]) -> float:
        return sum(s[key] for s in steps) / len(steps)

    # Measured with this seed (torch 2.14.1, torchvision 0.29.1): mean over the first and the last 8 steps, loss
    # 2.0 -> 0.69, mask loss 0.98 -> 0.36, RPN objectness 0.64 -> 0.03.
    first, last = losses.steps[:8], losses.steps[-8:]
    for key, factor in (("train/loss", 0.6), ("train/loss_mask", 0.7), ("train/loss_objectness", 0.5)):
        assert mean(key, last) < factor * mean(key, first), (key, mean(key, first), mean(key, last))
