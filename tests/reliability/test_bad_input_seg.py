"""Bad segmentation input: each case stops with a message naming the file, the value and the fix,
or is handled in a documented, counted way (docs/reliability.md, "What happens when...")."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightning")
pytest.importorskip("albumentations")

from tasks.common.images import find_images, read_image  # noqa: E402
from tasks.segmentation.data import MaskDataModule  # noqa: E402
from tasks.segmentation.io import find_pairs, read_mask  # noqa: E402


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _pair(root: Path, name: str, size=(16, 16), mask_size=None, mask_value: int = 1, split="train") -> None:
    rng = np.random.default_rng(len(name))
    _png(root / split / "images" / f"{name}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    mask = np.zeros(mask_size or size, np.uint8)
    mask[2:6, 2:6] = mask_value
    _png(root / split / "masks" / f"{name}.png", mask)


def _dataset(root: Path, **kwargs):
    dm = MaskDataModule(str(root), num_classes=3, image_size=16, batch_size=2, **kwargs)
    dm.setup("validate")
    return dm.datasets["val"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        _pair(tmp_path, name)
        _pair(tmp_path, name, split="val")
    return tmp_path


def test_image_and_mask_of_different_sizes(root):
    _pair(root, "d", size=(16, 16), mask_size=(16, 12), split="val")
    ds = _dataset(root)
    with pytest.raises(ValueError, match=r"size mismatch: image .*d\.png is 16x16 .* mask .*d\.png is 12x16.*must"):
        ds[3]


def test_mask_value_outside_the_classes(root):
    _pair(root, "d", mask_value=7, split="val")
    ds = _dataset(root)
    with pytest.raises(ValueError, match=r"mask .*d\.png has values \[7\] outside the class ids 0..2.*label_map"):
        ds[3]


def test_mask_value_equal_to_ignore_index_is_accepted(root):
    _pair(root, "d", mask_value=255, split="val")
    sample = _dataset(root, ignore_index=255)[3]
    assert (sample["mask"] == -100).sum() == 16  # becomes the ignore label, counted nowhere


def test_float_mask_with_fractional_or_nan_values(tmp_path):
    np.save(tmp_path / "m.npy", np.array([[0, 1.5], [2, 0]], np.float32))
    with pytest.raises(ValueError, match=r"mask .*m\.npy has non-integer values \[1\.5\].*class ids"):
        read_mask(tmp_path / "m.npy")
    np.save(tmp_path / "n.npy", np.array([[0, np.nan], [2, 0]], np.float32))
    with pytest.raises(ValueError, match=r"mask .*n\.npy has 1 NaN/inf value"):
        read_mask(tmp_path / "n.npy")
    np.save(tmp_path / "ok.npy", np.array([[0, 1.0], [2, 0]], np.float32))  # whole numbers in a float file: fine
    assert read_mask(tmp_path / "ok.npy").tolist() == [[0, 1], [2, 0]]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_an_image(tmp_path, value):
    image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    image[3, 4, 1] = value
    np.save(tmp_path / "x.npy", image)
    with pytest.raises(ValueError, match=r"image .*x\.npy has 1 NaN/inf value.*nan_to_num"):
        read_image(tmp_path / "x.npy")


def _corrupt(tmp_path: Path, kind: str) -> Path:
    if kind == "garbage.png":
        (tmp_path / kind).write_bytes(b"this is not a png")
    elif kind in ("truncated.png", "truncated.jpg"):
        ext = kind.rsplit(".", 1)[1]
        full = _png(tmp_path / f"full.{ext}", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        data = full.read_bytes()
        (tmp_path / kind).write_bytes(data[: len(data) // 2])
    elif kind == "empty.png":
        (tmp_path / kind).write_bytes(b"")
    elif kind == "garbage.npy":
        (tmp_path / kind).write_bytes(b"\x93NUMPY broken")
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["garbage.png", "truncated.png", "truncated.jpg", "empty.png", "garbage.npy"])
def test_corrupt_or_truncated_image(tmp_path, kind):
    path = _corrupt(tmp_path, kind)
    with pytest.raises(ValueError, match=rf"image .*{kind.replace('.', '[.]')} cannot be read: it is truncated, "
                                         r"corrupt or not an image file .*remove it from the folder"):
        read_image(path)


def test_corrupt_mask_file(tmp_path):
    path = _corrupt(tmp_path, "truncated.png")
    with pytest.raises(ValueError, match=r"mask .*truncated\.png cannot be read"):
        read_mask(path)


def test_non_image_files_are_ignored_with_a_counted_warning(root):
    folder = root / "val" / "images"
    for name in ("notes.txt", "Thumbs.db", ".DS_Store"):
        (folder / name).write_text("x")
    (folder / "sub").mkdir()  # folders are not files: neither read nor counted
    with pytest.warns(UserWarning, match=r"ignored 3 non-image file\(s\) in .*images .*\.DS_Store, Thumbs\.db, notes"):
        files = find_images(folder)
    assert [p.name for p in files] == ["a.png", "b.png", "c.png"]


def test_image_without_its_mask(root):
    (root / "val" / "masks" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image .*b\.png has no mask: expected .*masks/b\.png"):
        find_pairs(root / "val")


def test_mask_without_its_image_is_counted(root):
    _png(root / "val" / "masks" / "orphan.png", np.zeros((4, 4), np.uint8))
    with pytest.warns(UserWarning, match=r"ignored 1 mask\(s\) in .*masks \(no image of that name\): orphan\.png"):
        assert len(find_pairs(root / "val")) == 3


def test_image_with_wrong_channel_count_for_the_data(tmp_path):
    np.save(tmp_path / "five.npy", np.zeros((8, 8, 5), np.float32))
    with pytest.raises(ValueError, match=r"five\.npy has 5 channels but in_channels=3; set in_channels=5"):
        read_image(tmp_path / "five.npy", in_channels=3)


def test_clean_folders_give_no_warning(root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_pairs(root / "train")) == 3


# -- the model side ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_task():
    pytest.importorskip("segmentation_models_pytorch")
    from tasks.segmentation import SegmentationTask

    return SegmentationTask(variant="b0", num_classes=3, decoder_options={"decoder_channels": [16, 16, 8, 8, 8]}).eval()


def test_wrong_channel_count_for_the_model(seg_task):
    with pytest.raises(ValueError, match=r"in_channels=3 but the image has 1 channel.*set in_channels=1 in the data"):
        seg_task(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (31, 33), (2, 97)])
def test_segmentation_of_tiny_and_odd_sizes_gives_same_size_logits(seg_task, size):
    # The task pads to a multiple of 32 and crops back, so any size >= 1 pixel works.
    with torch.no_grad():
        logits = seg_task(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3, *size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (31, 33)])
def test_encoder_features_of_tiny_and_odd_sizes(size):
    # Defined behaviour: every level has ceil(H / stride) x ceil(W / stride) pixels, at least 1.
    from effbackbone.factory import create_model

    model = create_model("b0", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    for spec in model.feature_specs:
        expected = tuple(-(-s // spec.stride) for s in size)
        assert tuple(feats[spec.name].shape[-2:]) == expected, (spec.name, expected)
