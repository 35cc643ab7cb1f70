"""Training memory per variant at its native resolution, and the batch that fits in 16/24/80 GB.

Activation memory is the dominant, batch-proportional part of training memory. It is *computed*,
not sampled: a forward pass on the ``meta`` device (shapes only, no data, no time) under
``torch.autograd.graph.saved_tensors_hooks`` adds up every tensor autograd keeps for backward,
each storage once (:func:`common.saved_tensor_bytes`). That count is exact and independent of the
device. Per image = saved(batch 2) - saved(batch 1).

Gradient checkpointing keeps, per stage, only the stage input; during backward one stage at a
time is recomputed. Its activation memory is estimated as stem + head + all stage inputs + the
largest stage's own saved tensors (an upper bound: later stage inputs are freed as backward goes).

The batch that fits a budget is an *estimate*:
``floor((0.9 * budget - 16 * params - 1 GiB) / activation_bytes_per_image)``: weights, gradients
and two AdamW moments in fp32 (16 bytes per parameter), 1 GiB for the CUDA context and
workspaces, 10% for allocator fragmentation and transient gradient buffers. fp32 throughout.

With ``--measure``, a CPU training step of B0 is also run in fresh subprocesses and the peak RSS
increase reported, as a real-allocation cross-check of the ratios (plain / memory-efficient /
checkpointing).

Run: ``python3 benchmarks/bench_memory.py [--quick] [--measure]``
"""

from __future__ import annotations

import argparse
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
from torch import nn

from effbackbone import VARIANTS, create_model
from effbackbone.activations import set_memory_efficient
from effbackbone.model import EfficientNet

GIB = 2**30
BUDGETS_GB = (16, 24, 80)
OVERHEAD = 1 * GIB


def _saved(model: nn.Module, batch: int, res: int) -> int:
    x = torch.randn(batch, 3, res, res, device="meta")
    return common.saved_tensor_bytes(lambda: model(x), model.parameters())[0]


def _stage_breakdown(model: EfficientNet, res: int) -> dict[str, Any]:
    """Per-image saved bytes inside each stage, each stage's input bytes, and the rest."""
    current = {"stage": -1}
    per_stage: dict[int, dict[int, int]] = {}
    inputs: list[int] = []
    hooks = []
    for i, stage in enumerate(model.blocks):

        def pre(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            current["stage"] = i
            inputs.append(args[0].numel() * args[0].element_size())

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            current["stage"] = -1

        hooks += [stage.register_forward_pre_hook(pre), stage.register_forward_hook(post)]
    params = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter) and id(base) not in params:
            per_stage.setdefault(current["stage"], {})[id(base)] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, 3, res, res, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for h in hooks:
        h.remove()
    sizes = {k: sum(v.values()) for k, v in per_stage.items()}
    outside = sizes.pop(-1, 0)
    return {"outside": outside, "stage_saved": [sizes.get(i, 0) for i in range(len(model.blocks))], "inputs": inputs}


def variant_row(name: str) -> dict[str, Any]:
    """Activation bytes per image (plain, memory-efficient, checkpointed) and the batch per budget."""
    res = VARIANTS[name].resolution
    with torch.device("meta"):
        model = create_model(name, features_only=False).train()
    params = sum(p.numel() for p in model.parameters())
    plain = _saved(model, 2, res) - _saved(model, 1, res)
    br = _stage_breakdown(model, res)
    ckpt = br["outside"] + sum(br["inputs"]) + max(br["stage_saved"])
    set_memory_efficient(model)
    efficient = _saved(model, 2, res) - _saved(model, 1, res)
    br_me = _stage_breakdown(model, res)
    ckpt_me = br_me["outside"] + sum(br_me["inputs"]) + max(br_me["stage_saved"])
    fixed = 16 * params + OVERHEAD
    per_image = {
        "plain": plain, "memory_efficient": efficient, "checkpoint": ckpt, "checkpoint+memory_efficient": ckpt_me,
    }
    fits = {
        mode: {gb: max(0, int((0.9 * gb * 1e9 - fixed) // b)) for gb in BUDGETS_GB} for mode, b in per_image.items()
    }
    return {"variant": name, "resolution": res, "params": params, "act_bytes_per_image": per_image, "batch_fits": fits}


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
    """The activation table and the batch-fits table."""
    print("\nactivation memory per image (fp32, MiB; computed exactly from saved tensors on the meta device)")
    cols = ("plain", "mem-eff", "ckpt", "ckpt+me")
    print(f"{'variant':<8}{'res':>5}{'params M':>9}" + "".join(f"{c:>9}" for c in cols) + f"{'ckpt saves':>11}")
    for r in rows:
        a = {k: v / 2**20 for k, v in r["act_bytes_per_image"].items()}
        print(
            f"{r['variant']:<8}{r['resolution']:>5}{r['params'] / 1e6:>9.1f}{a['plain']:>9.0f}"
            f"{a['memory_efficient']:>9.0f}{a['checkpoint']:>9.0f}{a['checkpoint+memory_efficient']:>9.0f}"
            f"{1 - a['checkpoint'] / a['plain']:>11.0%}"
        )
    print("\nestimated training batch that fits (fp32, AdamW; see the module docstring for the formula)")
    print(f"{'variant':<8}" + "".join(f"{f'{gb} GB':>22}" for gb in BUDGETS_GB))
    print(f"{'':<8}" + "".join(f"{'plain/me/ckpt/ckpt+me':>22}" for _ in BUDGETS_GB))
    for r in rows:
        f = r["batch_fits"]
        cells = [
            "/".join(str(f[m][gb]) for m in ("plain", "memory_efficient", "checkpoint", "checkpoint+memory_efficient"))
            for gb in BUDGETS_GB
        ]
        print(f"{r['variant']:<8}" + "".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    """Compute the tables (and optionally the measured cross-check)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--measure", action="store_true", help="also measure peak RSS of CPU training steps (B0)")
    args = parser.parse_args(argv)
    common.setup(args)
    names = args.variants or [f"b{i}" for i in range(8)] + ["lite0", "v2_s", "v2_m"]
    rows = [variant_row(n) for n in names]
    print_rows(rows)
    payload: dict[str, Any] = {"budgets_gb": BUDGETS_GB, "overhead_bytes": OVERHEAD, "variants": rows}
    if args.measure:
        payload["measured"] = measured_rows(args)
    common.write_json("memory", args, payload)


if __name__ == "__main__":
    main()
