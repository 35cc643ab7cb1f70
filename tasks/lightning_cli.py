"""The LightningCLI behind ``effbackbone fit|validate|test|predict`` (the command itself: :mod:`tasks.cli`).

``model.class_path`` and ``data.class_path`` in the YAML choose the task (``tasks.segmentation.SegmentationTask``
+ ``tasks.segmentation.MaskDataModule``, or the detection or instance pair). Properties of the data that the model must
agree with (``num_classes``, ``in_channels``, ``image_size``, ...) are set on the data only and linked into
the model when both classes have them; links whose source or target a class lacks are skipped.

What the CLI adds to Lightning's: a help header that names the tasks and the shipped configs; atomic,
weights-only checkpoints with RNG states; ``last.ckpt`` always the latest state
(:mod:`tasks.common.checkpoints`); training curves after ``fit`` (:mod:`tasks.common.curves`); a model
summary with the FLOPs of one image; ``predict`` without a logger (no new ``lightning_logs/version_N`` per
call; files in ``<default_root_dir>/predictions``); a line saying where each command wrote; and no empty
``version_N`` folder left behind by a run that fails before training.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from tasks.common.checkpoint_io import AtomicCheckpointIO, RngState, safe_torch_load
from tasks.common.checkpoints import ModelCheckpoint
from tasks.common.curves import TrainingCurves
from tasks.common.deploy import file_model_class_path, is_model_file
from tasks.common.summary import ModelSummary

# data attribute -> model init argument, linked after the data module is built.
LINKED = ("num_classes", "class_names", "class_weights", "in_channels", "mode", "mean", "std", "image_size")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Shipped config -> what it trains (tests/tasks/test_cli_help.py checks that every shipped config is here).
SHIPPED_CONFIGS = {
    "segmentation/quickstart_unet_b0.yaml": "U-Net-B0 on synthetic shapes, generated on first use (CPU, ~1.5 min)",
    "segmentation/membrane_unet_b0.yaml": "U-Net-B0 on the ISBI 2012 EM membranes (binary, grayscale)",
    "segmentation/membrane_unet_lite0_pretrained.yaml": "U-Net-Lite0 on the membranes, from Lite0 ImageNet weights",
    "segmentation/quickstart_bifpn_b0.yaml": "BiFPN-B0 (EfficientDet's segmentation variant) on the synthetic shapes",
    "segmentation/membrane_bifpn_b0.yaml": "BiFPN-B0 on the ISBI 2012 EM membranes (binary, grayscale)",
    "detection/quickstart_d0.yaml": "EfficientDet-D0 on synthetic shapes, generated on first use (CPU, ~2 min)",
    "detection/raccoon_d0.yaml": "EfficientDet-D0 on the raccoon dataset (COCO format, one class), from scratch",
    "detection/raccoon_lite0_pretrained.yaml": "EfficientDet-Lite0 on raccoon, fine-tuned from Lite0 ImageNet weights",
    "instance/quickstart_maskrcnn_b0.yaml": "Mask R-CNN on B0 + FPN, synthetic shapes with masks, generated on 1st use",
}
_WHAT = {
    "fit": "Train a task",
    "validate": "Evaluate a checkpoint on the val split",
    "test": "Evaluate a checkpoint on the test split",
    "predict": "Predict a folder of images with a checkpoint",
}


def help_header(subcommand: str) -> str:
    """The text ``effbackbone <subcommand> --help`` starts with: tasks, data modules, class help, configs."""
    ckpt = "" if subcommand == "fit" else " --ckpt_path CKPT"
    configs = "\n".join(f"  configs/{name:38s} {what}" for name, what in SHIPPED_CONFIGS.items())
    return f"""{_WHAT[subcommand]} from a YAML config; any option can be overridden on the command line.

  effbackbone {subcommand} --config configs/segmentation/quickstart_unet_b0.yaml{ckpt}

