"""``InstanceTask``: Mask R-CNN on the effbackbone encoder + FPN, with COCO box and mask AP every epoch.

The network, its RPN, RoI heads, losses and NMS are torchvision's ``MaskRCNN``
(:func:`~effbackbone.integrations.torchvision.maskrcnn_effbackbone`: P2-P6 from C2-C5 and a max-pool, He et al.,
ICCV 2017). The images come letterboxed and normalised by the data module (the detection task's pipeline), so the
task calls the backbone, RPN and RoI heads itself instead of torchvision's resize-and-normalise front end; each
image's real (unpadded) size bounds its proposals and detections, as torchvision's own front end does. Masks are
pasted at the original image size (:func:`~tasks.instance.masks.paste_masks`), so results and pictures are in
original pixels and category ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from pycocotools.coco import COCO
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from effbackbone.integrations.torchvision import maskrcnn_effbackbone
from tasks.common.base import BaseTask
from tasks.common.distributed import gather_per_image
from tasks.common.ema import match_ema_state
from tasks.common.guards import NonFinitePolicy
from tasks.common.schedules import LRSchedule
from tasks.detection.categories import checked_category_map
from tasks.detection.transforms import letterbox_size
from tasks.instance.coco_eval import instance_map, masks_as_rles, to_instance_results
from tasks.instance.masks import from_maskrcnn_detections, paste_masks, to_maskrcnn_targets

# torchvision's loss names, in the order logged.
LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class InstanceTask(BaseTask):
    """Mask R-CNN training/evaluation/prediction on COCO batches with masks (``CocoInstanceDataModule``).

    Batches are the detection task's (``image``, ``boxes_xyxy``, ``labels``, ``image_id``, ``img_size``, ...)
    plus ``masks``, one ``(N, S, S)`` uint8 tensor per image. Logged: ``train/loss`` and torchvision's five
    losses (``train/loss_mask``, ...); every validation epoch COCOeval's box AP under the detection task's names
    (``val/AP``, ``val/AP50``, ``val/AP75``, ``val/APs``, ``val/APm``, ``val/APl``, ``val/AP_<class>``,
    ``val/AP50_<class>``) and the mask AP under the same names prefixed ``segm_`` (``val/segm_AP``, ...).
    torchvision computes losses in training mode only, so there is no ``val/loss``; the monitored metric is
    ``val/segm_AP``.

    Args:
        backbone: Encoder variant (``b0``..``b7``, ``lite0``..``lite4``, ``v2_s|m|l``).
        num_classes: Object classes, without the background (linked from ``data.num_classes`` by the CLI).
        image_size: Square input side, a multiple of 32 (linked from ``data.image_size`` by the CLI).
        backbone_weights: ImageNet weights for the encoder: ``"imagenet"`` (downloaded once, then cached),
            another source name (docs/weights.md) or a local file; ``None`` starts from random weights.
        fpn_channels: FPN width (the paper's 256).
        box_head_width: Width of the box head's two fully connected layers (the paper's 1024).
        mask_head_width: Width of the mask head's four 3x3 convolutions and deconvolution (the paper's 256).
        trainable_levels: Encoder levels, counted from C5 down, that train (5: all; 0 freezes the encoder).
        mask_threshold: A pixel belongs to a predicted instance when its mask probability exceeds this.
        anchor_sizes: The RPN's anchor side in input pixels at each of P2-P6 (five values, aspect ratios 0.5, 1, 2
            at each); ``None`` keeps torchvision's 32, 64, 128, 256, 512, made for 800-pixel images: halve them for
            small inputs or objects.
        ema_decay: Keep an EMA of the weights with this decay and evaluate/predict with it (docs/training.md).
        optimizer: Optimizer factory; its ``weight_decay`` applies to weights only (not norms/biases).
        lr_scheduler: Optional scheduler factory, stepped every epoch; replaces ``lr_schedule`` when set.
        lr_schedule: ``warmup_cosine`` (default) or ``constant``, when ``lr_scheduler`` is not set.
        warmup_steps: Warmup length in optimizer steps; ``None`` uses ``warmup_fraction``.
        warmup_fraction: Warmup length as a fraction of the run's optimizer steps.
        min_lr_factor: Final lr of ``warmup_cosine`` as a fraction of the initial one.
        encoder_lr_mult: Learning-rate multiplier of the encoder relative to the FPN and heads.
        nonfinite_loss: ``raise`` stops on a NaN/inf loss, ``skip`` drops the batch.
        detector_options: Other ``MaskRCNN`` arguments (``rpn_pre_nms_top_n_train``, ``box_batch_size_per_image``,
            ``box_detections_per_img``, ``box_score_thresh``, ``rpn_anchor_generator``, ...).
        backbone_options: Other encoder options (:func:`effbackbone.create_model`: ``drop_path_rate``,
            ``norm_eval``, ``tf_compat``, ...).
        channels_last: Keep the weights and run the images in ``torch.channels_last`` (NHWC).
    """

    monitor = "val/segm_AP"

    def __init__(
        self,
        backbone: str = "b0",
        num_classes: int = 1,
        image_size: int = 512,
        backbone_weights: str | None = None,
        fpn_channels: int = 256,
        box_head_width: int = 1024,
        mask_head_width: int = 256,
        trainable_levels: int = 5,
        mask_threshold: float = 0.5,
        anchor_sizes: list[int] | None = None,
        ema_decay: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_schedule: LRSchedule = "warmup_cosine",
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.05,
        min_lr_factor: float = 0.01,
        encoder_lr_mult: float = 1.0,
        nonfinite_loss: NonFinitePolicy = "raise",
        detector_options: dict[str, Any] | None = None,
        backbone_options: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            in_channels=3, optimizer=optimizer, lr_scheduler=lr_scheduler, nonfinite_loss=nonfinite_loss,
            channels_last=channels_last, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            warmup_fraction=warmup_fraction, min_lr_factor=min_lr_factor, encoder_lr_mult=encoder_lr_mult,
            ema_decay=ema_decay,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the encoder's C5 stride), got {image_size}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        self.num_classes, self.image_size, self.mask_threshold = num_classes, image_size, mask_threshold
        # The front end (resize, normalise) is not used by the steps below; set so that calling the bare
        # ``task.detector(images)`` on the data module's letterboxed, normalised images leaves them as they are.
        front: dict[str, Any] = {"min_size": image_size, "max_size": image_size, "image_mean": [0.0] * 3,
                                 "image_std": [1.0] * 3}  # fmt: skip
        if anchor_sizes is not None:
            if len(anchor_sizes) != 5:
                raise ValueError(f"anchor_sizes needs one size per level P2-P6 (5 values), got {anchor_sizes}")
            sizes = tuple((int(s),) for s in anchor_sizes)
            front["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
        detector = maskrcnn_effbackbone(
            backbone, num_classes + 1, weights=backbone_weights, out_channels=fpn_channels,
            trainable_levels=trainable_levels, box_head_width=box_head_width, mask_head_width=mask_head_width,
            backbone_options=backbone_options, **{**front, **(detector_options or {})},
        )  # fmt: skip
        self.detector: MaskRCNN = self.to_layout(detector)  # type: ignore[assignment]
        self.init_ema()
        # Label -> COCO category id; replaced by the data's map in setup() and saved in checkpoints.
        self.category_ids: tuple[int, ...] = tuple(range(1, num_classes + 1))
        self.class_names: tuple[str, ...] = tuple(str(i) for i in self.category_ids)
        self._results: dict[int, list[dict[str, Any]]] = {}  # image id -> its COCO results

    # -- model -------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The trained Mask R-CNN."""
        return self.detector

    @property
    def encoder(self) -> nn.Module:
        """The EfficientNet encoder (``encoder_lr_mult`` applies to it)."""
        return self.detector.backbone.body

    @staticmethod
    def run_detector(
        detector: MaskRCNN, images: Tensor, sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Run torchvision's ``GeneralizedRCNN.forward`` without its front end: losses (training) or detections.

        Args:
            detector: The Mask R-CNN (in training mode it needs ``targets`` and returns losses).
            images: The normalised batch, ``B x 3 x S x S``.
            sizes: Each image's ``(height, width)`` inside the batch before padding: proposals and detections
                are clipped to it.
            targets: torchvision's targets (:func:`~tasks.instance.masks.to_maskrcnn_targets`), for training.
        """
        image_list = ImageList(images, sizes)
        features = detector.backbone(images)
        proposals, rpn_losses = detector.rpn(image_list, features, targets)
        detections, roi_losses = detector.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **roi_losses}, detections

    def forward(self, images: Tensor, img_size: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes_xyxy``, ``scores``, 0-based ``labels`` and ``masks`` (``N x H x W`` bool).

        With ``img_size`` (each image's original ``(w, h)``; the images letterboxed to ``image_size``) boxes and
        masks are in original-image pixels; else in the input's pixels.
        """
        images = self.prepare_images(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if img_size is None:
            originals, inner = [(size[1], size[0])] * len(images), [size] * len(images)
        else:
            originals = [(int(w), int(h)) for w, h in img_size.tolist()]
            inner = [letterbox_size(w, h, self.image_size)[::-1] for w, h in originals]
        _, raw = self.run_detector(self.eval_network(), images, inner)  # type: ignore[arg-type]
        out = []
        for det, (w, h), (inner_h, inner_w) in zip(from_maskrcnn_detections(raw), originals, inner, strict=True):
            sx, sy = w / inner_w, h / inner_h  # as letterbox_scales; 1 without img_size
            boxes = det["boxes_xyxy"] * det["boxes_xyxy"].new_tensor([sx, sy, sx, sy])
            masks = paste_masks(det["mask_probs"], boxes, h, w, self.mask_threshold)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append({"boxes_xyxy": boxes, "scores": det["scores"], "labels": det["labels"], "masks": masks})
        return out

    def setup(self, stage: str) -> None:
        """Take the category map from the datamodule and check it and the image size against the model."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or stage == "predict":
            return
        size = getattr(dm, "image_size", self.image_size)
        if size != self.image_size:
            raise ValueError(f"data.image_size={size} but model.image_size={self.image_size}; set both to one value")
        cmap = checked_category_map(dm, self.num_classes)
        if cmap is not None:
            self.category_ids, self.class_names = tuple(cmap.category_ids), tuple(cmap.names)

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """The sum of torchvision's RPN, box and mask losses on one batch."""
        images = self.prepare_images(batch["image"])
        targets = to_maskrcnn_targets(batch["boxes_xyxy"], batch["labels"], batch["masks"], images.device)
        # In training every image is its whole S x S input: augmentation may move objects into the padding.
        sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * len(images)

        def compute() -> tuple[Tensor, Callable[[], str]]:
            losses, _ = self.run_detector(self.detector, images, sizes, targets)
            loss = torch.stack([losses[k] for k in LOSSES]).sum()
            self.log("train/loss", loss, batch_size=len(images), prog_bar=True)
            for key in LOSSES:
                self.log(f"train/{key}", losses[key], batch_size=len(images))
            return loss, lambda: ", ".join(f"{k}={losses[k].item():.4g}" for k in LOSSES)

        return self.guarded(compute)

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        detections = self(batch["image"], batch["img_size"])
        for image_id, det in zip(batch["image_id"].tolist(), detections, strict=True):
            self._results[image_id] = to_instance_results([image_id], [det], self.category_ids)

    def _ground_truth(self, stage: str) -> COCO | None:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return getattr(getattr(loader, "dataset", None), "coco", None)

    def _eval_epoch_end(self, stage: str) -> None:
        # Every rank gathers every rank's results and evaluates the same set (see DetectionTask).
        per_image = gather_per_image(self._results)
        self._results = {}
        coco_gt = self._ground_truth(stage)
        if coco_gt is None:
            warnings.warn(f"no COCO ground truth on the {stage} dataset (a CocoInstances); mAP not computed",
                          UserWarning, stacklevel=2)  # fmt: skip
            return
        results = [r for rs in per_image.values() for r in rs]
        names = dict(zip(self.category_ids, self.class_names, strict=True))
        for name, value in instance_map(coco_gt, results, sorted(per_image), names).items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("AP", "segm_AP"), sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        """Start collecting validation predictions."""
        self._results = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Detections and masks collected for COCO box and mask AP."""
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        """COCO box and mask AP over the whole (gathered) validation split."""
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        """Start collecting test predictions."""
        self._results = {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As ``validation_step``, logged under ``test/``."""
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        """COCO box and mask AP over the whole (gathered) test split."""
        self._eval_epoch_end("test")

    # -- prediction --------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Detections in original-image pixels with COCO ``category_ids``; masks as COCO RLEs (``segmentation``).

        The masks leave as compressed RLEs (``pycocotools.mask.decode`` gives them back) rather than full-size
        arrays, which would take ``detections x height x width`` bytes per image.
        """
        dets = self(batch["image"], batch["img_size"])
        names = batch.get("file_name", [None] * len(dets))
        ids = torch.tensor(self.category_ids, device=batch["image"].device)
        return [{**masks_as_rles(d), "category_ids": ids[d["labels"]], "image_id": int(i), "file_name": n}
                for d, i, n in zip(dets, batch["image_id"].tolist(), names, strict=True)]  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the label -> category map so a checkpoint alone can write COCO results."""
        checkpoint["detection_categories"] = {"category_ids": list(self.category_ids), "names": list(self.class_names)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the label -> category map, and fit the checkpoint's EMA weights to this task's ``ema_decay``."""
        cats = checkpoint.get("detection_categories")
        if cats:
            self.category_ids, self.class_names = tuple(cats["category_ids"]), tuple(cats["names"])
        if checkpoint.get("state_dict") is not None:
            match_ema_state(checkpoint["state_dict"], self.ema is not None, "detector.")


__all__ = ["LOSSES", "InstanceTask"]
