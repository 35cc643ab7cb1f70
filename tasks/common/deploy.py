"""What both tasks share to ship a trained model as a file (ONNX, or OpenVINO IR) and to run that file again.

A file written by ``effbackbone export`` or ``effbackbone quantize`` carries, besides the entries of
:mod:`effbackbone.runtime` (``kind``, ``input`` rules, ``outputs``), an ``effbackbone.task`` entry: the task
(``segmentation`` or ``detection``) and what its prediction needs (class names, category ids, mean/std, tile
size, EfficientDet's anchor settings, ...), written by each task's ``deploy`` module. ``effbackbone predict
--ckpt_path model.onnx`` (or ``model.xml``) reads it to pick the task's file model (:data:`FILE_MODELS`).

Also here: the data module of a config (what ``quantize`` calibrates and validates on), the check that a config
and a model agree, progress bars, and the float-vs-int8 table.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch.nn.functional as F
from torch import Tensor

from effbackbone.export import _require
from effbackbone.runtime import FILE_RUNTIMES, load_runtime_file, read_metadata, runtime_of

TASK_KEY = "task"
MODEL_FILE_SUFFIXES = tuple(FILE_RUNTIMES)  # ONNX; OpenVINO IR (its .bin lies next to it)
# Task name in a file's metadata -> "module:class" of the LightningModule that predicts with the file.
FILE_MODELS = {
    "segmentation": "tasks.segmentation.deploy:SegmentationFileModel",
    "detection": "tasks.detection.deploy:DetectionFileModel",
}
# Task name in a file's metadata -> the task class (the model class of its configs).
TASK_CLASSES = {"segmentation": "SegmentationTask", "detection": "DetectionTask"}
# Where fit keeps the config a model was trained with (LightningCLI's SaveConfigCallback), for the fix lines.
TRAINED_CONFIG = "the config.yaml that fit saved in the run's log folder"
T = TypeVar("T")


def is_model_file(path: str | Path) -> bool:
    """Whether ``path`` names a model file (ONNX, OpenVINO ``.xml``) by its suffix, not a Lightning checkpoint."""
    return Path(path).suffix.lower() in MODEL_FILE_SUFFIXES


MADE_BY = "`effbackbone export` or `effbackbone quantize`"


def read_task_entry(path: str | Path) -> dict[str, Any]:
    """The ``effbackbone.task`` entry of an ONNX or OpenVINO file, with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no model file at {path}; pass the .onnx (or OpenVINO .xml) file that {MADE_BY} wrote, or a Lightning "
            "checkpoint (.ckpt)"
        )
    if runtime_of(path) == "openvino":
        from effbackbone.ov_runtime import read_ir_metadata

        entries = read_ir_metadata(path)  # its errors name the file
    else:
        onnx = _require("onnx")  # names the extra to install (deploy) when it is missing
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError and friends from protobuf
            raise ValueError(f"{path} is not an ONNX file ({type(e).__name__}: {e}); pass an .onnx file from "
                             f"{MADE_BY}, or a .ckpt checkpoint") from e  # fmt: skip
        entries = read_metadata(proto)
    entry = entries.get(TASK_KEY)
    if not isinstance(entry, dict) or entry.get("name") not in FILE_MODELS:
        raise ValueError(
            f"{path} has no effbackbone task metadata (class names, normalisation, ...), so predict cannot run it; "
            "write it with `effbackbone export --ckpt <ckpt> --output <file>.onnx` or `effbackbone quantize --config "
            "<yaml> --ckpt <ckpt> --output <file>.onnx` (or <file>.xml for OpenVINO)"
        )
    return entry


def file_model_class_path(path: str | Path, config_class: str | None = None) -> str:
    """``module.Class`` of the LightningModule that predicts with the model file at ``path``.

    Raises:
        ValueError: ``config_class`` (the config's model class path) is not the task the file was made from.
    """
    task = read_task_entry(path)["name"]
    if config_class is not None and config_class.rpartition(".")[2] != TASK_CLASSES[task]:
        raise ValueError(f"{path} is a {task} model but the config's model is a {config_class}; pass a {task} "
                         f"config (the one the model was trained with: {TRAINED_CONFIG})")  # fmt: skip
    module, _, name = FILE_MODELS[task].partition(":")
    return f"{module}.{name}"


