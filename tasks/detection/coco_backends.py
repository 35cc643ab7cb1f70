"""Which COCOeval runs: faster-coco-eval (C++, the default when installed) or pycocotools.

faster-coco-eval (``pip install faster-coco-eval``) ports ``COCOeval.evaluate``/``accumulate`` to C++ and gives the
same numbers: all 12 ``stats`` equal pycocotools' on the same inputs, crowd regions, empty images, images without
detections and sparse category ids included (bitwise; where detections tie in score, to the last bit of a double,
1e-16 relative: ``tests/tasks/test_coco_backends.py``), and it is several times faster on large sets
(``benchmarks/bench_cocoeval.py``, docs/detection.md). pycocotools stays the fallback when it is not installed, and
either can be chosen by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pycocotools.coco import COCO

CocoBackend = Literal["auto", "faster-coco-eval", "pycocotools"]
BACKENDS = ("auto", "faster-coco-eval", "pycocotools")
# faster-coco-eval's own index of a ground truth, built once per pycocotools COCO (validation reuses the same one).
_FASTER_GT: weakref.WeakKeyDictionary[COCO, tuple[int, Any]] = weakref.WeakKeyDictionary()


def resolve_backend(backend: str = "auto") -> str:
    """``"auto"`` -> ``"faster-coco-eval"`` when it is installed, else ``"pycocotools"``; names are checked."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    installed = importlib.util.find_spec("faster_coco_eval") is not None
    if backend == "auto":
        return "faster-coco-eval" if installed else "pycocotools"
    if backend == "faster-coco-eval" and not installed:
        raise ImportError(
            "coco_eval_backend='faster-coco-eval' needs the package: pip install faster-coco-eval "
            "(or choose 'pycocotools' or 'auto')"
        )
    return backend


def _faster_gt(coco_gt: COCO) -> Any:
    """faster-coco-eval's ``COCO`` over the same dataset dict (indexed once per ground truth object)."""
    import faster_coco_eval

    if isinstance(coco_gt, faster_coco_eval.COCO):
        return coco_gt
    cached = _FASTER_GT.get(coco_gt)
    if cached is not None and cached[0] == id(coco_gt.dataset):
        return cached[1]
    gt = faster_coco_eval.COCO(coco_gt.dataset)  # shallow: the image and annotation dicts are shared, not copied
    _FASTER_GT[coco_gt] = (id(coco_gt.dataset), gt)
    return gt


def run_cocoeval(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], iou_type: str = "bbox",
    backend: str = "auto",
) -> Any:  # fmt: skip
    """A ``COCOeval`` of ``results`` on ``image_ids``, evaluated, accumulated and summarized (nothing printed).

    Args:
        coco_gt: Ground truth (pycocotools ``COCO``; a faster-coco-eval ``COCO`` works for that backend).
        results: Non-empty COCO results dicts; not modified (the evaluators add keys to a copy).
        image_ids: The images to evaluate.
        iou_type: ``bbox`` or ``segm``.
        backend: ``auto``, ``faster-coco-eval`` or ``pycocotools`` (:func:`resolve_backend`).

    Returns:
        The evaluator: ``stats`` (12 numbers, pycocotools' order), ``params`` and ``eval["precision"]`` read the
        same for both backends.
    """
    # loadRes adds keys (area, id, segmentation) to the dicts it is given: copy them (shallow; values untouched).
    copied = [dict(r) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        if resolve_backend(backend) == "faster-coco-eval":
            from faster_coco_eval import COCOeval_faster

            gt = _faster_gt(coco_gt)
            evaluator = COCOeval_faster(gt, gt.loadRes(copied), iouType=iou_type, print_function=_silent)
        else:
            from pycocotools.cocoeval import COCOeval

            evaluator = COCOeval(coco_gt, coco_gt.loadRes(copied), iouType=iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _silent(*_args: object) -> None:
    """faster-coco-eval's ``print_function``: say nothing."""


__all__ = ["BACKENDS", "CocoBackend", "resolve_backend", "run_cocoeval"]
