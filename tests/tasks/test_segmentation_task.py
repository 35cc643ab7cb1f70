"""SegmentationTask: any input size, modes, losses, metrics, weight decay groups, freezing, tiling."""

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("segmentation_models_pytorch")

import lightning as L  # noqa: E402

from effbackbone.activations import BatchNormAct2d  # noqa: E402
from tasks.segmentation import SegmentationTask  # noqa: E402
from tasks.segmentation.losses import CompositeLoss, parse_loss  # noqa: E402
from tasks.segmentation.tiling import sliding_window  # noqa: E402

SMALL = {"decoder_channels": [32, 16, 16, 8, 8]}


def _task(**kw):
    kw.setdefault("decoder_options", SMALL)
    return SegmentationTask(**kw)


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
def test_forward_any_size_crops_back(decoder):
    task = _task(decoder=decoder, num_classes=3, decoder_options=SMALL if decoder == "unet" else None).eval()
    with torch.no_grad():
        assert task(torch.randn(1, 3, 45, 70)).shape == (1, 3, 45, 70)


def test_channels_last_and_memory_options_give_the_same_training_step():
    # channels_last changes the layout only, memory_efficient/grad_checkpointing what is kept for backward:
    # the loss and every gradient match the plain task.
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    grads = []
    lean = {"encoder_options": {"memory_efficient": True, "grad_checkpointing": True}}
    for kw in ({}, {"channels_last": True}, lean):
        torch.manual_seed(0)
        task = _task(num_classes=3, **kw).train()
        memory_efficient = any(isinstance(m, BatchNormAct2d) for m in task.modules())
        assert memory_efficient == ("encoder_options" in kw)
        logits = task(x)
        assert logits.is_contiguous(memory_format=torch.channels_last) == bool(kw.get("channels_last"))
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.parameters()]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-5)


def test_grayscale_input_and_phi_encoder():
    task = _task(num_classes=2, in_channels=1, phi=0.5).eval()
    assert task.model.encoder.model.cfg.in_channels == 1
    with torch.no_grad():
        assert task(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


@pytest.mark.parametrize(
    ("mode", "num_classes", "channels"), [("binary", 2, 1), ("multiclass", 3, 3), ("multilabel", 3, 3)]
)
def test_modes_losses_and_metrics_with_ignored_pixels(mode, num_classes, channels):
    task = _task(mode=mode, num_classes=num_classes, loss="ce+dice+focal", loss_weights=[1.0, 0.5, 2.0])
    image = torch.randn(2, 3, 32, 32)
    shape = (2, num_classes, 32, 32) if mode == "multilabel" else (2, 32, 32)
    target = torch.randint(0, 2 if mode != "multiclass" else num_classes, shape)
    target[..., :8] = -100
    logits = task(image)
    assert logits.shape[1] == channels
    loss = task.criterion(logits, target)
    parts = task.criterion.parts
    assert torch.isclose(loss, parts["ce"] + 0.5 * parts["dice"] + 2.0 * parts["focal"])
    loss.backward()
    assert task.model.segmentation_head[0].weight.grad is not None
    # Predictions at ignored pixels do not change the loss.
    other = logits.detach().clone()
    other[..., :8] = torch.randn_like(other[..., :8]) * 10
    assert torch.isclose(task.criterion(other, target), loss.detach())
    task.val_metrics.update(task.labels(task.probabilities(logits.detach())), target)
    values = task.val_metrics.compute()
    expected = {f"val/iou_class_{i}" for i in range(num_classes)} | {"val/miou", "val/mdice", "val/pixel_acc"}
    assert expected <= set(values)
    assert 0 <= values["val/miou"] <= 1


def test_perfect_prediction_scores_one():
    task = _task(num_classes=3, class_names=["bg", "a", "b"])
    target = torch.randint(0, 3, (2, 16, 16))
    target[0, 0] = -100
    task.test_metrics.update(target.clamp(min=0), target)
    values = task.test_metrics.compute()
    assert values["test/miou"] == 1 and values["test/iou_a"] == 1 and values["test/pixel_acc"] == 1


def test_loss_spec_errors():
    assert parse_loss("CE + dice", [2, 1]) == [("ce", 2.0), ("dice", 1.0)]
    with pytest.raises(ValueError, match="terms must be distinct names among ce, dice, focal"):
        parse_loss("ce+lovasz", None)
    with pytest.raises(ValueError, match="2 terms but loss_weights has 1"):
        CompositeLoss("ce+dice", "multiclass", -100, [1.0])
    with pytest.raises(ValueError, match="mode='binary' needs num_classes=2"):
        _task(mode="binary", num_classes=3)


def test_no_weight_decay_on_norms_and_biases():
    opt = lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05)  # noqa: E731
    task = _task(num_classes=2, optimizer=opt, lr_schedule="constant")  # no trainer: no per-step schedule
    optimizer = task.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(task.parameters()))


class _Snapshots(L.Callback):
    def __init__(self):
        self.encoder = []

    def on_train_epoch_end(self, trainer, pl_module):
        enc = pl_module.model.encoder
        self.encoder.append({k: v.detach().clone() for k, v in enc.state_dict().items()})


def test_encoder_frozen_for_first_epochs_then_trained():
    task = _task(num_classes=2, freeze_encoder_epochs=1)
    before = {k: v.clone() for k, v in task.model.encoder.state_dict().items()}
    head_before = task.model.segmentation_head[0].weight.detach().clone()
    batches = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))}] * 2
    snaps = _Snapshots()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=1, limit_val_batches=0, callbacks=[snaps],
    )  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    epoch0, epoch1 = snaps.encoder
    # Epoch 0: weights and BatchNorm running statistics untouched; the decoder trained.
    assert all(torch.equal(before[k], epoch0[k]) for k in before if "num_batches_tracked" not in k)
    assert not torch.equal(head_before, task.model.segmentation_head[0].weight)
    # Epoch 1: the encoder trains (same optimizer: it held the encoder parameters all along).
    assert any(not torch.equal(epoch0[k], epoch1[k]) for k in epoch0 if k.endswith("weight"))
    assert all(p.requires_grad for p in task.model.encoder.parameters())


def test_sliding_window_covers_and_averages():
    image = torch.arange(2 * 70 * 45, dtype=torch.float32).reshape(1, 2, 70, 45)
    calls = []

    def fn(x):
        calls.append(x.shape)
        return x * 2

    out = sliding_window(fn, image, tile=32, overlap=0.5)
    assert torch.allclose(out, image * 2)  # every pixel covered, overlaps averaged exactly
    assert all(s[-2:] == (32, 32) for s in calls)
    counts = sliding_window(lambda x: torch.ones_like(x[:, :1]), image, tile=32, overlap=0.5)
    assert torch.equal(counts, torch.ones(1, 1, 70, 45))
    # Smaller than a tile: one call on the whole image.
    calls.clear()
    sliding_window(fn, image[..., :20, :30], tile=32)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="overlap must be in"):
        sliding_window(fn, image, tile=32, overlap=1.0)


def test_tiled_prediction_of_a_large_image():
    task = _task(num_classes=3, tile_size=32).eval()
    probs = task.predict_probabilities(torch.randn(1, 3, 50, 75))
    assert probs.shape == (1, 3, 50, 75)
    assert torch.allclose(probs.sum(1), torch.ones(1, 50, 75), atol=1e-5)
