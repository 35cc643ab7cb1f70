"""The model summary printed at the start of ``fit``: modules and parameters, and the FLOPs of one image.

Lightning's table has a per-module FLOPs column, filled only for modules its counter sees called by
name; a task whose ``forward`` runs a helper around its network (EfficientDet's predictor) would show
0 there. This summary keeps the columns that are always right and gives the total on its own line,
counted on :attr:`~tasks.common.base.BaseTask.example_input_array` (one blank image at the data's size).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info

KEPT_COLUMNS = (" ", "Name", "Type", "Params", "Mode")


class ModelSummary(LightningModelSummary):
    """Lightning's plain-text ``ModelSummary`` without the per-module FLOPs and size columns.

    Args:
        max_depth: Module depth shown (1: the task's direct children).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self._input_shape: tuple[int, ...] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note the example input's shape, then summarise."""
        example = pl_module.example_input_array
        self._input_shape = tuple(example.shape) if hasattr(example, "shape") else None
        super().on_fit_start(trainer, pl_module)

    def summarize(  # type: ignore[override] - an instance method (Lightning's is static)
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,  # noqa: ANN401
    ) -> None:
        """Log the table (rank 0), ending with the FLOPs of one forward when they were counted."""
        columns = [c for c in summary_data if c[0] in KEPT_COLUMNS]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns).splitlines()  # fmt: skip
        table = [line for line in table if not line.rstrip().endswith("Total Flops")]
        if total_flops and self._input_shape:
            shape = "x".join(str(s) for s in self._input_shape[1:])
            table.append(f"{get_human_readable_count(total_flops):<10}FLOPs of one forward ({shape} input)")
        rank_zero_info("\n" + "\n".join(table))
