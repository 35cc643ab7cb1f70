"""The ``effbackbone`` command: ``info`` (model table), ``quickstart``, ``export`` and the Lightning tasks.

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (:mod:`tasks.lightning_cli`), imported
only then: it needs the ``tasks`` extra (``pip install 'effbackbone[tasks]'``); ``info`` needs torch only.
The entry point lives with the tasks, so the library (``effbackbone``) imports nothing of the trainer.

Messages from dependencies that a user can do nothing about are filtered here, for the duration of
the command only (:func:`quiet_dependencies`); the library itself never filters warnings.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.lightning_cli import EffBackboneCLI

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Commands with their own argparse front end: command -> module with a ``main(argv)``.
EXTRA_COMMANDS = {"quickstart": "tasks.quickstart", "export": "tasks.export", "quantize": "tasks.quantize"}
TASK_COMMANDS = (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS)
USAGE = """usage: effbackbone {info,quickstart,fit,validate,test,predict,export,quantize} ...
  info        parameters and multiply-adds of every variant vs the paper
  quickstart  generate a small dataset, train U-Net-B0 on it (a few CPU minutes), predict, report
  fit         train:     effbackbone fit --config configs/segmentation/quickstart_unet_b0.yaml
  validate    evaluate:  effbackbone validate --config <yaml> --ckpt_path <ckpt>
  test        evaluate on the test split
  predict     a folder of images -> masks, boxes or instances, and pictures, in <run>/predictions:
              effbackbone predict --config <yaml> --ckpt_path <ckpt> [--data.init_args.predict_dir <dir>]
              (--ckpt_path model.onnx or model.xml: the same outputs from a file of export or quantize)
  export      a checkpoint to ONNX (any batch, height and width): effbackbone export --ckpt <ckpt> --output model.onnx
  quantize    a checkpoint to int8, calibrated on its training images; prints the float and int8 val metrics:
              effbackbone quantize --config <yaml> --ckpt <ckpt> --output model_int8.onnx
              (--output model_int8.xml: OpenVINO, faster on x86 CPUs for SiLU models, e.g. B0, D0)
Run 'effbackbone <command> --help' for a command's options (fit --help starts with the tasks and shipped configs)."""


# (category, message regex) of dependency warnings the command hides: nothing in a user's config causes them.
QUIET_WARNINGS = (
    # Lightning's pytree helpers use a torch API that torch deprecated (lightning/pytorch/utilities/_pytree.py).
    (Warning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),
    # effdet decorates helpers with @torch.jit.script at import (effdet/object_detection/matcher.py, ...).
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
)
# Info lines of Lightning's that advertise rather than inform.
QUIET_LOG_LINES = ("litlogger",)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in QUIET_LOG_LINES)


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Hide :data:`QUIET_WARNINGS` and :data:`QUIET_LOG_LINES` while the command runs, then restore."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # rank_zero_info's logger
    drop = _DropLines()
    log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        log.removeFilter(drop)


def run_cli(args: list[str] | None = None, run: bool = True) -> EffBackboneCLI:
    """Build (and by default run) the LightningCLI on ``args`` (``sys.argv[1:]`` when ``None``)."""
    from tasks.lightning_cli import run_cli as _run_cli

    return _run_cli(args, run=run)


def _task_command(args: list[str]) -> int:
    if args[0] in EXTRA_COMMANDS:
        return int(importlib.import_module(EXTRA_COMMANDS[args[0]]).main(args[1:]))
    run_cli(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``effbackbone`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "info":
        from effbackbone.info import main as info_main

        return info_main(args[1:])
    if args and args[0] in TASK_COMMANDS:
        try:
            import lightning  # noqa: F401 - only to say which extra is missing
        except ImportError as e:
            hint = "pip install 'effbackbone[tasks]'"
            print(f"effbackbone {args[0]} needs the tasks extra: {hint} ({e})", file=sys.stderr)
            return 2
        with quiet_dependencies():
            return _task_command(args)
    if args and args[0] in ("-h", "--help") or not args:
        print(USAGE)
        return 0
    print(f"effbackbone: unknown command {args[0]!r}; try 'effbackbone --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
