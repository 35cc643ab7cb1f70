"""Segmentation decoders on the same B0 encoder: parameters, multiply-adds and training step time.

U-Net, FPN (smp) and BiFPN (EfficientDet's segmentation variant, ``decoder="bifpn"``) built by
``SegmentationTask`` exactly as the recipes build them, in the settings of the two measured recipes:

* ``membrane``: 1-channel 256x256 crops, binary (one output), batch 4 (``membrane_*_b0.yaml``);
* ``quickstart``: 3-channel 96x96 images, 4 classes, batch 8 (``quickstart_*_b0.yaml``); BiFPN pads them to 128.

One step = the task's forward (padding included), cross-entropy, backward and an AdamW step, channels_last as the
recipes. MACs are counted on the task's forward of one image (:func:`effbackbone.profile.count_macs`: convolutions
and linear layers, padding included). Steps are interleaved (``common.run_interleaved``); the speed-up column is
paired against U-Net.

Run: ``python3 benchmarks/bench_seg_decoders.py [--quick] [--setting membrane|quickstart] [--threads 1]``
"""

from __future__ import annotations

import argparse
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
import torch.nn.functional as F

SETTINGS = {
    "membrane": {"in_channels": 1, "mode": "binary", "num_classes": 2, "size": 256, "batch": 4},
    "quickstart": {"in_channels": 3, "mode": "multiclass", "num_classes": 4, "size": 96, "batch": 8},
}
DECODERS = ("unet", "fpn", "bifpn")


def build(decoder: str, setting: dict[str, Any]) -> torch.nn.Module:
    """The task of a recipe with ``decoder`` (random init, channels_last)."""
    from tasks.segmentation import SegmentationTask

    return SegmentationTask(
        variant="b0", decoder=decoder, in_channels=setting["in_channels"], mode=setting["mode"],
        num_classes=setting["num_classes"], channels_last=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Count, time interleaved, print one table per setting."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    args = parser.parse_args(argv)
    common.setup(args)
    if not (common.importable("tasks.segmentation") and common.importable("effdet")):
        print("[skip] nothing to run: tasks.segmentation (lightning, smp) and effdet are needed")
        return
    from effbackbone.profile import count_macs

    payload: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        if args.setting not in ("all", name):
            continue
        size, batch, c = setting["size"], setting["batch"], setting["in_channels"]
        x = torch.randn(batch, c, size, size).contiguous(memory_format=torch.channels_last)
        if setting["mode"] == "binary":
            y = torch.randint(0, 2, (batch, 1, size, size)).float()
            loss_fn = F.binary_cross_entropy_with_logits
        else:
            y = torch.randint(0, setting["num_classes"], (batch, size, size))
            loss_fn = F.cross_entropy
        cases, counts = [], {}
        for decoder in DECODERS:
            task = build(decoder, setting)
            counts[decoder] = {
                "params": sum(p.numel() for p in task.model.parameters()),
                "decoder_params": sum(p.numel() for p in task.model.parameters()) - sum(
                    p.numel() for p in task.model.encoder.parameters()
                ),
                "macs": count_macs(task, (c, size, size)),
            }  # fmt: skip
            task.train()
            opt = torch.optim.AdamW(task.parameters(), lr=1e-4)

            def step(task: torch.nn.Module = task, opt: torch.optim.Optimizer = opt, x=x, y=y, loss_fn=loss_fn) -> None:
                opt.zero_grad(set_to_none=True)
                loss_fn(task(x), y).backward()
                opt.step()

            cases.append(common.Case(decoder, step, items=batch, meta=counts[decoder]))
        common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
        rows = common.summarize(cases, "unet")
        title = f"{name}: B0 encoder, {size}x{size} x{c}, batch {batch}, train step (fp32, AdamW, channels_last)"
        common.print_table(title, rows, unit="img/s")
        print(f"\n{'decoder':<10}{'params M':>10}{'decoder M':>11}{'GMACs/img':>11}")
        for r in rows:
            sizes = f"{r['params'] / 1e6:>10.2f}{r['decoder_params'] / 1e6:>11.2f}{r['macs'] / 1e9:>11.3f}"
            print(f"{r['name']:<10}{sizes}")
        payload[name] = {"title": title, "rows": rows}
    common.write_json("seg_decoders", args, payload)


if __name__ == "__main__":
    main()
