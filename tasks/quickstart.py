"""``effbackbone quickstart``: generate a small dataset, train U-Net-B0 on it, and show the results.

1. Writes the synthetic shapes dataset (:mod:`tasks.segmentation.synthetic`) to ``data/quickstart`` unless
   it is already there: 160 train and 32 val images of 96x96, plus 4 larger 192x256 images (with
   masks) that are predicted in overlapping tiles.
2. Runs ``fit`` with ``configs/segmentation/quickstart_unet_b0.yaml`` (any further
   ``--trainer.*``/``--model.*``/``--data.*`` argument is passed on), keeping the best and last
   checkpoints and an overlay PNG per validation epoch.
3. Re-validates the best checkpoint, prints its mIoU and per-class IoU, writes mask, overlay and
   panel (image | truth | prediction | errors) PNGs for the larger images, and prints where everything is.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from tasks.segmentation.synthetic import SyntheticMaskSpec, ensure_masks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / "quickstart_unet_b0.yaml"
# The config's data.synthetic holds the same spec (checked by a test), so `effbackbone fit` with the
# config generates the same data. ``large/``: 192x256 images with masks, predicted in tiles.
SPEC = SyntheticMaskSpec(num_train=160, num_val=32, size=96, seed=0, num_large=4)
LARGE_SPEC = SPEC.large_spec()
NUM_LARGE = SPEC.num_large


def prepare_data(root: Path) -> Path:
    """Generate the quickstart dataset under ``root`` if it is missing or stale."""
    return ensure_masks(root, SPEC)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to copy), else as given."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="effbackbone quickstart",
        description="Train U-Net-B0 on a generated dataset in a few CPU minutes, then predict and print where "
        "everything is. Other --trainer.*, --model.* and --data.* arguments go to `effbackbone fit`.",
    )
    parser.add_argument("--root", default="data/quickstart", help="dataset folder (generated if absent)")
    parser.add_argument("--output", default="runs/quickstart", help="logs, checkpoints and predictions")
    parser.add_argument("--config", default=str(CONFIG), help="the fit config")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; returns the process exit code."""
    from tasks.cli import run_cli
    from tasks.common.writers import describe_files
    from tasks.segmentation.predict import predict_folder

    args, extra = _parse(argv)
    root, output = Path(args.root), Path(args.output)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"quickstart config {args.config} not found; run from a clone of the repository "
                                "or pass --config path/to/quickstart_unet_b0.yaml")  # fmt: skip
    start = time.perf_counter()
    prepare_data(root)
    print(f"[quickstart] data: {root} ({SPEC.num_train} train / {SPEC.num_val} val images, {NUM_LARGE} large)")
    cli = run_cli([
        "fit", "--config", args.config, f"--data.root={root}", f"--data.predict_dir={root / 'large' / 'images'}",
        f"--trainer.default_root_dir={output}", f"--trainer.logger.init_args.save_dir={output}", *extra,
    ])  # fmt: skip
    trainer, ckpt = cli.trainer, cli.trainer.checkpoint_callback
    if ckpt is None or not ckpt.best_model_path:
        raise RuntimeError("the quickstart config has no ModelCheckpoint; nothing to report")
    fit_s = time.perf_counter() - start
    best, last = ckpt.best_model_path, ckpt.last_model_path  # before validate() restores the callback's state
    metrics = trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)[0]
    task = cli.model.to(torch.device("cpu"))  # validate() loaded the best weights into it
    log_dir = Path(trainer.log_dir or output)
    predictions = log_dir / "predictions"
    written = predict_folder(task, root / "large" / "images", predictions)
    per_class = "  ".join(f"{n} {metrics[f'val/iou_{n}']:.3f}" for n in task.class_names)
    print(
        f"\n[quickstart] done in {time.perf_counter() - start:.0f} s (training {fit_s:.0f} s, "
        f"{trainer.current_epoch} epoch{'s' if trainer.current_epoch != 1 else ''})\n"
        f"  val mIoU (best checkpoint): {metrics['val/miou']:.3f}   pixel accuracy {metrics['val/pixel_acc']:.3f}\n"
        f"  per-class IoU: {per_class}\n"
        f"  best checkpoint:  {best}\n"
        f"  last checkpoint:  {last}\n"
        f"  metrics (CSV):    {log_dir / 'metrics.csv'}\n"
        f"  training curves:  {log_dir / 'curves.png'}\n"
        f"  val overlays:     {log_dir / 'overlays'} (image | truth | prediction | errors, a PNG per epoch)\n"
        f"  predictions:      {predictions} ({describe_files(written)}; {LARGE_SPEC.size[0]}x"
        f"{LARGE_SPEC.size[1]} images, tiled)\n"
        f"next:\n"
        f"  effbackbone predict --config {_shown(args.config)} --ckpt_path {best} --data.predict_dir <your images>\n"
        f"  effbackbone export --ckpt {best} --output {output / 'model.onnx'}"
    )
    return 0
