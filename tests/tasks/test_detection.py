"""DetectionTask through the CLI (fit, predict) and its options (EMA, frozen backbone, checks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("effdet")
pytest.importorskip("pycocotools")
pytest.importorskip("jsonargparse")

from coco_shapes import many_class_coco  # noqa: E402

from tasks.cli import main, run_cli  # noqa: E402
from tasks.detection import DetectionTask  # noqa: E402
from tasks.detection.anchors import match_share  # noqa: E402
from tasks.detection.data import CocoDataModule  # noqa: E402
from tasks.detection.predict import predict_folder  # noqa: E402
from tasks.detection.synthetic import SyntheticCocoSpec  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf" / "det_d0.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is 2 shared cores: one intra-op thread avoids oversubscription stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short CLI fit (2 steps + validation) on generated COCO data with sparse ids 3, 17, 90."""
    root = tmp_path_factory.mktemp("det")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = run_cli(["fit", "--config", CONF, f"--data.init_args.root={root / 'data'}",
                       f"--trainer.default_root_dir={root}"])
    finally:
        torch.set_num_threads(n)
    return SimpleNamespace(root=root, cli=cli, ckpt=root / "checkpoints" / "last.ckpt")


def test_cli_fit_fast_dev_run_frozen_backbone_mixed_precision(tmp_path):
    # bf16 autocast on the CPU goes through the same mixed-precision path as 16-mixed on a GPU.
    args = ["fit", "--config", CONF, "--trainer.fast_dev_run=true", f"--data.init_args.root={tmp_path / 'data'}",
            f"--trainer.default_root_dir={tmp_path}", "--model.init_args.freeze_backbone=true",
            "--model.init_args.ema_decay=null", "--trainer.precision=bf16-mixed"]
    assert main(args) == 0
    assert (tmp_path / "data" / "annotations" / "instances_train.json").is_file()  # generated on first use


@pytest.mark.parametrize("name", ["quickstart_d0", "raccoon_d0", "raccoon_lite0_pretrained"])
def test_shipped_configs_parse(name, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "detection" / f"{name}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "tasks.detection.DetectionTask" in capsys.readouterr().out


def test_cli_fit_logs_coco_map_and_checkpoints_categories(trained):
    metrics = trained.cli.trainer.callback_metrics
    for name in ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl", "val/loss", "train/loss"):
        assert name in metrics, name
    for shape in ("rectangle", "ellipse", "triangle"):  # per class, by name
        assert f"val/AP_{shape}" in metrics and f"val/AP50_{shape}" in metrics
    assert 0.0 <= float(metrics["val/AP"]) <= 1.0
    task = trained.cli.model
    assert task.num_classes == 3 and task.category_ids == (3, 17, 90)  # linked from the data, sparse ids kept
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    assert ckpt["detection_categories"]["category_ids"] == [3, 17, 90]
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])


