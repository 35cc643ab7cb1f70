"""Training memory per variant at its native resolution, and the batch that fits in 16/24/80 GB.

Everything is computed on the ``meta`` device (shapes only: no data, no time, any size), so the
numbers are exact and device-independent:

* ``peak``: the peak of live tensor bytes during one AdamW training step of the classifier
  (``features_only=False``), tracked by :func:`common.tracked_peak` (torch's ``MemTracker``):
  parameters, gradients, optimizer states, activations, temporaries, and with gradient
  checkpointing the recomputation. Per image = peak(batch 2) - peak(batch 1); fixed = the rest.
* ``saved``: the activations alone, i.e. what autograd keeps for backward
  (:func:`common.saved_tensor_bytes`), per image.

The batch that fits a budget is an *estimate* from those exact counts:
``floor((0.9 * budget - 1 GiB - fixed) / peak_per_image)``, with 1 GiB for the CUDA context and
cuDNN workspaces and 10% for the caching allocator's rounding and fragmentation. fp32 throughout.

With ``--measure``, a CPU training step of B0 is also run in fresh subprocesses and the peak RSS
increase reported, as a real-allocation cross-check (plain / memory-efficient / checkpointing).

Run: ``python3 benchmarks/bench_memory.py [--quick] [--measure]``
"""

from __future__ import annotations

import argparse
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
import torch.nn.functional as F

from effbackbone import VARIANTS, create_model

GIB = 2**30
BUDGETS_GB = (16, 24, 80)
OVERHEAD = 1 * GIB
MODES: dict[str, dict[str, bool]] = {
    "plain": {},
    "memory_efficient": {"memory_efficient": True},
    "checkpoint": {"grad_checkpointing": True},
    "checkpoint+memory_efficient": {"grad_checkpointing": True, "memory_efficient": True},
}


def step_peak(name: str, res: int, batch: int, opts: dict[str, bool]) -> dict[str, int] | None:
    """Tracked peak bytes of one training step on the meta device (after a first, untracked one)."""
    with torch.device("meta"):
        model = create_model(name, features_only=False, drop_rate=0.0, **opts)
        x, y = torch.randn(batch, 3, res, res), torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    return common.tracked_peak(step, model, opt)


def saved_per_image(name: str, res: int, opts: dict[str, bool]) -> int:
    """Activation bytes autograd saves per image (saved(batch 2) - saved(batch 1))."""
    with torch.device("meta"):
        model = create_model(name, features_only=False, **opts)
    out = []
    for batch in (1, 2):
        x = torch.randn(batch, 3, res, res, device="meta")
        out.append(common.saved_tensor_bytes(lambda x=x: model(x), model.parameters())[0])
    return out[1] - out[0]


