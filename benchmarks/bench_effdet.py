"""EfficientDet-D0 at 512x512: train step and predict (with NMS), ours vs effdet.

* ours: ``effbackbone.integrations.effdet.create_efficientdet("d0", bench_task=...)``, effdet's
  BiFPN and heads on our encoder (``tf_compat=True``: the TF "same" padding and BN eps of
  ``tf_efficientdet_d0``).
* effdet: ``effdet.create_model("tf_efficientdet_d0", bench_task=..., pretrained=False)``.

Train step (batch 2): ``DetBenchTrain`` forward with 3 random boxes per image (effdet targets:
``bbox`` yxyx, ``cls`` 1-based), backward, AdamW step; also ours with ``memory_efficient`` BN+act
in the encoder, and the autograd-saved bytes and tracked peak memory (``MemTracker``) of every train
row. Predict (batch 1 and 4):
``DetBenchPredict`` (decode + batched NMS, 100 detections per image) in ``inference_mode``; also
ours with the exact faster top-k only, with BN folded only, and "ours fast"
(:func:`effbackbone.integrations.effdet_inference.optimize_efficientdet_for_inference`: BN folded in the
encoder and BiFPN, channels_last, faster top-k); effdet also in channels_last. Random weights, 90
classes, fp32; an A/A copy of ours in every group.

Run: ``python3 benchmarks/bench_effdet.py [--quick]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
from torch import nn

SIZE = 512


def builders(task: str, size: int = SIZE) -> dict[str, Callable[[], nn.Module]]:
    """Row label -> builder for the models importable here."""
    out: dict[str, Callable[[], nn.Module]] = {}
    if not common.importable("effdet"):
        return out
    import effdet

    if common.importable("effbackbone.integrations.effdet"):
        from effbackbone.activations import set_memory_efficient
        from effbackbone.fuse import fuse_bn
        from effbackbone.integrations.effdet import create_efficientdet

        def ours() -> nn.Module:
            return create_efficientdet("d0", bench_task=task, image_size=size)

        out["ours"] = ours
        out["ours (A/A copy)"] = ours
        if task == "train":
            out["ours memory_efficient"] = lambda: set_memory_efficient(ours())
            out["ours channels_last"] = lambda: _ChannelsLast(ours())
        else:
            from effbackbone.integrations.effdet_inference import (
                FastDetBenchPredict,
                optimize_efficientdet_for_inference,
            )

            out["ours, fast top-k"] = lambda: FastDetBenchPredict(ours().model)
            out["ours fused BN"] = lambda: fuse_bn(ours())
            out["ours fast (folded BN, NHWC, top-k)"] = lambda: optimize_efficientdet_for_inference(ours())
    # bench_labeler: effdet's train bench then assigns anchors itself, as ours does.
    def reference() -> nn.Module:
        return effdet.create_model(
            "tf_efficientdet_d0", bench_task=task, pretrained=False, pretrained_backbone=False,
            image_size=(size, size), bench_labeler=True,
        )

    # effdet's best eager setting on CPU: channels_last weights and inputs
    out["effdet tf_efficientdet_d0, channels_last"] = lambda: _ChannelsLast(reference())
    out["effdet tf_efficientdet_d0"] = reference
    return out


class _ChannelsLast(nn.Module):
    """A bench with channels_last weights that converts its inputs too."""

    def __init__(self, bench: nn.Module) -> None:
        super().__init__()
        self.bench = bench.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, *args: Any) -> Any:  # noqa: ANN401 - the bench's own outputs
        return self.bench(x.contiguous(memory_format=torch.channels_last), *args)


def _targets(batch: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tl = torch.rand(batch, 3, 2, generator=g) * size * 0.6
    wh = torch.rand(batch, 3, 2, generator=g) * size * 0.3 + 16
    return {"bbox": torch.cat([tl, tl + wh], -1), "cls": torch.randint(1, 91, (batch, 3), generator=g).float()}


def train_group(args: argparse.Namespace) -> dict[str, Any] | None:
    """Interleaved train steps (batch 2) and saved bytes."""
    batch = 2
    x, target = torch.randn(batch, 3, args.size, args.size), _targets(batch, args.size)
    cases, saved, steps = [], {}, {}
    for label, make in builders("train", args.size).items():
        bench = make().train()
        opt = torch.optim.AdamW(bench.parameters(), lr=1e-4)
        saved[label] = common.saved_tensor_bytes(lambda b=bench: b(x, target)["loss"], bench.parameters())[0]

        def step(bench: nn.Module = bench, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            bench(x, target)["loss"].backward()
            opt.step()

        steps[label] = (step, bench, opt)
        cases.append(common.Case(label, step, items=batch))
    if not cases:
        return None
    common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
    rows = common.summarize(cases, cases[-1].name)
    for r in rows:
        r["saved_mib"] = saved[r["name"]] / 2**20
        peak = common.tracked_peak(*steps[r["name"]])  # the timed steps allocated the AdamW state
        r["peak_mib"] = peak["total"] / 2**20 if peak is not None else float("nan")
    title = f"EfficientDet-D0 train step {args.size}x{args.size} batch {batch}, fp32, AdamW"
    common.print_table(title, rows)
    print("saved for backward (MiB): " + ", ".join(f"{r['name']} {r['saved_mib']:.0f}" for r in rows))
    print("peak of the step (MiB):   " + ", ".join(f"{r['name']} {r['peak_mib']:.0f}" for r in rows))
    return {"title": title, "rows": rows}


def predict_group(args: argparse.Namespace, batch: int) -> dict[str, Any] | None:
    """Interleaved predict calls (decode + NMS)."""
    x = torch.randn(batch, 3, args.size, args.size)
    cases = []
    for label, make in builders("predict", args.size).items():
        bench = make().eval()

        def fn(bench: nn.Module = bench) -> None:
            with torch.inference_mode():
                bench(x)

        cases.append(common.Case(label, fn, items=batch))
    if not cases:
        return None
    common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
    rows = common.summarize(cases, cases[-1].name)
    title = f"EfficientDet-D0 predict incl. NMS {args.size}x{args.size} batch {batch}, fp32, inference_mode"
    common.print_table(title, rows)
    return {"title": title, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """Train group, then predict at batch 1 and 4."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--size", type=int, default=SIZE, help="override 512 (development checks; multiple of 128)")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)
    common.setup(args)
    groups = [] if args.skip_train else [train_group(args)]
    groups += [predict_group(args, b) for b in (1, 4)]
    groups = [g for g in groups if g is not None]
    if not groups:
        print("[skip] nothing to run: effdet is not importable")
        return
    common.write_json("effdet", args, {"groups": groups})


if __name__ == "__main__":
    main()