Tasks (model.class_path) and their data modules (data.class_path):
  segmentation  tasks.segmentation.SegmentationTask + tasks.segmentation.MaskDataModule
                (folders of images and PNG masks; docs/segmentation.md)
  detection     tasks.detection.DetectionTask + tasks.detection.CocoDataModule
                (COCO json + images; docs/detection.md)
  instance      tasks.instance.InstanceTask + tasks.instance.CocoInstanceDataModule
                (COCO json with polygon/RLE masks + images; docs/instance.md)

The options of one class, with their defaults:
  effbackbone {subcommand} --model.help tasks.segmentation.SegmentationTask
  effbackbone {subcommand} --data.help tasks.segmentation.MaskDataModule
  (and tasks.detection.DetectionTask, tasks.detection.CocoDataModule, tasks.instance.InstanceTask,
  tasks.instance.CocoInstanceDataModule)
Print a config with every default filled in: effbackbone {subcommand} --config <yaml> --print_config

Shipped configs:
{configs}

Lightning's options for every part follow (--trainer.*, --model.*, --data.*)."""


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the header's line breaks and indentation."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return argparse.RawDescriptionHelpFormatter._fill_text(self, text, width, indent)  # type: ignore[arg-type]


def _subcommand_parser_kwargs() -> dict[str, Any]:
    return {
        name: {
            "description": help_header(name),
            "usage": f"effbackbone {name} --config CONFIG.yaml [--trainer.* ...] [--model.* ...] [--data.* ...]"
            + ("" if name == "fit" else " --ckpt_path CKPT"),
        }
        for name in _WHAT
    }


def _remove_if_empty(folder: Path) -> None:
    """Delete ``folder`` if it holds no file but LightningCLI's ``config.yaml`` and ``hparams.yaml``."""
    if folder.is_dir() and all(p.name in ("config.yaml", "hparams.yaml") for p in folder.rglob("*") if p.is_file()):
        shutil.rmtree(folder)