class TaskModel:
    """A task's model file, ONNX (run by ONNX Runtime) or OpenVINO IR, with its task entry.

    Called like the float network. The ONNX input is the file's own first input: ``image`` in files from
    ``effbackbone export`` (segmentation), ``input`` in those written by :mod:`effbackbone.runtime` and
    :mod:`effbackbone.quantize`.

    Attributes:
        task: The file's ``effbackbone.task`` entry.
        path: The file.
        runtime: The :class:`~effbackbone.runtime.OnnxModel` or :class:`~effbackbone.ov_runtime.OpenVinoModel`.
        metadata: The file's ``effbackbone`` entries.
    """

    def __init__(self, path: str | Path, *, num_threads: int | None = None) -> None:
        self.task = read_task_entry(path)
        self.path = Path(path)
        self.runtime = load_runtime_file(self.path, num_threads=num_threads)
        self.metadata: dict[str, Any] = self.runtime.metadata

    def __call__(self, x: Tensor) -> Any:  # noqa: ANN401 - the float model's kind of output
        """Run a batch ``(N, C, H, W)``; returns the float model's kind of output as CPU float tensors."""
        return self.runtime(x, f"input of {self.path.name}")


def pad_to_multiple(images: Tensor, divisor: int) -> Tensor:
    """Pad ``(N, C, H, W)`` at the bottom/right to multiples of ``divisor`` with zeros (the mean, once normalised)."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % divisor, 0, -h % divisor))


# -- configs ------------------------------------------------------------------------------------------


def data_from_config(config: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, str | None]:
    """The data module of a LightningCLI YAML config (with ``--data.*`` overrides) and its model's class path.

    Only the ``data`` section is instantiated (the model comes from the checkpoint), the way ``effbackbone fit``
    builds it: the same class, arguments and overrides.

    Raises:
        FileNotFoundError: No such config.
        ValueError: The config has no ``data`` section, or the section or an override is invalid.
    """
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config not found: {config}; pass the YAML the model was trained with "
                                f"({TRAINED_CONFIG}, or the shipped one under configs/)")  # fmt: skip
    raw = yaml.safe_load(config.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise ValueError(f"{config} has no data section (data: class_path, init_args); pass the training config "
                         f"of the model ({TRAINED_CONFIG})")  # fmt: skip
    bad = [a for a in overrides if a.startswith("--") and not a.startswith("--data.")]  # values may follow options
    if bad:
        raise ValueError(f"unknown option(s) {' '.join(bad)}; only --data.* options override the config")
    parser = ArgumentParser(exit_on_error=False, prog="effbackbone")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True, fail_untyped=False)
    try:
        parsed = parser.parse_args(["--data", json.dumps(raw["data"]), *overrides])
    except Exception as e:  # jsonargparse's ArgumentError: its text names the option and why
        raise ValueError(f"the data section of {config} (with {' '.join(overrides) or 'no overrides'}): {e}") from e
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    model = raw.get("model")
    return instantiate(parsed).data, model.get("class_path") if isinstance(model, dict) else None


def _same(a: Any, b: Any) -> bool:  # noqa: ANN401
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_agree(model: Mapping[str, Any], data: Mapping[str, Any], model_source: str, data_source: str) -> None:
    """Raise ``ValueError`` listing every key whose value differs between the model and the data.

    Keys given as ``None`` on either side are not compared (unknown there).
    """
    known = [k for k in data if k in model and data[k] is not None and model[k] is not None]
    diffs = [f"{k} {data[k]} (data) vs {model[k]} (model)" for k in known if not _same(data[k], model[k])]
    if diffs:
        raise ValueError(
            f"{data_source} and {model_source} disagree: {'; '.join(diffs)}. Use the config the model was trained "
            f"with ({TRAINED_CONFIG}) and the data it was trained on"
        )


# -- reporting -----------------------------------------------------------------------------------------


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a progress bar on stderr when it is a terminal (nothing in logs and pipes)."""
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, disable=None, dynamic_ncols=True)


def side_by_side(rows: Sequence[tuple[str, float, float]], left: str, right: str) -> str:
    """A table of ``(metric, left value, right value)`` with the difference right - left."""
    width = max(len(name) for name, _, _ in rows) if rows else 6
    lines = [f"{'metric':{width}s}  {left:>10s}  {right:>10s}  {'difference':>10s}"]
    for name, a, b in rows:
        diff = "" if math.isnan(a) or math.isnan(b) else f"{b - a:+.4f}"
        lines.append(f"{name:{width}s}  {a:10.4f}  {b:10.4f}  {diff:>10s}")
    return "\n".join(lines)


__all__ = [
    "FILE_MODELS",
    "TASK_CLASSES",
    "TASK_KEY",
    "TaskModel",
    "check_agree",
    "data_from_config",
    "file_model_class_path",
    "is_model_file",
    "pad_to_multiple",
    "progress",
    "read_task_entry",
    "side_by_side",
]
