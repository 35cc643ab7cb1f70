"""U-Net-B0 training step: time and memory, ours vs smp's three EfficientNet-B0 encoders.

One step = forward, cross-entropy over 3 classes, backward, AdamW step, on a 256x256 batch of 4
(fp32, random weights; ``--channels-last`` optional). All models are ``smp.Unet`` with the same
decoder; the encoders differ: ours (``effbackbone-b0``, from ``effbackbone.integrations.smp``;
also with ``memory_efficient`` BN+activation and with gradient checkpointing, and an A/A copy),
``tu-efficientnet_b0`` (timm ``features_only``), ``timm-efficientnet-b0`` (smp's timm-based
copy) and ``efficientnet-b0`` (smp's port of efficientnet-pytorch, whose C1 is the 32-channel
stem, so its decoder is slightly wider at stride 2).

Memory:

* ``saved MiB``: the bytes autograd keeps for backward during forward + loss (each storage once,
  parameters excluded): exact and device-independent; not visible inside checkpointed regions,
  so it is left out for the checkpointing row.
* ``peak MiB``: the peak of live tensor bytes during one whole training step (torch's
  ``MemTracker``, :func:`common.tracked_peak`): parameters, gradients, AdamW state, activations,
  temporaries and checkpoint recomputation. Exact and deterministic.
* ``peak RSS MiB`` (``--rss``): the growth of the process's peak RSS over one training step in a
  fresh process per model, after the AdamW state was allocated: real allocations including
  allocator fragmentation, which varies by ~5% between runs (minimum over ``--rss-repeats``
  children, 3 in the full run).

Run: ``python3 benchmarks/bench_unet_train.py [--quick] [--rss]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
import torch.nn.functional as F
from torch import nn

SIZE, BATCH, CLASSES = 256, 4, 3
REFERENCE = "smp tu-efficientnet_b0"


def available() -> dict[str, str]:
    """Row label -> builder key, for what can be imported here."""
    rows: dict[str, str] = {}
    if not common.importable("segmentation_models_pytorch"):
        return rows
    if common.importable("effbackbone.integrations.smp"):
        rows |= {
            "ours": "ours", "ours (A/A copy)": "ours", "ours memory_efficient": "ours_me",
            "ours grad checkpointing": "ours_ckpt", "ours memory_efficient + checkpointing": "ours_me_ckpt",
        }
    else:
        print("[skip] ours: effbackbone.integrations.smp is not available yet")
    rows |= {
        "smp tu-efficientnet_b0": "tu-efficientnet_b0", "smp timm-efficientnet-b0": "timm-efficientnet-b0",
        "smp efficientnet-b0": "efficientnet-b0",
    }
    return rows


def build_unet(key: str) -> nn.Module:
    """The U-Net for a builder key (also used by the RSS child processes)."""
    import segmentation_models_pytorch as smp

    if key.startswith("ours"):
        import effbackbone.integrations.smp  # noqa: F401  (registers effbackbone-*)
        from effbackbone.activations import set_memory_efficient
        from effbackbone.model import EfficientNet

        model = smp.Unet("effbackbone-b0", encoder_weights=None, classes=CLASSES)
        if key in ("ours_me", "ours_me_ckpt"):
            set_memory_efficient(model)
        if key in ("ours_ckpt", "ours_me_ckpt"):
            for m in model.modules():
                if isinstance(m, EfficientNet):
                    m.set_grad_checkpointing(True)
        return model
    return smp.Unet(key, encoder_weights=None, classes=CLASSES)


def make_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """A closure running one full training step, and its optimizer."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, opt


_CHILD = r"""
import sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {bench_dir!r})
import bench_unet_train as b
m = b.build_unet({key!r})
fmt = torch.channels_last if {channels_last} else torch.contiguous_format
m = m.to(memory_format=fmt)
x = torch.randn(b.BATCH, 3, {size}, {size}).contiguous(memory_format=fmt)
y = torch.randint(0, b.CLASSES, (b.BATCH, {size}, {size}))
step, opt = b.make_step(m, x, y)
_prime_optimizer(opt)
_reset_peak()
base = _kib("VmRSS")
step()
peak = _kib("VmHWM")
print(json.dumps({{"base_kib": base, "peak_kib": peak}}))
"""


def main(argv: list[str] | None = None) -> None:
    """Time the steps interleaved, then the memory, and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in fresh processes (slow)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--size", type=int, default=SIZE, help="override 256 (development checks)")
    args = parser.parse_args(argv)
    common.setup(args)
    rows_available = available()
    if not rows_available:
        print("[skip] nothing to run: segmentation_models_pytorch is not importable")
        return
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(BATCH, 3, args.size, args.size).contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (BATCH, args.size, args.size))
    cases, saved, steps = [], {}, {}
    for label, key in rows_available.items():
        model = build_unet(key).to(memory_format=fmt)
        model.train()
        if not key.endswith("ckpt"):
            saved[label] = common.saved_tensor_bytes(lambda m=model: F.cross_entropy(m(x), y), model.parameters())[0]
        n_params = sum(p.numel() for p in model.parameters())
        step, opt = make_step(model, x, y)
        steps[label] = (step, model, opt)
        cases.append(common.Case(label, step, items=BATCH, meta={"key": key, "params": n_params}))
    common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
    reference = REFERENCE if REFERENCE in rows_available else cases[0].name
    rows = common.summarize(cases, reference)
    for r in rows:
        r["saved_mib"] = saved.get(r["name"], float("nan")) / 2**20
        peak = common.tracked_peak(*steps[r["name"]])  # the timed steps allocated the AdamW state
        if peak is not None:
            r["peak_mib"] = peak["total"] / 2**20
    if args.rss:
        for r in rows:
            code = _CHILD.format(
                threads=args.threads, bench_dir=str(common.ROOT / "benchmarks"), key=r["key"],
                channels_last=args.channels_last, size=args.size,
            )
            r["peak_rss_growth_mib"] = common.peak_rss_growth_mib(code, args.rss_repeats)
    title = f"U-Net B0 train step {args.size}x{args.size} batch {BATCH}, {CLASSES} classes, fp32, AdamW, {fmt}"
    common.print_table(title, rows, unit="img/s")
    print(f"\n{'case':<28}{'params M':>9}{'saved MiB':>11}{'peak MiB':>10}{'peak RSS MiB':>14}")
    nan = float("nan")
    for r in rows:
        print(
            f"{r['name']:<28}{r['params'] / 1e6:>9.2f}{r['saved_mib']:>11.1f}{r.get('peak_mib', nan):>10.1f}"
            f"{r.get('peak_rss_growth_mib', nan):>14.1f}"
        )
    payload: dict[str, Any] = {"title": title, "rows": rows}
    common.write_json("unet_train", args, payload)


if __name__ == "__main__":
    main()
