"""``DetectionTask``: EfficientDet D0-D7 on the effbackbone encoder, with COCO mAP every epoch.

The network, anchors, focal/box losses and NMS are effdet's (``DetBenchTrain`` in training and
evaluation; for ``forward``/predict, ``DetBenchPredict`` with an exact, faster top-k:
:class:`~effbackbone.integrations.effdet_inference.FastDetBenchPredict`); this module adds the Lightning loop, the
box-format boundaries (``tasks.boxes``), an optional EMA of the weights (used for evaluation and
prediction when enabled) and COCO evaluation in original-image coordinates and category ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from effdet import DetBenchTrain
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from pycocotools.coco import COCO
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from effbackbone.integrations.effdet import create_efficientdet
from effbackbone.integrations.effdet_inference import FastDetBenchPredict
from tasks.boxes import split_detections, to_effdet_targets
from tasks.eval.coco import coco_map, to_coco_results
from tasks.guards import NonFinitePolicy, check_loss, snapshot_buffers
from tasks.optim import build_param_groups
from tasks.validation import check_channels


def _ema_update_fn(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """EMA for ``AveragedModel(multi_avg_fn=...)`` with TF's warm-up ``min(decay, (1 + n) / (10 + n))``.

    The warm-up keeps the average from being dominated by the random initial weights in short runs.
    """

    def update(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if ema[0].is_floating_point():
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): copy
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)

    return update


def num_anchors(image_size: int, min_level: int = 3, max_level: int = 7, per_location: int = 9) -> int:
    """Anchors of an EfficientDet at ``image_size`` (effdet's top-k must not ask for more)."""
    return sum(per_location * (image_size // 2**lvl) ** 2 for lvl in range(min_level, max_level + 1))


def all_gather_objects(obj: Any) -> list[Any]:  # noqa: ANN401 - any picklable object
    """``obj`` from every rank (a one-element list outside DDP); every rank must call it."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_rank_results(
    gathered: list[tuple[list[dict[str, Any]], list[int]]],
) -> tuple[list[dict[str, Any]], list[int]]:
    """Concatenate every rank's ``(results, image_ids)``, keeping each image from the first rank that has it.

    DistributedSampler pads ranks to equal length by repeating images; counting those twice would
    bias the mAP. A rank with no images contributes nothing.
    """
    results: list[dict[str, Any]] = []
    seen: set[int] = set()
    for rank_results, rank_ids in gathered:
        new = set(rank_ids) - seen
        results.extend(r for r in rank_results if r["image_id"] in new)
        seen |= new
    return results, sorted(seen)


class DetectionTask(L.LightningModule):
    """EfficientDet training/evaluation/prediction on COCO-format batches (``CocoDataModule``).

    Batches are ``{"image", "boxes_xyxy", "labels", "image_id", "img_scale", "img_size"}`` with
    boxes in model-input pixels and contiguous 0-based labels; metrics ``val/AP``, ``val/AP50``,
    ``val/AP75``, ``val/APs``, ``val/APm``, ``val/APl`` are COCOeval's on the whole val split.

    Args:
        model: ``d0``..``d7`` (or ``d7x``).
        num_classes: Detection classes (linked from ``data.num_classes`` by the CLI).
        image_size: Square input side; must equal the data's ``image_size`` (multiple of 128).
        backbone_weights: Local ImageNet weights file for the encoder (timm or torchvision layout).
        pretrained_path: A whole effdet COCO checkpoint to start from (class head reset if needed).
        freeze_backbone: Train only BiFPN and heads; the encoder's BatchNorm stays in eval mode.
        ema_decay: Keep an EMA of the weights with this decay (e.g. 0.999) and evaluate/predict
            with it; ``None`` disables it.
        bn_momentum: BatchNorm momentum (PyTorch convention) for every norm layer. The TF default
            0.01 needs thousands of steps before the eval statistics are usable; 0.1 suits short
            runs from scratch. ``None`` keeps the model's.
        optimizer: Optimizer factory; its ``weight_decay`` applies to weights only (not norms/biases).
        lr_scheduler: Optional scheduler factory, stepped every epoch (``ReduceLROnPlateau`` watches
            ``val/AP``).
        nonfinite_loss: ``raise`` stops on a NaN/inf loss, ``skip`` drops the batch.
        detector_options: Other effdet config fields (``max_det_per_image``, ``soft_nms``,
            ``fpn_cell_repeats``, ...).
        channels_last: Keep the weights and run the images in ``torch.channels_last`` (NHWC): the
            same results, and a faster step on CPU (oneDNN) and on GPU with mixed precision.
    """

    def __init__(
        self,
        model: str = "d0",
        num_classes: int = 1,
        image_size: int = 512,
        backbone_weights: str | None = None,
        pretrained_path: str | None = None,
        freeze_backbone: bool = False,
        ema_decay: float | None = None,
        bn_momentum: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        nonfinite_loss: NonFinitePolicy = "raise",
        detector_options: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if image_size % 128:
            raise ValueError(f"image_size must be a multiple of 128 (EfficientDet's P7 stride), got {image_size}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.freeze_backbone = freeze_backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.nonfinite_loss: NonFinitePolicy = nonfinite_loss
        options = {"max_detection_points": min(5000, num_anchors(image_size)), **(detector_options or {})}
        detector = create_efficientdet(
            model, num_classes, backbone_weights=backbone_weights, pretrained_path=pretrained_path,
            image_size=image_size, **options,
        )
        if bn_momentum is not None:
            for module in detector.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = bn_momentum
        self.channels_last = channels_last
        if channels_last:  # before the EMA copy, which inherits the layout
            detector = detector.to(memory_format=torch.channels_last)
        self.detector = DetBenchTrain(detector, create_labeler=True)
        # Checked before the stem convolution, whose own error does not say which option to change.
        self.in_channels = next(m.in_channels for m in detector.modules() if isinstance(m, nn.Conv2d))
        if freeze_backbone:
            self.detector.model.backbone.requires_grad_(False)
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.detector, multi_avg_fn=_ema_update_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        # Label -> COCO category id; replaced by the data's map in setup() and saved in checkpoints.
        self.category_ids: tuple[int, ...] = tuple(range(1, num_classes + 1))
        self.class_names: tuple[str, ...] = tuple(str(i) for i in self.category_ids)
        self._results: list[dict[str, Any]] = []
        self._image_ids: list[int] = []
        self._predictor: dict[int, FastDetBenchPredict] = {}  # plain dict: not a registered submodule

    # -- model -------------------------------------------------------------------------------------
    def eval_bench(self) -> DetBenchTrain:
        """The bench used for evaluation and prediction: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.detector  # type: ignore[return-value]

    def forward(
        self, images: Tensor, img_scale: Tensor | None = None, img_size: Tensor | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes_xyxy``, ``scores`` and 0-based ``labels``.

        Boxes are in original-image pixels when ``img_scale`` and ``img_size`` are given, else in
        model-input pixels.
        """
        check_channels(images, self.in_channels, type(self).__name__)
        images = self._layout(images)
        model = self.eval_bench().model
        predictor = self._predictor.get(id(model))
        if predictor is None:
            predictor = self._predictor[id(model)] = FastDetBenchPredict(model)
        predictor.anchors.to(images.device)
        info = None if img_scale is None or img_size is None else {"img_scale": img_scale, "img_size": img_size}
        return split_detections(predictor(images, info))

    def train(self, mode: bool = True) -> DetectionTask:
        """Switch modes; a frozen backbone keeps its BatchNorm statistics (eval mode) while training."""
        super().train(mode)
        if self.freeze_backbone:
            self.detector.model.backbone.eval()
        return self

    def setup(self, stage: str) -> None:
        """Take the category map from the datamodule and check it and the image size against the model."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or stage == "predict":
            return
        size = getattr(dm, "image_size", self.image_size)
        if size != self.image_size:
            raise ValueError(f"data.image_size={size} but model.image_size={self.image_size}; set both to one value")
        cmap = getattr(dm, "category_map", None)
        if cmap is None:
            return
        if len(cmap) != self.num_classes:
            raise ValueError(f"the data has {len(cmap)} categories {list(cmap.category_ids)} but model.num_classes="
                             f"{self.num_classes}; set model.init_args.num_classes={len(cmap)}")
        self.category_ids, self.class_names = tuple(cmap.category_ids), tuple(cmap.names)

    def _layout(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:  # noqa: ANN401 - any batch
        """Give every step's images the model's memory layout (a no-op unless ``channels_last``)."""
        if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
            batch["image"] = self._layout(batch["image"])
        return batch

    # -- training ----------------------------------------------------------------------------------
    def _target(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        check_channels(batch["image"], self.in_channels, type(self).__name__)
        target = to_effdet_targets(batch["boxes_xyxy"], batch["labels"])
        target = {k: v.to(batch["image"].device) for k, v in target.items()}
        return {**target, "img_scale": batch["img_scale"], "img_size": batch["img_size"]}

    def _log_losses(self, out: dict[str, Tensor], stage: str, batch_size: int) -> None:
        for key in ("loss", "class_loss", "box_loss"):
            self.log(
                f"{stage}/{key}", out[key], batch_size=batch_size, prog_bar=key == "loss", sync_dist=stage != "train"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """The focal + box loss (effdet's) on one batch."""
        saved = snapshot_buffers(self.detector) if self.nonfinite_loss == "skip" else None
        out = self.detector(batch["image"], self._target(batch))
        self._log_losses(out, "train", len(batch["image"]))
        parts = ""
        if not bool(torch.isfinite(out["loss"].detach())):  # name the culprit only when there is one
            parts = f"class_loss={out['class_loss'].item():.4g}, box_loss={out['box_loss'].item():.4g}"
        return check_loss(out["loss"], self.global_step, self.nonfinite_loss, parts, restore=saved)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401 - Lightning hook
        """Update the EMA weights after each optimizer step."""
        if self.ema is not None:
            self.ema.update_parameters(self.detector)

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        out = self.eval_bench()(batch["image"], self._target(batch))
        self._log_losses(out, stage, len(batch["image"]))
        ids = batch["image_id"].tolist()
        self._results.extend(to_coco_results(ids, split_detections(out["detections"]), self.category_ids))
        self._image_ids.extend(ids)

    def _ground_truth(self, stage: str) -> COCO | None:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return getattr(getattr(loader, "dataset", None), "coco", None)

    def _eval_epoch_end(self, stage: str) -> None:
        # Every rank gathers every rank's results (all ranks must call the collective, also those
        # without results) and evaluates the same set, so the logged numbers agree everywhere.
        results, image_ids = merge_rank_results(all_gather_objects((self._results, self._image_ids)))
        self._results, self._image_ids = [], []
        coco_gt = self._ground_truth(stage)
        if coco_gt is None:
            warnings.warn(f"no COCO ground truth on the {stage} dataset (a CocoDetection); mAP not computed",
                          UserWarning, stacklevel=2)
            return
        stats = coco_map(coco_gt, results, image_ids)
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "AP", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        """Start collecting validation predictions."""
        self._results, self._image_ids = [], []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Losses, plus detections collected for COCO mAP."""
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """COCO mAP over the whole (gathered) validation split."""
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        """Start collecting test predictions."""
        self._results, self._image_ids = [], []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As ``validation_step``, logged under ``test/``."""
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        """COCO mAP over the whole (gathered) test split."""
        self._eval_epoch_end("test")

    # -- prediction --------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Detections in original-image pixels, with COCO ``category_ids`` and (when known) ``file_name``."""
        dets = self(batch["image"], batch["img_scale"], batch["img_size"])
        names = batch.get("file_name", [None] * len(dets))
        ids = torch.tensor(self.category_ids, device=batch["image"].device)
        return [{**d, "category_ids": ids[d["labels"]], "image_id": int(i), "file_name": n}
                for d, i, n in zip(dets, batch["image_id"].tolist(), names, strict=True)]

    # -- optimisation and checkpoints --------------------------------------------------------------
    def configure_optimizers(self) -> Any:  # noqa: ANN401 - Lightning's optimizer config union
        """The configured optimizer over trainable parameters, no weight decay on norms and biases."""
        # weight_decay=None: weights take the optimizer's configured decay; norms and biases get 0.
        optimizer = self.optimizer(build_param_groups(self.detector, None))
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/AP"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the label -> category map so a checkpoint alone can write COCO results."""
        checkpoint["detection_categories"] = {"category_ids": list(self.category_ids), "names": list(self.class_names)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the label -> category map."""
        cats = checkpoint.get("detection_categories")
        if cats:
            self.category_ids, self.class_names = tuple(cats["category_ids"]), tuple(cats["names"])


__all__ = ["DetectionTask", "all_gather_objects", "merge_rank_results", "num_anchors"]
