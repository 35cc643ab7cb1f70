"""Encoder inference throughput: ours vs timm, torchvision and smp EfficientNet-B0 encoders.

Every encoder returns its multi-scale features (timm ``features_only``, torchvision ``features``
through ``IntermediateLayerGetter`` at the five stride levels, smp ``get_encoder`` with
``weights=None``). Weights are random (the speed does not depend on them); BN statistics are the
init ones. For each input size and grad mode one interleaved group times every model in
contiguous and channels_last memory format, plus "ours fast" (BN folded into the convs,
:func:`effbackbone.fuse.optimize_for_inference`) and an A/A copy of ours (noise floor).

Run: ``python3 benchmarks/bench_encoder.py [--quick] [--stock-malloc] [--compile]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
from torch import nn

from effbackbone import create_model
from effbackbone.fuse import optimize_for_inference

SIZES = ((224, 8), (512, 2))
MODES: dict[str, Callable[[], Any]] = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def build_models() -> dict[str, Callable[[], nn.Module]]:
    """Builders for every encoder that can be imported here, ours first."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "ours": lambda: create_model("b0"),
        "ours (A/A copy)": lambda: create_model("b0"),
        "ours fast (fused BN)": lambda: optimize_for_inference(create_model("b0")),
    }
    if common.importable("timm"):
        import timm

        builders["timm efficientnet_b0"] = lambda: timm.create_model(
            "efficientnet_b0", features_only=True, pretrained=False
        )
    if common.importable("torchvision"):
        from torchvision.models import efficientnet_b0
        from torchvision.models._utils import IntermediateLayerGetter

        def tv() -> nn.Module:
            layers = {"1": "C1", "2": "C2", "3": "C3", "5": "C4", "7": "C5"}
            return IntermediateLayerGetter(efficientnet_b0().features, return_layers=layers)

        builders["torchvision efficientnet_b0"] = tv
    if common.importable("segmentation_models_pytorch"):
        from segmentation_models_pytorch.encoders import get_encoder

        builders["smp efficientnet-b0"] = lambda: get_encoder("efficientnet-b0", weights=None)
        builders["smp timm-efficientnet-b0"] = lambda: get_encoder("timm-efficientnet-b0", weights=None)
    return builders


def make_cases(
    builders: dict[str, Callable[[], nn.Module]], size: int, batch: int, mode: str, compile_: bool
) -> list[common.Case]:
    """One group: every model x {contiguous, channels_last}."""
    x = torch.randn(batch, 3, size, size)
    variants = [(name, build, False) for name, build in builders.items()]
    if compile_:
        variants += [(n, b, True) for n, b in builders.items() if n in ("ours fast (fused BN)", "timm efficientnet_b0")]
    cases = []
    for name, build, compiled in variants:
        for fmt in ("contiguous", "channels_last"):
            model = build().eval()
            inp = x
            if fmt == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                inp = x.contiguous(memory_format=torch.channels_last)
            if compiled:
                model, name = torch.compile(model), name.removesuffix(" +compile") + " +compile"

            def fn(model: nn.Module = model, inp: torch.Tensor = inp, ctx: Callable[[], Any] = MODES[mode]) -> None:
                with ctx():
                    model(inp)

            cases.append(common.Case(f"{name} [{fmt}]", fn, items=batch, meta={"model": name, "format": fmt}))
    return cases


def main(argv: list[str] | None = None) -> None:
    """Run every group and print the ratio tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (ours fast, timm)")
    parser.add_argument("--sizes", nargs="+", default=None, help="override SIZES, e.g. 224x8 512x2")
    args = parser.parse_args(argv)
    common.setup(args)
    builders = build_models()
    reference = "timm efficientnet_b0 [contiguous]" if "timm efficientnet_b0" in builders else "ours [contiguous]"
    groups = []
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes] if args.sizes else SIZES
    for size, batch in sizes:
        for mode in args.modes:
            cases = make_cases(builders, size, batch, mode, args.compile)
            common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
            rows = common.summarize(cases, reference)
            title = f"encoder B0 {size}x{size} batch {batch}, fp32, {mode}"
            common.print_table(title, rows)
            groups.append({"title": title, "size": size, "batch": batch, "mode": mode, "rows": rows})
            del cases
    common.write_json("encoder", args, {"groups": groups})


if __name__ == "__main__":
    main()
