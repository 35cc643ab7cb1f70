"""Training curves: at the end of ``fit``, a PNG of the losses and the main metric per epoch.

Written beside the metrics CSV (``<log dir>/curves.png``) for users who do not run TensorBoard, and its
path printed. The ``effbackbone`` CLI adds :class:`TrainingCurves` to every ``fit``. The history is part
of the callback's checkpoint state, so a resumed run draws every epoch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from tasks.common.writers import run_subdir


def _scalars(metrics: dict[str, Any], prefixes: tuple[str, ...] = ("train/", "val/")) -> dict[str, float]:
    """Epoch-level scalar metrics (``_epoch`` suffix dropped, ``_step`` values left out)."""
    out = {}
    for name, value in metrics.items():
        if not name.startswith(prefixes) or name.endswith("_step"):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[name.removesuffix("_epoch")] = number
    return out


def main_metric(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """The metric the run is judged by: the checkpoint's ``monitor``, else the task's, else ``val/loss``."""
    monitor = getattr(trainer.checkpoint_callback, "monitor", None)
    return str(monitor or getattr(pl_module, "monitor", None) or "val/loss")


class TrainingCurves(Callback):
    """Plot the losses and the main metric per epoch at the end of ``fit`` (``<log dir>/curves.png``).

    Args:
        filename: Name of the PNG in the run's log folder.
    """

    def __init__(self, filename: str = "curves.png") -> None:
        super().__init__()
        self.filename = filename
        self.history: dict[int, dict[str, float]] = {}
        self.last_path: Path | None = None

    def _record(self, trainer: L.Trainer, epoch: int) -> None:
        values = _scalars(trainer.callback_metrics)
        if values:
            self.history[epoch] = {**self.history.get(epoch, {}), **values}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the previous epoch (its training metrics are reduced only after its last hook)."""
        if trainer.current_epoch > 0:
            self._record(trainer, trainer.current_epoch - 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the last epoch, draw the PNG (rank 0) and print its path."""
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._record(trainer, max(trainer.current_epoch - 1, 0))  # current_epoch has moved past the last one
        path = run_subdir(trainer, self.filename)  # on every rank: trainer.log_dir is a collective under DDP
        if not trainer.is_global_zero or not self.history:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(self.history, main_metric(trainer, pl_module), path)
        self.last_path = path
        print(f"training curves: {path}")

    def state_dict(self) -> dict[str, Any]:
        """The per-epoch history (plain floats: weights-only loadable)."""
        return {"history": {int(k): dict(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the history of the run being resumed."""
        self.history = {int(k): dict(v) for k, v in state_dict.get("history", {}).items()}


def plot_curves(history: dict[int, dict[str, float]], metric: str, path: str | Path) -> Path:
    """Two panels: every ``*loss*`` series, and ``metric`` with its training counterpart; best epoch marked.

    Args:
        history: Epoch -> metric name -> value.
        metric: The main metric (``val/miou``, ``val/AP``, ...).
        path: Destination PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = sorted(history)
    names = sorted({n for values in history.values() for n in values})

    def series(name: str) -> tuple[list[int], list[float]]:
        points = [(e, history[e][name]) for e in epochs if name in history[e] and math.isfinite(history[e][name])]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    losses, scores = figure.subplots(1, 2)
    for name in (n for n in names if "loss" in n.split("/", 1)[-1]):
        main = name.split("/", 1)[-1] == "loss"
        x, y = series(name)
        losses.plot(x, y, marker="o" if main else None, linewidth=2 if main else 1, alpha=1 if main else 0.6,
                    linestyle="-" if name.startswith("val/") else "--", label=name)  # fmt: skip
    losses.set(title="losses", xlabel="epoch")
    _metric_panel(scores, series, metric, names)
    for axes in (losses, scores):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
        if axes.has_data():
            axes.legend(fontsize=8)
    figure.savefig(path)
    return Path(path)


def _metric_panel(axes: Any, series: Any, metric: str, names: list[str]) -> None:  # noqa: ANN401 - matplotlib
    """``metric`` (and ``train/`` of the same name) per epoch, its best epoch marked."""
    train = "train/" + metric.split("/", 1)[-1]
    for name in (metric, train):
        if name in names:
            x, y = series(name)
            axes.plot(x, y, marker="o" if name == metric else None, linestyle="-" if name == metric else "--",
                      label=name)  # fmt: skip
    x, y = series(metric) if metric in names else ([], [])
    if y:
        best = max(range(len(y)), key=y.__getitem__) if "loss" not in metric else min(range(len(y)), key=y.__getitem__)
        axes.annotate(f"best {y[best]:.3f} (epoch {x[best]})", (x[best], y[best]), textcoords="offset points",
                      xytext=(0, 8), ha="center", fontsize=8)  # fmt: skip
    axes.set(title=metric, xlabel="epoch")
