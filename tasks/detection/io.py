"""Reading COCO files: the annotation json (checked) and images as RGB, with errors that name the file and the fix."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from tasks.common.checks import reading, sanitize_coco
from tasks.common.images import read_image


def load_coco(annotation_file: str | Path) -> COCO:
    """``pycocotools.COCO`` without its progress prints; a missing file is a clear error."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {path} does not exist; expected <root>/annotations/"
            "instances_<split>.json (set `root`/`train_split`/`val_split`)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"COCO annotation file {path} is not valid json ({e}); re-export it") from e
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file {path} holds a {type(data).__name__}, not a COCO dict")
    coco = COCO()
    coco.dataset = sanitize_coco(data, path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    for ann in coco.dataset.get("annotations", []):
        # COCOeval reads both; hand-made json often leaves them out.
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    return coco


def load_rgb(path: Path, fix: str | None = None) -> np.ndarray:
    """Read an image as ``HxWx3`` uint8 RGB (grayscale, palette, 16-bit and RGBA are converted).

    ``fix`` is the advice of the error raised for an unreadable file (default: the folder reader's).
    """
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.suffix.lower() == ".npy":  # an array: the segmentation reader's rules, scaled to 8 bits
        return (read_image(path, 3) * 255).round().clip(0, 255).astype(np.uint8)
    with reading(path, "image", fix), Image.open(path) as im:  # corrupt/truncated: a ValueError naming the file
        if im.mode in ("I;16", "I;16B", "I"):  # 16/32-bit grey: rescale rather than clip to 255
            arr = np.asarray(im, dtype=np.float32)
            im = Image.fromarray((255 * arr / max(float(arr.max()), 1.0)).astype(np.uint8))
        return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only)


def leave_out_images(coco: COCO, image_ids: set[int]) -> int:
    """Remove ``image_ids`` and their annotations from ``coco`` (index rebuilt); returns the annotations removed."""
    anns = coco.dataset["annotations"]
    coco.dataset["images"] = [im for im in coco.dataset["images"] if im["id"] not in image_ids]
    coco.dataset["annotations"] = [a for a in anns if a["image_id"] not in image_ids]
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return len(anns) - len(coco.dataset["annotations"])


__all__ = ["leave_out_images", "load_coco", "load_rgb"]
