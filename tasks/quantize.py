"""``effbackbone quantize --config <yaml> --ckpt <ckpt> --output model_int8.onnx``: a trained task to int8.

Loads the task from its checkpoint, calibrates :func:`effbackbone.quantize.quantize_int8` on the task's own
training images, through the validation transform, writes the int8 file (``.onnx``: ONNX Runtime static QDQ;
``.xml``: OpenVINO + NNCF, faster on x86 CPUs for SiLU models, docs/deploy.md) with the
metadata ``effbackbone predict --ckpt_path <file>`` needs, validates the float model and the int8 file on the val
split and prints their metrics side by side (segmentation: mIoU and per-class IoU; detection: COCO AP, AP50 and
per-class AP). The config gives the data (``--data.*`` options override it, as for ``fit``); the checkpoint
gives the model. Each task's steps are in its ``deploy`` module (:data:`DEPLOY`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor

from effbackbone.runtime import FILE_RUNTIMES
from tasks.common.deploy import data_from_config, progress, side_by_side
from tasks.export import load_task

# Task class name -> its deploy module (imported only when used).
DEPLOY = {"SegmentationTask": "tasks.segmentation.deploy", "DetectionTask": "tasks.detection.deploy"}
METHODS = ("minmax", "percentile", "entropy")
# The output file's suffix picks the backend (its format).
BACKENDS = FILE_RUNTIMES


def deploy_module(task: Any) -> ModuleType | None:  # noqa: ANN401 - any LightningModule
    """The deploy module of ``task``'s class (or of a base class), ``None`` when it has none."""
    import importlib

    for cls in type(task).__mro__:
        if cls.__name__ in DEPLOY:
            return importlib.import_module(DEPLOY[cls.__name__])
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effbackbone quantize", description=__doc__.splitlines()[0],
        epilog="Options --data.* (e.g. --data.init_args.root=my_data) override the config's data section.",
    )  # fmt: skip
    parser.add_argument("--config", required=True, help="the YAML the model was trained with (its data section)")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (best.ckpt / last.ckpt)")
    parser.add_argument(
        "--output", required=True,
        help="destination int8 file: .onnx (ONNX Runtime) or .xml (OpenVINO, with a .bin next to it)",
    )  # fmt: skip
    parser.add_argument(
        "--calibration-batches",
        type=int,
        default=8,
        help="training batches (of the config's batch size) to calibrate on (default 8)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="minmax",
        help="activation ranges from the calibration (default minmax; docs/deploy.md); ONNX Runtime only",
    )
    parser.add_argument(
        "--val-batches",
        type=int,
        default=None,
        help="validate on at most this many val batches (default: the whole val split)",
    )
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: physical cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``effbackbone quantize --config YAML --ckpt CKPT --output FILE [--calibration-batches N] [--data.* ...]``."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    for name, value in (("--calibration-batches", args.calibration_batches), ("--val-batches", args.val_batches)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    suffix = Path(args.output).suffix.lower()
    if suffix not in BACKENDS:
        parser.error(f"--output {args.output}: name the int8 file <something>.onnx (ONNX Runtime, runs anywhere) or "
                     "<something>.xml (OpenVINO, fastest on x86 CPUs for SiLU models)")  # fmt: skip
    if BACKENDS[suffix] == "openvino" and args.method != "minmax":
        parser.error(f"--method {args.method} is an ONNX Runtime option; OpenVINO (--output {args.output}) calibrates "
                     "with min/max. Leave --method out, or write a .onnx file")  # fmt: skip
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint not found: {args.ckpt}; pass the .ckpt that `effbackbone fit` wrote (fit "
                     "prints its folder: 'checkpoints: <folder>')")  # fmt: skip
    try:  # every mistake in the inputs is reported here, before the minutes of quantization
        if BACKENDS[suffix] == "openvino":
            from effbackbone.ov_runtime import check_installed

            check_installed()
        dm, config_class = data_from_config(args.config, rest)
        task = load_task(args.ckpt)
        deploy = deploy_module(task)
        if deploy is None:
            raise ValueError(f"{args.ckpt} holds a {type(task).__name__}, which has no int8 path")
        if config_class is not None and config_class.rpartition(".")[2] != type(task).__name__:
            raise ValueError(f"{args.config} configures a {config_class} but {args.ckpt} holds a "
                             f"{type(task).__name__}; pass the config the checkpoint was trained with")  # fmt: skip
        meta = deploy.task_metadata(task)
        deploy.check_data(meta, dm, str(args.ckpt), str(args.config))
        batches = deploy.calibration_images(dm, meta, args.calibration_batches)
        calibration = list(progress(batches, "reading calibration images", args.calibration_batches))
    except (FileNotFoundError, ValueError, ImportError) as e:
        parser.error(str(e))
    return run(args, task, deploy, meta, dm, calibration)


def run(
    args: argparse.Namespace, task: Any, deploy: ModuleType, meta: dict[str, Any], dm: Any, calibration: list[Tensor]
) -> int:  # noqa: ANN401
    """Quantize, write, validate both models and print the comparison."""
    from effbackbone.quantize import quantize_int8

    output = Path(args.output)
    backend = BACKENDS[output.suffix.lower()]
    images = sum(len(batch) for batch in calibration)
    took = (
        "ONNX Runtime's quantizer takes about 30 s for a U-Net-B0 and 1-2 min for an EfficientDet-D0"
        if backend == "onnxruntime"
        else "OpenVINO's NNCF takes about 10-20 s for a U-Net-B0 or an EfficientDet-D0"
    )
    print(f"quantize: calibrating on {images} training images of {dm.root} ({len(calibration)} batches); {took} "
          "on a busy 2-core CPU")  # fmt: skip
    started = time.perf_counter()
    metadata = {"task": meta, "source": {"checkpoint": Path(args.ckpt).name}}
    int8 = quantize_int8(
        deploy.network(task), calibration, output_path=output,
        method=args.method, mean=meta["mean"], std=meta["std"], metadata=metadata, num_threads=args.threads,
        backend=backend,
    )  # fmt: skip
    print(f"quantize: int8 model written in {time.perf_counter() - started:.0f} s")
    file_model = deploy.FILE_MODEL(str(output), num_threads=args.threads)  # what predict runs the file with
    float_metrics = deploy.evaluate(task, dm, meta, args.val_batches, "validating float32")
    int8_metrics = deploy.evaluate(file_model, dm, meta, args.val_batches, "validating int8")
    limit = "" if args.val_batches is None else f", first {args.val_batches} batches"
    print(f"validation ({dm.root}, val split{limit}): float32 = {Path(args.ckpt).name}, int8 = {output.name}")
    print(side_by_side(deploy.report_rows(float_metrics, int8_metrics, meta), "float32", "int8"))
    weights = sum(p.numel() * 4 for p in deploy.network(task).parameters()) / 1e6
    written = f"{output} and {output.with_suffix('.bin').name}" if backend == "openvino" else str(output)
    print(f"quantize: {written} ({int8.size_bytes / 1e6:.1f} MB int8; the float32 weights are {weights:.1f} MB). "
          f"Predict with it: effbackbone predict --config {args.config} --ckpt_path {output}")  # fmt: skip
    return 0
