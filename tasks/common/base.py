"""``BaseTask``: what every task shares, written once.

The optimizer and scheduler set-up (no weight decay on norms and biases), the non-finite-loss guard,
the channels_last layout of weights and images, and the input-channel check. A task subclass builds
its network in ``__init__``, names it in :attr:`network`, and writes its own steps around
:meth:`guarded` and :meth:`prepare_images`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from tasks.common.checks import check_channels
from tasks.common.guards import NonFinitePolicy, check_loss, snapshot_buffers
from tasks.common.optim import build_param_groups


class BaseTask(L.LightningModule):
    """A LightningModule with the shared optimisation, guard and layout logic of the tasks.

    Args:
        in_channels: Image channels the network takes (checked before the first convolution).
        optimizer: Optimizer factory; weights get its ``weight_decay``, norms and biases none.
        lr_scheduler: Scheduler factory, stepped every epoch; ``ReduceLROnPlateau`` watches :attr:`monitor`.
        nonfinite_loss: ``raise`` on a NaN/inf training loss, or ``skip`` the batch.
        channels_last: Keep the weights and run the images in ``torch.channels_last`` (NHWC).
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
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.nonfinite_loss: NonFinitePolicy = nonfinite_loss
        self.channels_last = channels_last

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
        so they are not updated) so that unfreezing needs no new optimizer.
        """
        optimizer = self.optimizer(build_param_groups(self.network, None, trainable_only=self.trainable_only))
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}
