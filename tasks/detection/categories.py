"""COCO categories as contiguous training labels, without placeholder "background" categories.

Sparse category ids (3, 17, 90) map to labels ``0..K-1`` sorted by id, and back in every output. Some
exporters add a category for "no object": labelme's ``labelme2coco`` writes ``{"id": 0, "name":
"_background_"}``, torchvision-style lists start with ``__background__``. Such a category is not a class (a
detector has no "background" output; effdet's class head is one sigmoid per real class), so it is left out
with one warning, and its annotations, if any, are ignored.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLACEHOLDER_NAMES = ("_background_", "__background__")


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous training labels ``0..K-1`` <-> COCO ``category_id`` (sorted ascending).

    Attributes:
        category_ids: The COCO id of each label.
        names: The name of each label.
        ignored_ids: Placeholder categories left out (their annotations are not trained on).
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    ignored_ids: tuple[int, ...] = ()

    @classmethod
    def from_categories(cls, categories: list[dict[str, Any]], source: str | Path | None = None) -> CategoryMap:
        """Build from a COCO ``categories`` list (``source``: the json it came from, for the warning)."""
        placeholders = [c for c in categories if str(c.get("name", "")).strip().lower() in PLACEHOLDER_NAMES]
        cats = sorted((c for c in categories if c not in placeholders), key=lambda c: int(c["id"]))
        if placeholders:
            shown = ", ".join(f"{c['id']} {c.get('name')!r}" for c in placeholders)
            warnings.warn(
                f"{source or 'categories'}: left out category {shown}: a placeholder for 'no object' (labelme "
                f"exports add it), not a class; {len(cats)} classes remain and its annotations, if any, are ignored",
                UserWarning,
                stacklevel=2,
            )
        return cls(
            tuple(int(c["id"]) for c in cats),
            tuple(str(c.get("name", c["id"])) for c in cats),
            tuple(int(c["id"]) for c in placeholders),
        )

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_label(self, category_id: int) -> int:
        """The contiguous label of a COCO ``category_id``."""
        try:
            return self.category_ids.index(int(category_id))
        except ValueError:
            raise KeyError(f"category_id {category_id} is not among the known ids {list(self.category_ids)}") from None

    def to_category_id(self, label: int) -> int:
        """The COCO ``category_id`` of a contiguous label."""
        return self.category_ids[int(label)]


def checked_category_map(datamodule: object, num_classes: int) -> CategoryMap | None:
    """The ``category_map`` of a task's data module, checked against the model's ``num_classes``.

    Returns ``None`` when the data module has none (a task then keeps the ids 1..K it was built with).
    """
    cmap = getattr(datamodule, "category_map", None)
    if cmap is None:
        return None
    if len(cmap) != num_classes:
        raise ValueError(
            f"the data has {len(cmap)} categories {list(cmap.category_ids)} but model.num_classes={num_classes}; "
            f"set model.init_args.num_classes={len(cmap)}"
        )
    return cmap


__all__ = ["PLACEHOLDER_NAMES", "CategoryMap", "checked_category_map"]
