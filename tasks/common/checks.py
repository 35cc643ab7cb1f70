"""Input checks shared by the data modules and tasks: every error names the item, the value and the fix.

The readers in :mod:`tasks.segmentation.io` and :mod:`tasks.detection.data` call these so that bad input
stops with one clear message (or is handled in a documented, counted way) instead of a cryptic
library error deep in a worker, or silently wrong training data. ``docs/reliability.md`` lists
what the user sees for each case.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

# PIL raises these for unreadable files: OSError (truncated, "cannot identify"), SyntaxError (broken
# headers of some formats), ValueError/struct errors for damaged chunks; numpy raises ValueError/EOFError.
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)


# Advice that leads to a working state: in a folder of pairs, an image removed alone leaves its mask ignored
# (a counted warning), while a mask removed alone leaves its image without a mask (an error).
SKIP_ADVICE = "or set skip_unreadable: true in the data config (with check_images: full) to leave it out"
READ_FIXES = {
    "image": f"re-save or re-download it, remove it from the folder, {SKIP_ADVICE}",
    "mask": f"re-save it, remove it together with its image, {SKIP_ADVICE}",
}


@contextmanager
def reading(path: str | Path, what: str = "image", fix: str | None = None) -> Iterator[None]:
    """Turn a decoder's exception inside the block into a ``ValueError`` naming ``path`` and the fix.

    ``FileNotFoundError`` passes through unchanged (its message already names the file).

    Args:
        path: The file being read.
        what: ``image`` or ``mask``, for the message.
        fix: What to do about it (default: :data:`READ_FIXES` of ``what``).
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except _READ_ERRORS as e:
        raise ValueError(
            f"{what} {path} cannot be read: it is truncated, corrupt or not an {what} file "
            f"({type(e).__name__}: {e}); {fix or READ_FIXES.get(what, READ_FIXES['image'])}"
        ) from e


def check_finite(array: np.ndarray, path: str | Path, what: str = "image") -> None:
    """Raise ``ValueError`` when a float array read from ``path`` holds NaN or inf values."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = int(finite.size - finite.sum())
    raise ValueError(
        f"{what} {path} has {bad} NaN/inf value(s) of {array.size}; replace them (e.g. np.nan_to_num) "
        "before training: one NaN pixel makes the loss NaN"
    )


def check_integral_mask(mask: np.ndarray, path: str | Path) -> None:
    """A float mask must hold whole class ids: ``1.5`` would silently become class 1."""
    if not np.issubdtype(mask.dtype, np.floating):
        return
    check_finite(mask, path, "mask")
    fractional = mask != np.round(mask)
    if fractional.any():
        examples = np.unique(mask[fractional])[:5].tolist()
        raise ValueError(
            f"mask {path} has non-integer values {examples}; masks hold class ids (save them as an integer "
            "array or PNG; a resized mask must use nearest-neighbour interpolation)"
        )


def warn_ignored(folder: str | Path, names: list[str], kind: str, reason: str) -> None:
    """One ``UserWarning`` that counts (and shows a few of) the files a reader skipped."""
    if not names:
        return
    shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
    warnings.warn(f"ignored {len(names)} {kind} in {folder} ({reason}): {shown}", UserWarning, stacklevel=3)


def check_channels(image: Tensor, expected: int, where: str) -> None:
    """Raise ``ValueError`` before the first convolution when ``image`` (N x C x H x W) has the wrong ``C``."""
    if image.ndim != 4:
        raise ValueError(f"{where} expects a batch N x C x H x W, got a tensor of shape {tuple(image.shape)}")
    got = int(image.shape[1])
    if got != expected:
        raise ValueError(
            f"{where} was built for in_channels={expected} but the image has {got} channel(s) "
            f"(shape {tuple(image.shape)}); set in_channels={got} in the data config (it is linked to the "
            f"model), or convert the images to {expected} channel(s)"
        )


def _count_line(counter: Counter[Any]) -> str:
    return ", ".join(str(k) for k, n in counter.items() if n > 1)


def sanitize_coco(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Check a COCO json dict in place; raise on what cannot be repaired, renumber what can.

    Errors (``ValueError`` naming the json, the ids and the fix): duplicate image ids, an annotation
    whose ``image_id`` is not an image, a ``category_id`` not among ``categories``, a ``bbox`` that is
    not four finite numbers. Repaired with one counted warning: annotation ids that are missing,
    duplicated or 0 (pycocotools' COCOeval stores matches by id and reads 0 as "unmatched", so a
    correctly found box with id 0 would count as a miss) are renumbered 1..N in file order.
    """
    images = data.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{path} has no 'images' list; is it a COCO instances json?")
    annotations = data.setdefault("annotations", [])
    categories = data.get("categories") or []
    image_ids = Counter(im.get("id") for im in images)
    duplicates = _count_line(image_ids)
    if duplicates:
        raise ValueError(
            f"{path} has duplicate image ids: {duplicates}; each image needs a unique id (annotations refer to it)"
        )
    category_ids = {c.get("id") for c in categories}
    unknown_images: list[str] = []
    for i, ann in enumerate(annotations):
        ref = f"annotation #{i} (id {ann.get('id')})"
        if ann.get("image_id") not in image_ids:
            unknown_images.append(f"{ref} -> image_id {ann.get('image_id')}")
        if ann.get("category_id") not in category_ids:
            raise ValueError(
                f"{path}: {ref} has category_id {ann.get('category_id')}, which is not among the categories "
                f"{sorted(category_ids)}; add it to 'categories' or fix the annotation"
            )
        bbox = ann.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):  # fmt: skip
            raise ValueError(f"{path}: {ref} has bbox {bbox!r}; a COCO bbox is [x, y, width, height], 4 numbers")
    if unknown_images:
        raise ValueError(
            f"{path}: {len(unknown_images)} annotation(s) refer to images that are not in 'images': "
            f"{'; '.join(unknown_images[:5])}{' ...' if len(unknown_images) > 5 else ''}; add the images or drop them"
        )
    ann_ids = Counter(ann.get("id") for ann in annotations)
    bad_ids = sum(n for k, n in ann_ids.items() if not isinstance(k, int) or k <= 0 or n > 1)
    if bad_ids:
        for new_id, ann in enumerate(annotations, start=1):
            ann["id"] = new_id
        warnings.warn(
            f"{path}: {bad_ids} annotation id(s) missing, duplicated or <= 0 (COCOeval needs unique ids >= 1); "
            f"renumbered all {len(annotations)} annotations 1..{len(annotations)} in file order",
            UserWarning,
            stacklevel=3,
        )
    return data


__all__ = [
    "check_channels",
    "check_finite",
    "check_integral_mask",
    "reading",
    "sanitize_coco",
    "warn_ignored",
]
