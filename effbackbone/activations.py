"""Memory-efficient BatchNorm + activation for training.

Autograd keeps two full-size tensors for every ``BatchNorm -> SiLU`` pair: BN saves its input
(the conv output) and SiLU saves *its* input (the BN output). ``aten::silu`` already saves only
its input and recomputes the sigmoid in backward, so a SiLU-only autograd Function (the
"memory-efficient Swish" of efficientnet-pytorch and timm) saves nothing over ``nn.SiLU`` in
current PyTorch; it only helped when Swish was written ``x * sigmoid(x)``, which saves both.
The memory that can be saved is the BN output: :class:`BatchNormAct2d` stores only the BN
input and recomputes ``y = BN(x)`` in backward (one elementwise pass plus the per-channel
statistics). This removes one of the ~7 expanded-width tensors of an MBConv block.

Exactness: the forward output and running statistics come from ``nn.BatchNorm2d.forward``
itself, and the backward runs the same ATen kernels (``silu_backward`` /
``hardtanh_backward`` and ``native_batch_norm_backward``) on a recomputed ``y`` that equals
the forward one bit for bit on CPU (tests). In eval mode, under ``torch.no_grad``, TorchScript,
ONNX export and ``torch.compile`` (whose partitioner already recomputes cheap pointwise ops)
the module runs the plain ``F.batch_norm`` + activation, so exports and compiled graphs are the
ordinary ones. State-dict keys are ``nn.BatchNorm2d``'s, so weights load either way.

(No ``from __future__ import annotations``: TorchScript resolves the real annotations of the
``@torch.jit.unused`` method.)
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from effbackbone.layers import create_act

_ACTS: dict[type[nn.Module], str] = {nn.SiLU: "silu", nn.ReLU6: "relu6"}


def _act_backward(act: str, grad: Tensor, y: Tensor) -> Tensor:
    """The activation's backward given its input ``y`` (the kernels autograd itself uses)."""
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, y)
    return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)


class _BatchNormActFn(torch.autograd.Function):
    """``act(bn(x))`` that saves ``x`` only and recomputes ``bn(x)`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, bn: "BatchNormAct2d") -> Tensor:
        y = bn.batch_norm(x)  # grad is off in here
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        ctx.use_batch_stats = use_batch_stats
        ctx.eps = bn.eps
        ctx.act = bn.act_name
        if use_batch_stats:
            ctx.save_for_backward(x, weight, bias)
        else:
            # Frozen BN: keep the statistics used now, in case a later step changes the buffers.
            ctx.save_for_backward(x, weight, bias, bn.running_mean.clone(), bn.running_var.clone())
        return y.clamp_(0.0, 6.0) if bn.act_name == "relu6" else F.silu(y, inplace=True)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, *stats = ctx.saved_tensors
        running_mean, running_var = stats if stats else (None, None)
        train = ctx.use_batch_stats
        # Batch statistics are recomputed from x (no running-stat update: the buffers are None).
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, train, 0.0, ctx.eps
        )
        grad_y = _act_backward(ctx.act, grad, y)
        del y
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, running_mean, running_var, save_mean, save_invstd, train, ctx.eps,
            list(ctx.needs_input_grad[:3]),
        )
        return gx, gw, gb, None


class BatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by SiLU or ReLU6 that stores only its input for backward.

    Args:
        num_features: Channels.
        act: ``"silu"`` or ``"relu6"``.
        eps: BatchNorm epsilon.
        momentum: BatchNorm momentum.
    """

    def __init__(self, num_features: int, act: str = "silu", eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        if act not in ("silu", "relu6"):
            raise ValueError(f"BatchNormAct2d act must be 'silu' or 'relu6', got {act!r}")
        self.act_name = act
        self.act = create_act(act)

    def forward(self, x: Tensor) -> Tensor:
        """``act(bn(x))``; memory-efficient only when autograd will need it."""
        if not torch.jit.is_scripting() and self._efficient(x):
            return _BatchNormActFn.apply(x, self.weight, self.bias, self)
        return self.act(self.batch_norm(x))

    def batch_norm(self, x: Tensor) -> Tensor:
        """Exactly ``nn.BatchNorm2d.forward`` (TorchScript cannot call ``super().forward``)."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative moving average, as nn.BatchNorm2d.
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None, self.weight, self.bias,
            use_batch_stats, factor, self.eps,
        )

    @torch.jit.unused
    def _efficient(self, x: Tensor) -> bool:
        """Eager autograd only: exports, traces and compiled graphs get the plain ops."""
        if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return False
        if torch.compiler.is_compiling():
            return False
        return x.requires_grad or (self.weight is not None and self.weight.requires_grad)

    def extra_repr(self) -> str:
        """Show the activation in ``print(model)``."""
        return f"{super().extra_repr()}, act={self.act_name}"


def _share_bn_state(src: nn.BatchNorm2d, dst: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Make ``dst`` use ``src``'s parameters and buffers (the same objects: optimizers keep working)."""
    for name, param in src.named_parameters(recurse=False):
        setattr(dst, name, param)
    for name, buf in src.named_buffers(recurse=False):
        setattr(dst, name, buf)
    dst.train(src.training)
    return dst


def set_memory_efficient(model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch every ``bnK`` + ``actK`` pair of ``model`` to (or back from) :class:`BatchNormAct2d`.

    Pairs are found by the timm naming the blocks use (``bn1``/``act1``, ``bn2``/``act2``); the
    activation slot becomes ``nn.Identity``. Parameters and buffers are shared, not copied, so
    this can be toggled on a model that an optimizer already holds. State-dict keys are unchanged.

    Args:
        model: Any module tree (an :class:`~effbackbone.model.EfficientNet`, or an smp/effdet
            model containing one).
        enable: ``True`` to switch on, ``False`` to restore ``nn.BatchNorm2d`` + activation.

    Returns:
        ``model`` (modified in place).
    """
    for parent in list(model.modules()):
        for name, bn in list(parent.named_children()):
            if not (name.startswith("bn") and isinstance(bn, nn.BatchNorm2d)):
                continue
            act_slot = "act" + name[2:]
            act = getattr(parent, act_slot, None)
            if enable and not isinstance(bn, BatchNormAct2d) and type(act) in _ACTS:
                new = BatchNormAct2d(bn.num_features, _ACTS[type(act)], bn.eps, bn.momentum)
                setattr(parent, name, _share_bn_state(bn, new))
                setattr(parent, act_slot, nn.Identity())
            elif not enable and isinstance(bn, BatchNormAct2d) and isinstance(act, nn.Identity):
                plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum)
                setattr(parent, name, _share_bn_state(bn, plain))
                setattr(parent, act_slot, create_act(bn.act_name))
    return model


__all__ = ["BatchNormAct2d", "set_memory_efficient"]