def _missing_parts(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


class EffBackboneCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for model and data, with the data -> model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link each ``LINKED`` data attribute to the model argument of the same name."""
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:  # noqa: ANN401 - Trainer arguments
        """The trainer, with this project's checkpointing, summary, curves and logging rules.

        Every checkpoint is written atomically and read with ``weights_only=True`` (also when the YAML names
        no plugin) and carries the RNG states. ``predict`` runs without a logger.
        """
        if self.subcommand == "predict":
            kwargs["logger"] = False  # predict logs nothing; a logger would only add a version_N folder
        trainer = super().instantiate_trainer(**kwargs)
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(c, RngState) for c in trainer.callbacks):  # RNG states in checkpoints, for resume
            trainer.callbacks.append(RngState())
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) is LightningModelCheckpoint:
                callback.__class__ = ModelCheckpoint  # same state, plus last.ckpt at every epoch end
            elif type(callback) in (LightningModelSummary, RichModelSummary):
                trainer.callbacks[i] = ModelSummary(max_depth=callback._max_depth)
        if not any(isinstance(c, TrainingCurves) for c in trainer.callbacks):  # acts in fit only
            trainer.callbacks.append(TrainingCurves())
        if self.subcommand == "predict":  # the command line says it all; no config.yaml among the predictions
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Refuse an unsafe ``--ckpt_path`` with a message naming it, before Lightning reads its hparams.

        Lightning reads it with ``weights_only=True`` too, but its error names neither the file nor the fix.
        Model options given on the command line then override the checkpoint's hyper-parameters. An ONNX file
        of ``export`` or ``quantize`` in its place predicts through its task's file model (:meth:`_use_model_file`).
        """
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and is_model_file(ckpt):
            self._use_model_file(sub, ckpt)
            return
        if ckpt and Path(ckpt).is_file():
            safe_torch_load(ckpt)
        init_args = self.config[sub].get("model.init_args") if sub else None
        given = {name: init_args.get(name) for name in _model_options(self._args)} if init_args else {}
        super()._parse_ckpt_path()
        # Lightning applies the checkpoint's hyper-parameters over everything; an option typed on the command
        # line (`--model.init_args.ema_decay null`) is the user's explicit choice, so it wins.
        model = self.config[sub].get("model") if sub else None
        for name, value in given.items():
            (model.get("dict_kwargs") or {}).pop(name, None)
            if model.get("init_args") is not None:
                model.init_args[name] = value

    def _use_model_file(self, subcommand: str, path: str) -> None:
        """Predict with the model file at ``path``: its task's file model replaces the config's model.

        The file runs on the CPU with ONNX Runtime, so the trainer is set to one CPU device in full precision
        (the config's accelerator, devices, strategy and precision are for the PyTorch model).
        """
        if subcommand != "predict":
            raise ValueError(
                f"{subcommand} needs a Lightning checkpoint; {path} is a model file: pass the .ckpt it was made from "
                "(`effbackbone quantize` prints the val metrics of both), or run the file with `effbackbone predict`"
            )
        config = self.config[subcommand]
        config.ckpt_path = None
        model_class = file_model_class_path(path, (config.get("model") or {}).get("class_path"))
        config.model = Namespace(class_path=model_class, init_args=Namespace(file=str(path)))
        for key, value in {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}.items():
            config.trainer[key] = value

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` into ``self.config``.

        Lightning warns when ``args`` is given while ``sys.argv`` has arguments too; ``main`` always
        passes the arguments explicitly (it reads ``sys.argv`` itself), so that warning is skipped.
        """
        self._args = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; if it fails, remove the log folders it created while they are still empty."""
        fresh = [p for d in self._log_dirs() for p in _missing_parts(d)] if self.trainer.is_global_zero else []
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            for folder in fresh:  # deepest first: version_N, then lightning_logs, ...
                _remove_if_empty(folder)
            raise

    def _log_dirs(self) -> list[Path]:
        return [Path(d) for d in (getattr(lg, "log_dir", None) for lg in self.trainer.loggers) if d]

    def _metrics_files(self) -> str:
        files = []
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                files.append(str(Path(logger.log_dir) / "metrics.csv"))
            elif getattr(logger, "log_dir", None):
                files.append(f"{logger.log_dir} ({type(logger).__name__})")
        return ", ".join(files) or "none written (no logger configured)"

    def after_fit(self) -> None:
        """Print where the checkpoints and the metrics are."""
        if not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        for ckpt in (c for c in self.trainer.callbacks if isinstance(c, LightningModelCheckpoint)):
            named = [f"best {Path(ckpt.best_model_path).name}" if ckpt.best_model_path else "",
                     f"last {Path(ckpt.last_model_path).name}" if ckpt.last_model_path else ""]  # fmt: skip
            print(f"checkpoints: {ckpt.dirpath} ({', '.join(n for n in named if n) or 'none saved'})")
        print(f"metrics: {self._metrics_files()}")

    def after_validate(self) -> None:
        """Print where the metrics went."""
        if self.trainer.is_global_zero:
            print(f"metrics: {self._metrics_files()}")

    after_test = after_validate


def _model_options(args: list[str]) -> set[str]:
    """Names of the model options given on the command line (``--model.init_args.X`` or ``--model.X``)."""
    names = set()
    for arg in args:
        if arg.startswith("--model."):
            name = arg[len("--model.") :].split("=", 1)[0].removeprefix("init_args.").split(".", 1)[0]
            if name not in ("class_path", "init_args", "dict_kwargs", "help", ""):
                names.add(name)
    return names


def run_cli(args: list[str] | None = None, run: bool = True) -> EffBackboneCLI:
    """Build (and by default run) the CLI on ``args`` (``sys.argv[1:]`` when ``None``)."""
    return EffBackboneCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Subcommand parsers take the main parser's formatter (jsonargparse).
        parser_kwargs={"prog": "effbackbone", "formatter_class": _HelpFormatter, **_subcommand_parser_kwargs()},
        args=args,
        run=run,
    )
