"""The ``effbackbone`` command: ``info`` (model table) and the Lightning tasks."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``effbackbone`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "info":
        from effbackbone.info import main as info_main

        return info_main(args[1:])
    if args and args[0] in ("-h", "--help") or not args:
        print("usage: effbackbone {info} ...\n  info   parameters and multiply-adds of every variant vs the paper")
        return 0
    print(f"effbackbone: unknown command {args[0]!r}; try 'effbackbone --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
