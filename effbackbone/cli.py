"""The ``effbackbone`` command: ``info`` (model table) and the Lightning tasks.

``fit``, ``validate``, ``test``, ``predict``, ``quickstart`` and ``export`` go to :mod:`tasks.cli`
(imported only then: it needs the ``tasks`` extra, ``pip install 'effbackbone[tasks]'``).
"""

from __future__ import annotations

import sys

TASK_COMMANDS = ("fit", "validate", "test", "predict", "quickstart", "export")
USAGE = """usage: effbackbone {info,quickstart,fit,validate,test,predict,export} ...
  info        parameters and multiply-adds of every variant vs the paper
  quickstart  generate a small dataset, train U-Net-B0 on it (a few CPU minutes), predict, report
  fit         train:     effbackbone fit --config configs/segmentation/quickstart_unet_b0.yaml
  validate    evaluate:  effbackbone validate --config <yaml> --ckpt_path <ckpt>
  test        evaluate on the test split
  predict     a folder of images -> masks and overlays: --data.predict_dir <dir> --ckpt_path <ckpt>
  export      a checkpoint to ONNX: effbackbone export --ckpt <ckpt> --output model.onnx
Run 'effbackbone <command> --help' for a command's options."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``effbackbone`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "info":
        from effbackbone.info import main as info_main

        return info_main(args[1:])
    if args and args[0] in TASK_COMMANDS:
        try:
            from tasks.cli import main as tasks_main
        except ImportError as e:
            hint = "pip install 'effbackbone[tasks]'"
            print(f"effbackbone {args[0]} needs the tasks extra: {hint} ({e})", file=sys.stderr)
            return 2
        return tasks_main(args)
    if args and args[0] in ("-h", "--help") or not args:
        print(USAGE)
        return 0
    print(f"effbackbone: unknown command {args[0]!r}; try 'effbackbone --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
