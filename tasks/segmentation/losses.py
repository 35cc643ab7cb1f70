"""Segmentation losses by name (``"ce"``, ``"dice"``, ``"focal"``) and weighted sums (``"ce+dice"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn

Mode = Literal["binary", "multiclass", "multilabel"]
LOSS_TERMS = ("ce", "dice", "focal")


class CrossEntropy(nn.Module):
    """Cross-entropy for ``multiclass``; binary cross-entropy on logits for ``binary``/``multilabel``.

    Pixels equal to ``ignore_index`` count in neither the sum nor the mean.
    """

    def __init__(self, mode: Mode, ignore_index: int, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.mode, self.ignore_index = mode, ignore_index
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits`` N x C x H x W; ``target`` N x H x W ids (multiclass, binary) or N x C x H x W (multilabel)."""
        if self.mode == "multiclass":
            return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)
        if self.mode == "binary":
            logits = logits[:, 0]
        valid = target != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0  # keeps the graph: a fully ignored batch contributes nothing
        loss = F.binary_cross_entropy_with_logits(logits[valid], target[valid].to(logits.dtype), reduction="none")
        if self.weight is not None and self.mode == "multilabel":
            loss = loss * self.weight.expand_as(target.movedim(1, -1)).movedim(-1, 1)[valid]
        return loss.mean()


class SigmoidFocal(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017) per class and pixel, averaged over non-ignored elements.

    Written here rather than taken from smp because smp's ``FocalLoss`` indexes a per-class target
    with a CxHxW ignore mask in multilabel mode and fails there.
    """

    def __init__(self, mode: Mode, ignore_index: int, gamma: float = 2.0) -> None:
        super().__init__()
        self.mode, self.ignore_index, self.gamma = mode, ignore_index, gamma

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Same shapes as :class:`CrossEntropy`."""
        valid = target != self.ignore_index
        if self.mode == "multiclass":
            onehot = F.one_hot(target.masked_fill(~valid, 0), logits.shape[1]).movedim(-1, 1)
            valid = valid.unsqueeze(1).expand_as(logits)
        else:
            logits = logits[:, 0] if self.mode == "binary" else logits
            onehot = target
        if not valid.any():
            return logits.sum() * 0.0
        bce = F.binary_cross_entropy_with_logits(logits[valid], onehot[valid].to(logits.dtype), reduction="none")
        p_true = torch.exp(-bce)  # probability given to the true label
        return ((1 - p_true) ** self.gamma * bce).mean()


def parse_loss(loss: str, loss_weights: Sequence[float] | None) -> list[tuple[str, float]]:
    """``"ce+dice"`` with weights ``[1, 0.5]`` -> ``[("ce", 1.0), ("dice", 0.5)]``, validated."""
    names = [t.strip().lower() for t in loss.split("+")]
    unknown = [n for n in names if n not in LOSS_TERMS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"loss={loss!r}: terms must be distinct names among {', '.join(LOSS_TERMS)}, joined by '+'")
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ValueError(f"loss={loss!r} has {len(names)} terms but loss_weights has {len(weights)} values")
    return list(zip(names, weights, strict=True))


class CompositeLoss(nn.Module):
    """A weighted sum of loss terms; ``parts`` holds the last value of each term, for logging."""

    def __init__(
        self,
        loss: str,
        mode: Mode,
        ignore_index: int,
        loss_weights: Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.weights = dict(parse_loss(loss, loss_weights))
        terms: dict[str, nn.Module] = {}
        for name in self.weights:
            if name == "ce":
                terms[name] = CrossEntropy(mode, ignore_index, class_weights)
            elif name == "dice":
                terms[name] = DiceLoss(mode, ignore_index=ignore_index, class_weights=class_weights)
            else:
                terms[name] = SigmoidFocal(mode, ignore_index)
        self.terms = nn.ModuleDict(terms)
        self.mode = mode
        self.parts: dict[str, Tensor] = {}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The weighted sum, computed in float32 (safe under mixed precision)."""
        logits = logits.float()
        self.parts = {}
        total = logits.new_zeros(())
        for name, term in self.terms.items():
            # smp's binary losses want the target with a channel axis, like the logits.
            tgt = target.unsqueeze(1) if self.mode == "binary" and name == "dice" else target
            value = term(logits, tgt)
            self.parts[name] = value.detach()
            total = total + self.weights[name] * value
        return total
