"""Reading images and segmentation masks from disk, with errors that name the file and the fix.

Images come back as float32 HxWxC in [0, 1] with exactly ``in_channels`` channels; masks as
integer HxW class ids (or HxWxC for multilabel) exactly as stored, after an optional value map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.validation import check_finite, check_integral_mask, reading, warn_ignored

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif", ".npy")
# ImageNet statistics; other channel counts use their average (a stem adapted from RGB weights
# sums or averages the RGB kernels, so a gray channel should look like an average channel).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for images scaled to [0, 1]."""
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3] * in_channels, [sum(IMAGENET_STD) / 3] * in_channels


def _to_unit(array: np.ndarray) -> np.ndarray:
    """Scale integer pixels by their dtype's maximum; floats are taken as already scaled."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    return array.astype(np.float32)


def read_image(path: str | Path, in_channels: int = 3) -> np.ndarray:
    """Read an image file as float32 HxWx``in_channels`` in [0, 1].

    Grayscale files in an RGB dataset are repeated to 3 channels, RGB files in a grayscale dataset
    converted to luminance, an alpha channel dropped when ``in_channels`` is 3; ``.npy`` files hold
    HxW or HxWxC arrays for any channel count.
    """
    path = Path(path)
    with reading(path, "image"):  # truncated/corrupt files: an error naming the file, not PIL's
        if path.suffix.lower() == ".npy":
            array = np.load(path)
        else:
            with Image.open(path) as im:
                if im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                    im = im.convert("RGB" if im.mode != "1" else "L")
                array = np.asarray(im)
    check_finite(array, path, "image")
    if array.ndim == 2:
        array = array[..., None]
    image = _to_unit(array)
    channels = image.shape[2]
    if channels == in_channels:
        return image
    if channels == 1 and in_channels == 3:
        return np.repeat(image, 3, axis=2)
    if channels in (3, 4) and in_channels == 1:
        # ITU-R 601 luma, as PIL's convert("L").
        return (image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    if channels == 4 and in_channels == 3:
        return image[..., :3]
    if channels == 2 and in_channels == 1:  # gray + alpha
        return image[..., :1]
    raise ValueError(
        f"image {path} has {channels} channels but in_channels={in_channels}; set in_channels={channels} "
        "in the data and model config, or convert the file"
    )


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


def find_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; an error when there are none.

    Other files (``notes.txt``, ``Thumbs.db``, ...) are skipped with one warning that counts them.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    entries = [p for p in folder.iterdir() if p.is_file()]
    files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
    warn_ignored(folder, [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES], "non-image file(s)",
                 f"not one of {', '.join(IMAGE_SUFFIXES)}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


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
