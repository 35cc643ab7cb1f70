"""``BaseTask``: what every task shares, written once.

The optimizer and scheduler set-up (no weight decay on norms and biases, an encoder lr multiplier, warmup then
cosine decay by default), the EMA of the weights, batch renormalization, the non-finite-loss guard, the
channels_last layout of weights and images, and the input-channel check. A task subclass builds its network in
``__init__``, names it in :attr:`network` and :attr:`encoder`, calls :meth:`init_ema` once it is built (which also
applies ``batch_renorm``), evaluates with :meth:`eval_network`, and writes its own steps around :meth:`guarded` and
:meth:`prepare_images`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from tasks.common.batch_renorm import BatchRenorm2d, BatchRenormConfig, set_renorm_limits, use_batch_renorm
from tasks.common.checks import check_channels
from tasks.common.ema import build_ema, check_ema_decay
from tasks.common.guards import NonFinitePolicy, check_loss, snapshot_buffers
from tasks.common.optim import apply_lr_mult, build_param_groups
from tasks.common.progressive import ProgressiveLearning
from tasks.common.pruning import resize_to_state_dict
from tasks.common.schedules import LRSchedule, deferred_warmup_cosine, resolve_warmup


class BaseTask(L.LightningModule):
    """A LightningModule with the shared optimisation, guard and layout logic of the tasks.

    Args:
        in_channels: Image channels the network takes (checked before the first convolution).
        optimizer: Optimizer factory; weights get its ``weight_decay``, norms and biases none.
        lr_scheduler: Scheduler factory, stepped every epoch; ``ReduceLROnPlateau`` watches :attr:`monitor`.
            When set it replaces ``lr_schedule``.
        nonfinite_loss: ``raise`` on a NaN/inf training loss, or ``skip`` the batch.
        channels_last: Keep the weights and run the images in ``torch.channels_last`` (NHWC).
        lr_schedule: Without ``lr_scheduler``: ``warmup_cosine`` (linear warmup, then cosine decay to
            ``min_lr_factor`` x lr at the trainer's last step, stepped per optimizer step) or ``constant``.
        warmup_steps: Warmup length in optimizer steps; ``None`` uses ``warmup_fraction``.
        warmup_fraction: Warmup length as a fraction of the run's optimizer steps.
        min_lr_factor: Final learning rate of ``warmup_cosine``, as a fraction of the initial one.
        encoder_lr_mult: Learning-rate multiplier of the encoder (:attr:`encoder`) relative to the
            decoder/head (e.g. 0.1 for a pretrained encoder).
        ema_decay: Keep an EMA of the weights with this decay (e.g. 0.999) and evaluate/predict with it
            (:meth:`eval_network`); ``None`` disables it.
        batch_renorm: Train every ``BatchNorm2d`` with batch renormalization (Ioffe 2017;
            :mod:`tasks.common.batch_renorm`): ``true``, or a dict of ``r_max``, ``d_max``, ``start_step``,
            ``ramp_steps``. For small batches, where the evaluated model can differ wildly from the trained one.
        freeze_bn_stats: Keep every BatchNorm of :attr:`network` in eval mode while training (statistics frozen,
            affine parameters trained): the network trains in the mode it is evaluated in. Freezing the
            statistics is the standard last phase of quantization-aware training (Krishnamoorthi, "Quantizing
            deep convolutional networks for efficient inference", 2018, sec. 3.2); here it is a short fine-tune
            that makes a checkpoint trained with small batches robust to int8 (docs/deploy.md).
    """

    #: The metric a plateau scheduler watches.
    monitor: ClassVar[str] = "val/loss"
    #: Leave frozen parameters out of the optimizer: ``True`` when they stay frozen for the whole run.
    trainable_only: ClassVar[bool] = False

    def __init__(
        self,
        *,
        in_channels: int,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        nonfinite_loss: NonFinitePolicy,
        channels_last: bool,
        lr_schedule: LRSchedule = "warmup_cosine",
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.05,
        min_lr_factor: float = 0.01,
        encoder_lr_mult: float = 1.0,
        ema_decay: float | None = None,
        batch_renorm: bool | dict[str, Any] | None = None,
        freeze_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.nonfinite_loss: NonFinitePolicy = nonfinite_loss
        self.channels_last = channels_last
        if lr_schedule not in ("warmup_cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'warmup_cosine' or 'constant', got {lr_schedule!r}")
        resolve_warmup(1, warmup_steps, warmup_fraction)  # fail at construction, not at the first step
        if not 0.0 <= min_lr_factor <= 1.0:
            raise ValueError(f"min_lr_factor must be in [0, 1], got {min_lr_factor}")
        if encoder_lr_mult <= 0:
            raise ValueError(f"encoder_lr_mult must be > 0, got {encoder_lr_mult} (freeze the encoder instead of 0)")
        self.lr_schedule: LRSchedule = lr_schedule
        self.warmup_steps, self.warmup_fraction, self.min_lr_factor = warmup_steps, warmup_fraction, min_lr_factor
        self.encoder_lr_mult = encoder_lr_mult
        check_ema_decay(ema_decay)
        self.ema_decay = ema_decay
        self.ema: AveragedModel | None = None
        self.batch_renorm = BatchRenormConfig.parse(batch_renorm)
        self._renorm_layers: list[BatchRenorm2d] = []
        if freeze_bn_stats and self.batch_renorm is not None:
            raise ValueError(
                "freeze_bn_stats and batch_renorm both set: batch renormalization only acts in train mode, which "
                "freeze_bn_stats turns off; use one (batch_renorm while training from scratch, freeze_bn_stats to "
                "fine-tune a trained checkpoint)"
            )
        self.freeze_bn_stats = freeze_bn_stats

    @property
    def example_input_array(self) -> Tensor | None:
        """One blank image at the data's ``image_size``, unless one was set; ``None`` when no size is known.

        Lightning's model summary runs it through ``forward`` to fill its FLOPs column.
        """
        if self._example_input_array is not None:
            return self._example_input_array  # type: ignore[return-value]
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", {})
        size = getattr(datamodule, "image_size", None) or hparams.get("image_size") or getattr(self, "image_size", None)
        return torch.zeros(1, self.in_channels, int(size), int(size)) if size else None

    @example_input_array.setter
    def example_input_array(self, example: Tensor | None) -> None:
        self._example_input_array = example

    @property
    def network(self) -> nn.Module:
        """The trained network (its parameters are optimised, its buffers guarded)."""
        raise NotImplementedError

    @property
    def encoder(self) -> nn.Module | None:
        """The pretrained-encoder part of :attr:`network` (gets ``encoder_lr_mult``); ``None``: no split."""
        return None

    @staticmethod
    def check_progressive(option: dict[str, Any] | None) -> dict[str, Any] | None:
        """A task's ``progressive`` option, checked now (its epochs are resolved when the fit starts)."""
        if option is not None:
            ProgressiveLearning.from_option(option)
        return option

    def configure_callbacks(self) -> list[L.Callback]:
        """The :class:`~tasks.common.progressive.ProgressiveLearning` callback of the ``progressive`` option."""
        option = getattr(self, "progressive", None)
        return [ProgressiveLearning.from_option(option)] if option else []

    def init_ema(self) -> None:
        """Create the EMA copy of :attr:`network` when ``ema_decay`` is set (call once the network is built).

        Kept as the ``ema`` submodule, so the average is saved in checkpoints (``ema.module.*`` keys) and
        restored with them. ``batch_renorm`` is applied first, so the copy has the same layer types (they
        evaluate as BatchNorm either way).
        """
        if self.batch_renorm is not None:
            self._renorm_layers = use_batch_renorm(self.network)
        if self.ema_decay is not None:
            self.ema = build_ema(self.network, self.ema_decay)

    def eval_network(self) -> nn.Module:
        """The network used for validation, test and prediction: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.network

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:  # noqa: ANN401 - Lightning hook
        """Set the batch-renormalization limits of this optimizer step; keep BatchNorm frozen if asked.

        Checked every batch because Lightning puts the module back in train mode at each epoch start
        (and after each validation).
        """
        if self.batch_renorm is not None:
            set_renorm_limits(self._renorm_layers, *self.batch_renorm.limits(self.global_step))
        if self.freeze_bn_stats:
            for module in self.network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401 - Lightning hook
        """Update the EMA weights after each optimizer step."""
        if self.ema is not None:
            self.ema.update_parameters(self.network)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # noqa: ANN401
        """Load weights; MBConv blocks pruned in the checkpoint are first resized to its widths.

        So a pruned checkpoint (the ``prune`` option, :func:`tasks.common.pruning.prune_checkpoint`) loads into a
        task built from its hyper-parameters, in ``load_from_checkpoint``, predict, export and resumed fits.
        """
        if resize_to_state_dict(self, state_dict) and self.channels_last:
            self.to(memory_format=torch.channels_last)  # the new (sliced) weights too
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def to_layout(self, module: nn.Module) -> nn.Module:
        """``module`` in the task's memory format (call on the network once it is built)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def prepare_images(self, images: Tensor) -> Tensor:
        """Check the channel count (naming the option to change) and give the images the network's layout."""
        check_channels(images, self.in_channels, type(self).__name__)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def guarded(self, compute: Callable[[], tuple[Tensor, Callable[[], str]]]) -> Tensor | None:
        """Run a training step's ``compute`` and return its loss, or ``None`` to skip a non-finite one.

        ``compute`` returns the loss and a function that describes it (called only when it is not finite).
        BN running statistics are updated in the forward, before the loss is known; with ``skip`` they are
        snapshotted first so that a skipped batch leaves no NaN in them.
        """
        saved = snapshot_buffers(self.network) if self.nonfinite_loss == "skip" else None
        loss, describe = compute()
        finite = bool(torch.isfinite(loss.detach()).all())
        return check_loss(loss, self.global_step, self.nonfinite_loss, "" if finite else describe(), restore=saved)

    def configure_optimizers(self) -> Any:  # noqa: ANN401 - Lightning's optimizer/scheduler union
        """The configured optimizer over the network's parameters, without weight decay on norms and biases.

        Frozen parameters are included unless :attr:`trainable_only` (they have no gradient while frozen,
        so they are not updated) so that unfreezing needs no new optimizer. The encoder's groups get
        ``encoder_lr_mult`` x lr. A configured ``lr_scheduler`` is stepped per epoch; otherwise
        ``warmup_cosine`` is stepped per optimizer step over the trainer's ``estimated_stepping_batches``.
        """
        groups = build_param_groups(
            self.network, None, trainable_only=self.trainable_only, encoder=self.encoder,
            encoder_lr_mult=self.encoder_lr_mult,
        )  # fmt: skip
        optimizer = apply_lr_mult(self.optimizer(groups))
        if self.lr_scheduler is not None:
            scheduler = self.lr_scheduler(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}
        if self.lr_schedule == "constant":
            return optimizer
        factor, self._set_total_steps = deferred_warmup_cosine(
            self.warmup_steps, self.warmup_fraction, self.min_lr_factor
        )
        scheduler = LambdaLR(optimizer, factor)  # its run length is set in on_train_start
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Give the default schedule its run length, now that the data is set up and a resumed state restored."""
        set_total = getattr(self, "_set_total_steps", None)
        if set_total is None:
            return
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "lr_schedule='warmup_cosine' needs a finite run length: set trainer.max_epochs or "
                "trainer.max_steps, or model.init_args.lr_schedule=constant"
            )
        set_total(int(total))
        for config in self.trainer.lr_scheduler_configs:  # lr of the current step (0, or the restored one)
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                          strict=True):  # fmt: skip
                    group["lr"] = base * f(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
