"""Structured pruning in the tasks: a pruned network trains with ``fit`` and saves/loads as a normal checkpoint.

Only MBConv expansion channels are removed (:func:`effbackbone.prune.prune_expansion`): they are internal to a
block, so the encoder's levels (``feature_specs``, the channels a decoder or BiFPN reads) stay as they were.

Two ways in:

* the tasks' ``prune`` option (a ratio): the network is pruned when the task is built, after its starting
  weights (``encoder_weights`` / ``backbone_weights``) are loaded, so channels are ranked on those weights;
  ``fit`` then trains the pruned network, and its checkpoints reload as usual;
* :func:`prune_checkpoint`: prune a trained task checkpoint into a new one (weights and hyper-parameters),
  which ``load_from_checkpoint``, ``predict`` and export read like any other, and which
  ``Trainer.fit(Task.load_from_checkpoint(path), datamodule=...)`` fine-tunes.

Either way the widths live in the weights' shapes: :meth:`tasks.common.base.BaseTask.load_state_dict` resizes
the blocks of a freshly built task to the checkpoint's widths before loading (:func:`resize_to_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from effbackbone.prune import expansion_widths, prune_expansion, resize_expansions, widths_from_state_dict


def prune_network(
    network: nn.Module, ratio: float | None, option: str = "prune", criterion: Literal["bn", "l1", "l2"] = "bn"
) -> nn.Module:
    """Prune ``ratio`` of every MBConv expansion of ``network`` in place (``None`` or 0: unchanged).

    Raises:
        ValueError: ``ratio`` outside [0, 1), or no MBConv block to prune; the message names ``option``.
    """
    if not ratio:
        return network
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"{option}={ratio} must be a fraction of the expansion channels in [0, 1), e.g. 0.5")
    if not expansion_widths(network):
        raise ValueError(f"{option}={ratio}: the network has no MBConv expansion to prune; set {option}: null")
    return prune_expansion(network, ratio, criterion=criterion, inplace=True)


def resize_to_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> bool:
    """Give ``module``'s MBConv blocks the expansion widths found in ``state_dict``; whether any changed."""
    current = expansion_widths(module)
    wanted = {k: w for k, w in widths_from_state_dict(module, state_dict).items() if current.get(k) != w}
    if wanted:
        resize_expansions(module, wanted)
    return bool(wanted)


def prune_checkpoint(
    src: str | Path, dst: str | Path, ratio: float, *, criterion: Literal["bn", "l1", "l2"] = "bn"
) -> Path:
    """Prune a trained task checkpoint into a new checkpoint.

    The network the checkpoint evaluates with (the EMA copy when it has one) is pruned, and both the raw and
    the EMA weights are set to it. The training state (optimizer, schedulers, loop counters) is dropped: it
    belongs to the unpruned parameters. ``dst`` keeps the hyper-parameters and a ``pruning`` record (ratio,
    criterion, source, widths).

    Args:
        src: A checkpoint written by ``fit`` (segmentation or detection).
        dst: Where to write the pruned checkpoint.
        ratio: Fraction of each block's expansion channels to remove (of its current width).
        criterion: How channels are ranked (:func:`effbackbone.prune.prune_expansion`).

    Returns:
        ``dst``.
    """
    from tasks.export import load_task

    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    task = load_task(src)
    pruned = prune_network(task.eval_network(), ratio, "ratio", criterion)  # in place
    state = pruned.state_dict()
    resize_to_state_dict(task.network, state)
    task.network.load_state_dict(state)
    if getattr(task, "ema", None) is not None:
        resize_to_state_dict(task.ema.module, state)
        task.ema.module.load_state_dict(state)
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = task.state_dict()
    checkpoint["pruning"] = {
        "ratio": ratio, "criterion": criterion, "source": str(src), "widths": expansion_widths(task.network),
    }  # fmt: skip
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.common.pruning SRC DST --ratio 0.5``: prune a trained checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(description="Prune the MBConv expansion channels of a trained task checkpoint.")
    parser.add_argument("src", type=Path, help="checkpoint written by fit")
    parser.add_argument("dst", type=Path, help="pruned checkpoint to write")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of expansion channels to remove")
    parser.add_argument("--criterion", choices=("bn", "l1", "l2"), default="bn")
    args = parser.parse_args(argv)
    if not args.src.is_file():
        parser.error(f"no checkpoint at {args.src}")
    dst = prune_checkpoint(args.src, args.dst, args.ratio, criterion=args.criterion)
    widths = torch.load(dst, map_location="cpu", weights_only=True)["pruning"]["widths"]
    print(f"wrote {dst}: {len(widths)} blocks pruned to {sum(widths.values())} expansion channels in all")
    return 0


__all__ = ["prune_checkpoint", "prune_network", "resize_to_state_dict"]


if __name__ == "__main__":
    raise SystemExit(main())
