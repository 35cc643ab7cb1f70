"""Reading images and segmentation masks from disk, with errors that name the file and the fix.

Images come back as float32 HxWxC in [0, 1] with exactly ``in_channels`` channels; masks as
integer HxW class ids (or HxWxC for multilabel) exactly as stored, after an optional value map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.common.checks import check_integral_mask, reading, warn_ignored
from tasks.common.images import find_images

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif", ".npy")


def _colour_to_ids(rgb: np.ndarray, colors: Sequence[Sequence[int]], path: Path) -> np.ndarray:
    """Map an HxWx3 colour mask to class ids through ``colors[class_id] = (r, g, b)``."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(colors)}
    uniq, inverse = np.unique(codes, return_inverse=True)
    unknown = [u for u in uniq.tolist() if u not in table]
    if unknown:
        shown = ", ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255})" for u in unknown[:5])
        raise ValueError(
            f"mask {path} has colours not in class_colors: {shown}{' ...' if len(unknown) > 5 else ''}; "
            f"class_colors has {len(colors)} entries (one [r, g, b] per class id); add the missing colours"
        )
    lut = np.array([table[u] for u in uniq.tolist()], dtype=np.uint8)
    return lut[inverse].reshape(codes.shape)


def read_mask(
    path: str | Path,
    *,
    multilabel: bool = False,
    class_colors: Sequence[Sequence[int]] | None = None,
    label_map: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Read a mask file as integer class ids (HxW), or HxWxC label planes when ``multilabel``.

    Args:
        path: A PNG/TIFF/BMP/GIF (``P`` palette images give their indices) or ``.npy`` file.
        multilabel: Keep every channel (one plane per class) instead of requiring one id per pixel.
        class_colors: ``[r, g, b]`` of each class id for colour masks.
        label_map: Raw value -> class id (e.g. ``{255: 1}`` for 0/255 binary masks); other values
            are kept.
    """
    path = Path(path)
    with reading(path, "mask"):
        if path.suffix.lower() == ".npy":
            mask = np.load(path)
        else:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("RGB") if class_colors is not None and im.mode not in ("RGB",) else im)
    check_integral_mask(mask, path)  # float masks: whole class ids only, no NaN
    if class_colors is not None and not multilabel:
        if mask.ndim != 3 or mask.shape[2] < 3:
            raise ValueError(f"mask {path} is not a colour image but class_colors is set; drop class_colors")
        mask = _colour_to_ids(mask[..., :3], class_colors, path)
    elif mask.ndim == 3 and not multilabel:
        if mask.shape[2] >= 3 and np.ptp(mask[..., :3], axis=2).any():
            raise ValueError(
                f"mask {path} is a colour image; pass class_colors (one [r, g, b] per class id) or save "
                "class ids as a single-channel or palette PNG"
            )
        mask = mask[..., 0]
    if multilabel and mask.ndim == 2:
        mask = mask[..., None]
    if label_map:
        out = mask.astype(np.int64)
        for raw, cls in label_map.items():  # compare against the raw mask: maps never chain
            out[mask == int(raw)] = int(cls)
        mask = out
    return mask


def check_pair(
    image: np.ndarray,
    mask: np.ndarray,
    image_path: Path,
    mask_path: Path,
    *,
    num_classes: int,
    ignore_index: int | None,
    multilabel: bool = False,
) -> None:
    """Raise ``ValueError`` naming the files when sizes differ or mask values are out of range."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but mask "
            f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}; masks must have their image's size"
        )
    if multilabel:
        if mask.shape[2] != num_classes:
            raise ValueError(
                f"multilabel mask {mask_path} has {mask.shape[2]} planes but num_classes={num_classes}"
            )
        return
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v < num_classes) and v != ignore_index]
    if bad:
        hint = " (0/255 binary mask? set label_map: {255: 1})" if bad == [255] and num_classes == 2 else ""
        raise ValueError(
            f"mask {mask_path} has values {bad[:10]} outside the class ids 0..{num_classes - 1}"
            f"{'' if ignore_index is None else f' and ignore_index {ignore_index}'}{hint}; fix num_classes, "
            "set ignore_index for the 'void' value, or map raw values with label_map"
        )


def find_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of ``<split_dir>/images`` and ``<split_dir>/masks``, matched by file stem."""
    images = find_images(split_dir / "images")
    mask_dir = split_dir / "masks"
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {mask_dir} does not exist (expected next to {split_dir / 'images'})")
    masks: dict[str, Path] = {}
    for p in sorted(mask_dir.iterdir()):
        if p.suffix.lower() in MASK_SUFFIXES:
            if p.stem in masks:
                raise ValueError(f"two masks for {p.stem!r} in {mask_dir}: {masks[p.stem].name} and {p.name}")
            masks[p.stem] = p
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise FileNotFoundError(
                f"image {image} has no mask: expected {mask_dir / image.stem}.png (or {', '.join(MASK_SUFFIXES[1:])})"
            )
        pairs.append((image, masks[image.stem]))
    stems = {image.stem for image in images}
    warn_ignored(mask_dir, [p.name for s, p in masks.items() if s not in stems], "mask(s)", "no image of that name")
    return pairs
