"""The class set of a segmentation dataset: ``classes.json`` and the data options, made consistent once.

What it settles, with errors that name both values and the fix:

- **The ignored value is not a class.** Many datasets list their void label among the names (CamVid-style
  ``[..., "unlabelled"]`` with ``ignore_index`` the last id). That name, and its entry in ``class_weights``,
  is dropped, so ``num_classes`` counts the trained classes only.
- **``num_classes`` and the names agree**, also when ``num_classes`` is overridden on the command line.
- **``class_weights``** come from the data options or ``classes.json`` and have one value per class.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASSES_JSON = "classes.json"


@dataclass(frozen=True)
class ClassSet:
    """Resolved classes: their count, names, optional loss weights, and the ignored mask value."""

    num_classes: int
    names: tuple[str, ...]
    weights: tuple[float, ...] | None
    ignore_index: int | None


def read_classes_json(root: str | Path) -> dict[str, Any]:
    """``<root>/classes.json`` as a dict (``{}`` when absent); invalid json is an error naming the file."""
    path = Path(root) / CLASSES_JSON
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid json ({e}); fix or delete it") from e
    if not isinstance(meta, dict):
        raise ValueError(f'{path} holds a {type(meta).__name__}; expected {{"classes": [...], ...}}')
    return meta


def check_class_weights(weights: Sequence[float] | None, num_classes: int, mode: str, source: str = "") -> None:
    """Raise ``ValueError`` unless ``weights`` has one finite, non-negative value per class (not all zero).

    Args:
        weights: The per-class loss weights, or ``None``.
        num_classes: Classes of the model.
        mode: ``binary`` has one output channel, so per-class weights do not apply.
        source: Where the weights came from, for the message (``" (from data/classes.json)"``).
    """
    if weights is None:
        return
    if mode == "binary":
        raise ValueError(
            f"class_weights{source} is not supported with mode='binary' (one output channel); use "
            "mode='multiclass' with num_classes=2 to weight background and foreground"
        )
    values = list(weights)
    if len(values) != num_classes:
        raise ValueError(
            f"class_weights{source} has {len(values)} values but num_classes={num_classes}; give one weight per "
            "class, in class-id order"
        )
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise ValueError(f"class_weights{source} must be finite numbers >= 0, not all zero; got {values}")


def resolve_classes(
    root: str | Path,
    meta: Mapping[str, Any],
    *,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    class_weights: Sequence[float] | None,
    ignore_index: int | None,
    mode: str,
) -> ClassSet:
    """Combine the data options with ``classes.json`` (``meta``); options win, the file fills the rest.

    Args:
        root: The dataset folder (for messages).
        meta: ``classes.json`` (``classes``, ``num_classes``, ``ignore_index``, ``class_weights``, ``colors``).
        num_classes: The ``num_classes`` option (``None``: from the names or the file).
        class_names: The ``class_names`` option.
        class_weights: The ``class_weights`` option.
        ignore_index: The ``ignore_index`` option.
        mode: ``binary``, ``multiclass`` or ``multilabel``.
    """
    where = f"{Path(root) / CLASSES_JSON}"
    names = list(class_names) if class_names else [str(n) for n in meta.get("classes") or []]
    names_from = "class_names" if class_names else where
    weights = list(class_weights) if class_weights is not None else meta.get("class_weights")
    weights_from = "" if class_weights is not None else f" (from {where})"
    ignore = ignore_index if ignore_index is not None else meta.get("ignore_index")
    file_count = meta.get("num_classes")
    dropped = ""
    if names and ignore is not None and mode != "multilabel" and 0 <= ignore < len(names):
        if ignore == len(names) - 1:
            # The void label listed last (CamVid's "unlabelled"): a mask value to ignore, not a class.
            dropped = f" (after leaving out {names[-1]!r}, the name of ignore_index {ignore}: not a class)"
            names = names[:-1]
            if weights is not None and len(weights) == len(names) + 1:
                weights = weights[:-1]
            if file_count == len(names) + 1:
                file_count = len(names)
        else:
            warnings.warn(
                f"ignore_index {ignore} is the id of {names[ignore]!r} in {names_from}; it stays a class the model "
                f"outputs but never learns. To drop it, list it last (id {len(names) - 1}) or map it away with "
                "label_map",
                UserWarning,
                stacklevel=3,
            )
    count = num_classes or file_count or len(names)
    if count < 1:
        raise ValueError(f"num_classes is not set and {where} does not give it; set data num_classes")
    if names and len(names) != count:
        hint = ""
        if ignore is None and len(names) == count + 1:
            hint = f", or set ignore_index={len(names) - 1} if {names[-1]!r} is the mask value to leave out"
        raise ValueError(
            f"num_classes={count} but {names_from} lists {len(names)} class names{dropped}; set "
            f"num_classes={len(names)} (or leave it unset), or list {count} names{hint}"
        )
    if mode == "binary" and count != 2:
        raise ValueError(f"mode='binary' needs num_classes=2 (background, foreground), got {count}")
    check_class_weights(weights, count, mode, weights_from)
    final_names = tuple(names) if names else tuple(f"class_{i}" for i in range(count))
    return ClassSet(count, final_names, tuple(float(w) for w in weights) if weights is not None else None, ignore)


__all__ = ["CLASSES_JSON", "ClassSet", "check_class_weights", "read_classes_json", "resolve_classes"]