def test_predict_folder_from_checkpoint(trained, tmp_path):
    images = trained.root / "data" / "val" / "images"
    results_path = predict_folder(trained.ckpt, images, tmp_path / "pred", batch_size=2, score_threshold=0.0)
    results = json.loads(results_path.read_text())
    index = json.loads((tmp_path / "pred" / "images.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in index["images"]}
    assert len(sizes) == len(list(images.iterdir())) and results
    assert {r["category_id"] for r in results} <= {3, 17, 90}
    for r in results:  # original-image pixels: inside the image the box was found in
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
    assert len(list((tmp_path / "pred").glob("*_det.png"))) == len(sizes)


def test_cli_predict_writes_results(trained, tmp_path):
    args = ["predict", "--config", CONF, f"--ckpt_path={trained.ckpt}",
            f"--data.init_args.root={trained.root / 'data'}",
            f"--data.init_args.predict_dir={trained.root / 'data' / 'val' / 'images'}",
            f"--trainer.default_root_dir={tmp_path}"]
    assert main(args) == 0
    results = json.loads((tmp_path / "predictions" / "results.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 17, 90}
    assert (tmp_path / "predictions" / "images.json").is_file()


def test_ema_weights_are_used_for_evaluation():
    task = DetectionTask(num_classes=2, image_size=128, ema_decay=0.5)
    assert task.eval_bench() is task.ema.module
    param = task.detector.model.class_net.predict.conv_pw.weight
    ema_param = task.ema.module.model.class_net.predict.conv_pw.weight
    task.ema.update_parameters(task.detector)  # first update copies
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    task.ema.update_parameters(task.detector)  # warm-up decay min(0.5, 2/11) = 2/11
    torch.testing.assert_close(ema_param, start + 9 / 11)
    assert not any(p.requires_grad for p in task.ema.parameters())


def test_frozen_backbone_is_excluded_and_kept_in_eval():
    task = DetectionTask(num_classes=2, image_size=128, freeze_backbone=True, lr_schedule="constant")
    task.train()
    backbone = task.detector.model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not any(m.training for m in backbone.modules())
    assert task.detector.model.fpn.training
    optimizer = task.configure_optimizers()
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in backbone.parameters()}
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == [0.0, optimizer.defaults["weight_decay"]]  # norms/biases get none


def test_setup_checks_classes_and_image_size(tmp_path):
    spec = SyntheticCocoSpec(num_train=2, num_val=1, num_classes=3, min_size=40, max_size=60)
    dm = CocoDataModule(root=str(tmp_path), image_size=128, synthetic=spec)
    task = DetectionTask(num_classes=2, image_size=128)
    task._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(ValueError, match="num_classes=3"):
        task.setup("fit")
    task = DetectionTask(num_classes=3, image_size=256)
    task._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(ValueError, match="image_size"):
        task.setup("fit")


def test_forward_maps_to_original_pixels():
    task = DetectionTask(num_classes=2, image_size=128).eval()
    with torch.no_grad():
        dets = task(torch.randn(2, 3, 128, 128), torch.tensor([2.0, 0.5]), torch.tensor([[256.0, 100.0], [64.0, 64.0]]))
    assert len(dets) == 2
    for det, (w, h) in zip(dets, [(256, 100), (64, 64)], strict=True):
        b = det["boxes_xyxy"]
        assert b.shape[1] == 4 and len(b) == len(det["scores"]) == len(det["labels"])
        assert bool((b[:, 2] <= w).all() and (b[:, 3] <= h).all() and (b >= 0).all())
        assert bool(((det["labels"] >= 0) & (det["labels"] < 2)).all())


def test_channels_last_gives_the_same_training_step():
    images = torch.randn(2, 3, 128, 128)
    batch = {
        "boxes_xyxy": [torch.tensor([[10.0, 12.0, 70.0, 90.0]]), torch.tensor([[30.0, 5.0, 120.0, 60.0]])],
        "labels": [torch.tensor([0]), torch.tensor([1])],
        "img_scale": torch.ones(2), "img_size": torch.full((2, 2), 128.0),
    }
    losses, grads = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        task = DetectionTask(num_classes=2, image_size=128, channels_last=channels_last).train()
        step_batch = {**batch, "image": task.prepare_images(images.clone())}
        assert step_batch["image"].is_contiguous(memory_format=torch.channels_last) == channels_last
        out = task.detector(step_batch["image"], task._target(step_batch))
        out["loss"].backward()
        losses.append(out["loss"].detach())
        grads.append(torch.cat([p.grad.flatten() for p in task.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    # Float rounding differs between the layouts' kernels; summed over every pixel it stays tiny.
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-4


def test_cli_model_option_overrides_the_checkpoint_ema(trained, tmp_path):
    """``--model.init_args.ema_decay null`` with ``--ckpt_path`` must reach the model (Lightning re-applied the
    checkpoint's hyper-parameters over it, so the EMA weights were validated again: identical numbers)."""
    base = ["validate", "--config", CONF, f"--ckpt_path={trained.ckpt}",
            f"--data.init_args.root={trained.root / 'data'}", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    with_ema = run_cli(base)
    raw = run_cli([*base, "--model.init_args.ema_decay", "null"])
    assert with_ema.model.ema is not None and raw.model.ema is None
    ema_loss, raw_loss = (float(c.trainer.callback_metrics["val/loss"]) for c in (with_ema, raw))
    assert ema_loss != raw_loss  # the raw weights were validated, not the EMA ones again


def test_ema_validation_has_no_jump_on_many_classes(tmp_path):
    """A short run with 80 classes: the EMA weights (what validates) must score like the raw weights.

    The issue's jump (val class loss 1.21 -> 32.9, EMA suspected) would show as an EMA loss far above the raw
    weights' on the same batches; a broken EMA (wrong buffers, decay, warm-up) fails here.
    """
    dm = CocoDataModule(root=str(many_class_coco(tmp_path)), image_size=128, batch_size=4, augment=False)
    dm.setup("fit")
    torch.manual_seed(0)
    task = DetectionTask(num_classes=dm.num_classes, image_size=128, ema_decay=0.99, bn_momentum=0.1)
    assert task.num_classes == 80
    optimizer = torch.optim.AdamW(task.detector.parameters(), lr=1e-3)

    def val_class_loss(bench) -> float:
        bench.eval()
        with torch.no_grad():
            losses = [float(bench(b["image"], {**task._target(b), **task._letterbox_info(b["img_size"])[0]})
                            ["class_loss"]) for b in dm.val_dataloader()]  # fmt: skip
        return sum(losses) / len(losses)

    history = []
    for _epoch in range(2):
        task.detector.train()
        for batch in dm.train_dataloader():
            out = task.detector(batch["image"], task._target(batch))
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            task.ema.update_parameters(task.detector)
        history.append((val_class_loss(task.ema.module), val_class_loss(task.detector), float(out["class_loss"])))
    for ema_loss, raw_loss, train_loss in history:
        assert math.isfinite(ema_loss) and ema_loss < 3 * max(raw_loss, train_loss), history
    assert history[1][0] < 3 * history[0][0], history  # no jump from one epoch to the next


def test_checkpoint_without_ema_loads_into_a_task_with_ema():
    plain = DetectionTask(num_classes=2, image_size=128)
    checkpoint = {"state_dict": plain.state_dict()}
    task = DetectionTask(num_classes=2, image_size=128, ema_decay=0.9)
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"])  # strict: the EMA keys were filled from the raw weights
    w = "model.class_net.predict.conv_pw.weight"
    torch.testing.assert_close(task.ema.module.state_dict()[w], plain.detector.state_dict()[w])


def _small_boxes(n_images: int = 40, per_image: int = 30, size: int = 256) -> np.ndarray:
    """Blood-smear-like boxes in model pixels: ~30 cells of 9-16 px per image, slightly tall."""
    rng = np.random.default_rng(0)
    wh = rng.uniform(9, 16, (n_images * per_image, 2)) * np.array([[1.0, 1.25]])
    xy = rng.uniform(0, size - 25, (n_images * per_image, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_anchors_auto_raises_the_match_share_and_survives_the_checkpoint(tmp_path):
    boxes = _small_boxes()
    task = DetectionTask(num_classes=3, image_size=256, anchors="auto", ema_decay=0.9)
    before = match_share(boxes, task.current_anchors(), 256)
    task._fit_anchors(boxes)
    after = match_share(boxes, task.current_anchors(), 256)
    assert before < 0.05 and after > 0.75 and task.anchor_spec is not None  # measured: 0.0% -> 81.8%
    torch.testing.assert_close(task.ema.module.anchors.boxes, task.detector.anchors.boxes)
    # Saved in the checkpoint; a task built from it (predict) rebuilds the same anchors.
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    restored = DetectionTask(num_classes=3, image_size=256, anchors="auto", ema_decay=0.9)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(restored.detector.anchors.boxes, task.detector.anchors.boxes)
    assert restored.current_anchors() == task.current_anchors()
    restored.eval()
    with torch.no_grad():  # the predictor is built on the fitted anchors
        restored(torch.zeros(1, 3, 256, 256))
    torch.testing.assert_close(next(iter(restored._predictor.values())).anchors.boxes, task.detector.anchors.boxes)


def test_low_anchor_match_share_warns_and_suggests_auto():
    task = DetectionTask(num_classes=3, image_size=256)
    with pytest.warns(UserWarning, match=r"only \d+\.\d% of the 1200 training boxes .*init_args.anchors=auto"):
        task._fit_anchors(_small_boxes())