def variant_row(name: str) -> dict[str, Any]:
    """Per-image and fixed peak memory for every mode, and the batch per budget."""
    res = VARIANTS[name].resolution
    with torch.device("meta"):
        params = sum(p.numel() for p in create_model(name, features_only=False).parameters())
    row: dict[str, Any] = {
        "variant": name, "resolution": res, "params": params,
        "saved_per_image": {m: saved_per_image(name, res, MODES[m]) for m in ("plain", "memory_efficient")},
        "peak_per_image": {}, "peak_fixed": {}, "batch_fits": {},
    }
    for mode, opts in MODES.items():
        p1, p2 = step_peak(name, res, 1, opts), step_peak(name, res, 2, opts)
        if p1 is None or p2 is None:
            print("[skip] peak tracking: torch.distributed._tools.mem_tracker is not available")
            return row
        per_image = p2["total"] - p1["total"]
        fixed = p1["total"] - per_image
        row["peak_per_image"][mode], row["peak_fixed"][mode] = per_image, fixed
        row["batch_fits"][mode] = {
            gb: max(0, int((0.9 * gb * 1e9 - OVERHEAD - fixed) // per_image)) for gb in BUDGETS_GB
        }
    return row


_CHILD = r"""
import torch
torch.set_num_threads({threads})
from effbackbone import create_model
m = create_model("b0", features_only=False, drop_rate=0.0, **{opts})
opt = torch.optim.AdamW(m.parameters())
x = torch.randn({batch}, 3, {res}, {res}); y = torch.randint(0, 1000, ({batch},))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
_prime_optimizer(opt)
_reset_peak()
base = _kib("VmRSS")
step()
peak = _kib("VmHWM")
print(json.dumps({{"base_kib": base, "peak_kib": peak}}))
"""


def measured_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak RSS growth over one CPU training step of B0, a fresh process per mode.

    The AdamW state is allocated first (zero gradients, lr 0), so the growth is the step's
    activations and temporaries; with the malloc settings freed memory stays in the heap, so the
    peak RSS is the peak of live allocations plus fragmentation.
    """
    batch, res = (4, 160) if args.quick else (8, 224)
    configs: dict[str, dict[str, Any]] = {
        "plain": {}, "memory_efficient": {"memory_efficient": True}, "checkpoint": {"grad_checkpointing": True},
    }
    rows = []
    for mode, opts in configs.items():
        code = _CHILD.format(threads=args.threads, opts=repr(opts), batch=batch, res=res)
        growth = common.peak_rss_growth_mib(code, args.rss_repeats)
        rows.append({"mode": mode, "batch": batch, "resolution": res, "peak_rss_growth_mib": growth})
        print(f"measured b0 {res}px batch {batch} {mode:<18} peak RSS growth over a step {growth:8.1f} MiB")
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The per-image table and the batch-fits table."""
    mib = 2**20
    print("\ntraining step memory per image at native resolution (fp32, AdamW, MiB; exact, meta device)")
    cols = ("saved", "peak", "peak me", "peak ckpt", "ckpt+me", "fixed")
    print(f"{'variant':<8}{'res':>5}{'params M':>9}" + "".join(f"{c:>10}" for c in cols) + f"{'ckpt saves':>11}")
    for r in rows:
        p = r["peak_per_image"]
        if not p:
            continue
        cells = [r["saved_per_image"]["plain"], p["plain"], p["memory_efficient"], p["checkpoint"],
                 p["checkpoint+memory_efficient"], r["peak_fixed"]["plain"]]
        print(
            f"{r['variant']:<8}{r['resolution']:>5}{r['params'] / 1e6:>9.1f}"
            + "".join(f"{c / mib:>10.0f}" for c in cells)
            + f"{1 - p['checkpoint'] / p['plain']:>11.0%}"
        )
    print("\nestimated training batch that fits (fp32, AdamW; see the module docstring for the formula)")
    print(f"{'variant':<8}" + "".join(f"{f'{gb} GB':>22}" for gb in BUDGETS_GB))
    print(f"{'':<8}" + "".join(f"{'plain/me/ckpt/ckpt+me':>22}" for _ in BUDGETS_GB))
    for r in rows:
        f = r["batch_fits"]
        if not f:
            continue
        cells = ["/".join(str(f[m][gb]) for m in MODES) for gb in BUDGETS_GB]
        print(f"{r['variant']:<8}" + "".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    """Compute the tables (and optionally the measured cross-check)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--measure", action="store_true", help="also measure peak RSS of CPU training steps (B0)")
    args = parser.parse_args(argv)
    common.setup(args)
    full = [f"b{i}" for i in range(8)] + ["lite0", "v2_s", "v2_m"]
    names = args.variants or (["b0", "b1", "b2", "b3"] if args.quick else full)
    rows = [variant_row(n) for n in names]
    print_rows(rows)
    payload: dict[str, Any] = {"budgets_gb": BUDGETS_GB, "overhead_bytes": OVERHEAD, "variants": rows}
    if args.measure:
        payload["measured"] = measured_rows(args)
    common.write_json("memory", args, payload)


if __name__ == "__main__":
    main()
