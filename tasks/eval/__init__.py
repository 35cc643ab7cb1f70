"""Evaluation helpers for the tasks (pure functions, no Lightning)."""

from tasks.eval.coco import COCO_METRICS, coco_map, to_coco_results

__all__ = ["COCO_METRICS", "coco_map", "to_coco_results"]
