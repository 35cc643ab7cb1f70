"""The LightningCLI behind ``effbackbone fit|validate|test|predict`` (the command itself: :mod:`tasks.cli`).

``model.class_path`` and ``data.class_path`` in the YAML choose the task (``tasks.segmentation.SegmentationTask``
+ ``tasks.segmentation.MaskDataModule``, or the detection pair). Properties of the data that the model must
agree with (``num_classes``, ``in_channels``, ``image_size``, ...) are set on the data only and linked into
the model when both classes have them; links whose source or target a class lacks are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from tasks.common.checkpoint_io import AtomicCheckpointIO, RngState, safe_torch_load

# data attribute -> model init argument, linked after the data module is built.
LINKED = ("num_classes", "class_names", "class_weights", "in_channels", "mode", "mean", "std", "image_size")


class EffBackboneCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for model and data, with the data -> model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link each ``LINKED`` data attribute to the model argument of the same name."""
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: object) -> Trainer:
        """The trainer, with :class:`~tasks.common.checkpoint_io.AtomicCheckpointIO` unless the config set one.

        Every checkpoint is then written atomically and read with ``weights_only=True``, also when the
        YAML names no plugin.
        """
        trainer = super().instantiate_trainer(**kwargs)
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(c, RngState) for c in trainer.callbacks):  # RNG states in checkpoints, for resume
            trainer.callbacks.append(RngState())
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Refuse an unsafe ``--ckpt_path`` with a message naming it, before Lightning reads its hparams.

        Lightning reads it with ``weights_only=True`` too, but its error names neither the file nor the fix.
        Model options given on the command line then override the checkpoint's hyper-parameters.
        """
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
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

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` into ``self.config``.

        Lightning warns when ``args`` is given while ``sys.argv`` has arguments too; ``main`` always
        passes the arguments explicitly (it reads ``sys.argv`` itself), so that warning is skipped.
        """
        self._args = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)


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
        args=args,
        run=run,
    )
