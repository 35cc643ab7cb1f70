"""Latency vs multiply-adds, B0-B7 at their native resolution: ours, ours fast, timm.

Classifier models (``features_only=False``, timm ``efficientnet_bN``) at batch 1 (``--batch``),
eval, ``torch.inference_mode``. MACs are counted with :func:`effbackbone.profile.count_macs`
(convolutions and linear layers) for both implementations. Each variant is its own interleaved
group (ours / ours A/A copy on B0 / ours fast / timm); big variants get fewer rounds.
``--quick`` runs B0-B3.

Run: ``python3 benchmarks/bench_scaling.py [--quick] [--channels-last]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
from torch import nn

from effbackbone import VARIANTS, create_model
from effbackbone.fuse import optimize_for_inference
from effbackbone.profile import count_macs


def _rounds(name: str, base: int) -> int:
    """Fewer rounds for the big variants (B4-B5: half, B6-B7: a fifth, at least 3)."""
    idx = int(name[1:])
    return base if idx < 4 else max(3, base // 2) if idx < 6 else max(3, base // 5)


def build(name: str, with_timm: bool) -> dict[str, Callable[[], nn.Module]]:
    """Builders for one variant."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "ours": lambda: create_model(name, features_only=False),
        "ours fast (fused BN)": lambda: optimize_for_inference(create_model(name, features_only=False)),
    }
    if name == "b0":
        builders["ours (A/A copy)"] = lambda: create_model(name, features_only=False)
    if with_timm:
        import timm

        builders["timm"] = lambda: timm.create_model(f"efficientnet_{name}", pretrained=False)
    return builders


def main(argv: list[str] | None = None) -> None:
    """Time every variant and print latency and ms per GMAC."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--resolution", type=int, default=None, help="override the native resolution (checks)")
    args = parser.parse_args(argv)
    common.setup(args)
    names = args.variants or [f"b{i}" for i in range(4 if args.quick else 8)]
    with_timm = common.importable("timm")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    groups: list[dict[str, Any]] = []
    for name in names:
        res = args.resolution or VARIANTS[name].resolution
        x = torch.randn(args.batch, 3, res, res).contiguous(memory_format=fmt)
        cases = []
        for label, make in build(name, with_timm).items():
            model = make().eval().to(memory_format=fmt)
            macs = count_macs(model, res)

            def fn(model: nn.Module = model, x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    model(x)

            cases.append(common.Case(label, fn, items=args.batch, meta={"macs_per_image": macs}))
        common.run_interleaved(cases, _rounds(name, args.rounds), args.warmup, args.min_sample_s)
        reference = "timm" if with_timm else "ours"
        rows = common.summarize(cases, reference)
        for r in rows:
            r["ms_per_gmac"] = r["median_s"] * 1e3 / (r["macs_per_image"] * args.batch / 1e9)
        title = f"{name} {res}x{res} batch {args.batch}, fp32, inference_mode, {fmt}"
        common.print_table(title, rows)
        print("MACs/image: " + ", ".join(f"{r['name']} {r['macs_per_image'] / 1e9:.3f} G" for r in rows))
        groups.append({"title": title, "variant": name, "resolution": res, "rows": rows})
        del cases
    print("\nlatency vs MACs (median ms per image; ms per GMAC)")
    for g in groups:
        cells = "  ".join(
            f"{r['name']}: {r['median_s'] * 1e3 / args.batch:.1f} ms ({r['ms_per_gmac']:.1f}/GMAC)" for r in g["rows"]
        )
        print(f"{g['variant']:<4}{g['rows'][0]['macs_per_image'] / 1e9:7.2f} GMAC  {cells}")
    common.write_json("scaling", args, {"groups": groups})


if __name__ == "__main__":
    main()
