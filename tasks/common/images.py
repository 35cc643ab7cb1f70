"""Images for both tasks: one list of suffixes, one folder scanner, one reader, one set of ImageNet stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.common.checks import check_finite, reading, warn_ignored

# What both tasks read: PIL formats, plus ``.npy`` arrays (any channel count, float or integer).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".npy")
# ImageNet statistics (the pretrained encoders' input normalisation); other channel counts use their average
# (a stem adapted from RGB weights sums or averages the RGB kernels, so a gray channel should look like an
# average channel).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for images scaled to [0, 1]."""
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3] * in_channels, [sum(IMAGENET_STD) / 3] * in_channels


def find_images(folder: str | Path, what: str = "image") -> list[Path]:
    """Image files directly in ``folder``, sorted by name; an error when the folder is missing or has none.

    Other files (``notes.txt``, ``Thumbs.db``, ...) are skipped with one warning that counts them.

    Args:
        folder: The folder to scan.
        what: What the folder is for, in the error messages (``image``, ``prediction``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    entries = [p for p in folder.iterdir() if p.is_file()]
    files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
    warn_ignored(folder, [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES], "non-image file(s)",
                 f"not one of {', '.join(IMAGE_SUFFIXES)}")  # fmt: skip
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


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
