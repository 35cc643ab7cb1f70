"""``effbackbone info``: size, cost and pyramid of every variant, next to the paper's numbers.

Models are built on the ``meta`` device (shapes only, no weights allocated), so the whole table,
B7 at 600 px included, prints in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from effbackbone.arch import PAPER_COST, VARIANTS, Variant
from effbackbone.factory import create_model, resolve_variant
from effbackbone.profile import count_params, profile
from effbackbone.scaling import ALPHA, BETA, GAMMA

_HEAD = ("conv_head", "bn2", "classifier")


@dataclass(frozen=True)
class InfoRow:
    """One line of the table.

    Attributes:
        name: Variant name (``b0@phi=2.5`` for a custom compound coefficient).
        family: Base family.
        width: Width multiplier.
        depth: Depth multiplier.
        resolution: Native input resolution.
        params: Parameters of the ImageNet classifier.
        encoder_params: Parameters of the ``features_only`` encoder (no head conv, no classifier).
        macs: Multiply-adds of the classifier at the native resolution.
        paper_params_m: The paper's parameter count (millions), if it reports one.
        paper_flops_b: The paper's FLOPs (billions of multiply-adds), if it reports them.
        channels: Channels of C1..C5.
        strides: Strides of C1..C5.
    """

    name: str
    family: str
    width: float
    depth: float
    resolution: int
    params: int
    encoder_params: int
    macs: int
    paper_params_m: float | None
    paper_flops_b: float | None
    channels: list[int]
    strides: list[int]


def describe(name: str, variant: Variant, **options: float) -> InfoRow:
    """Build ``name`` (with ``options`` such as ``phi``) on the meta device and measure it."""
    with torch.device("meta"):
        model = create_model(name.split("@")[0], features_only=False, **options)
    cost = profile(model, variant.resolution)
    head = sum(count_params(getattr(model, m)) for m in _HEAD)
    paper = PAPER_COST.get(name)
    specs = model.all_feature_specs
    return InfoRow(
        name=name, family=variant.family, width=round(variant.width, 4), depth=round(variant.depth, 4),
        resolution=variant.resolution, params=cost.params, encoder_params=cost.params - head, macs=cost.macs,
        paper_params_m=paper[0] if paper else None, paper_flops_b=paper[1] if paper else None,
        channels=[s.channels for s in specs], strides=[s.stride for s in specs],
    )


def format_table(rows: list[InfoRow]) -> str:
    """Render rows as a Markdown table (readable in a terminal, pasteable into docs)."""
    header = (
        "| model | width | depth | res | params (M) | encoder (M) | MACs (B) | paper params (M) | paper FLOPs (B) "
        "| C1..C5 channels |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        paper_p = f"{r.paper_params_m:g}" if r.paper_params_m is not None else "-"
        paper_f = f"{r.paper_flops_b:g}" if r.paper_flops_b is not None else "-"
        lines.append(
            f"| {r.name} | {r.width:g} | {r.depth:g} | {r.resolution} | {r.params / 1e6:.2f} "
            f"| {r.encoder_params / 1e6:.2f} | {r.macs / 1e9:.2f} | {paper_p} | {paper_f} "
            f"| {', '.join(map(str, r.channels))} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effbackbone info",
        description="Parameters and multiply-adds (at the native resolution) of every variant, vs the paper.",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    p.add_argument("--phi", type=float, default=None, help="also show the model of compound coefficient PHI")
    p.add_argument("--base", default="b0", help="family base that --phi scales: b0, lite0, v2_s, ... (default b0)")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"depth base of --phi (default {ALPHA})")
    p.add_argument("--beta", type=float, default=BETA, help=f"width base of --phi (default {BETA})")
    p.add_argument("--gamma", type=float, default=GAMMA, help=f"resolution base of --phi (default {GAMMA})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``effbackbone info``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments
        return int(e.code or 0)
    names = [n.strip().lower() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        print(f"effbackbone info: unknown variant(s) {bad}; valid names: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    custom: dict[str, float] = {}
    extra: list[tuple[str, Variant, dict[str, float]]] = []
    if args.phi is not None:
        try:
            variant = resolve_variant(args.base, args.phi, args.alpha, args.beta, args.gamma)
        except ValueError as e:
            print(f"effbackbone info: {e}", file=sys.stderr)
            return 2
        coeffs = {"phi": args.phi, "alpha": args.alpha, "beta": args.beta, "gamma": args.gamma}
        extra.append((f"{args.base}@phi={args.phi:g}", variant, coeffs))
        custom = {**coeffs, "flops_base": args.alpha * args.beta**2 * args.gamma**2}
    rows = [describe(n, VARIANTS[n]) for n in names] + [describe(n, v, **c) for n, v, c in extra]
    if args.json:
        print(json.dumps({"models": [asdict(r) for r in rows], "custom": custom or None}, indent=2))
        return 0
    print(format_table(rows))
    print("\nMACs: Conv2d + Linear multiply-adds of the classifier at batch 1 and the native resolution "
          "(the paper's FLOPs); encoder = features_only model (no head conv, no classifier).")
    if custom:
        print(
            f"{rows[-1].name}: alpha={args.alpha:g} beta={args.beta:g} gamma={args.gamma:g}; "
            f"alpha*beta^2*gamma^2 = {custom['flops_base']:.3f} (paper: ~2)"
        )
    return 0


__all__ = ["InfoRow", "describe", "format_table", "main"]
