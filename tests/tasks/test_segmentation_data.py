"""MaskDataModule, mask reading and validation, transforms, and the synthetic generator."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightning")
pytest.importorskip("albumentations")

from tasks.segmentation.data import IGNORE_LABEL, MaskDataModule, collate_padded  # noqa: E402
from tasks.segmentation.synthetic import PALETTE, SyntheticMaskSpec, ensure_masks, generate_masks, make_sample  # noqa: E402
from tasks.segmentation.transforms import build_transforms  # noqa: E402


@pytest.fixture
def data(tmp_path):
    return generate_masks(tmp_path / "d", SyntheticMaskSpec(num_train=6, num_val=2, size=(40, 56), seed=3))


def _first_batch(dm, split="train"):
    dm.setup("fit" if split in ("train", "val") else split)
    return next(iter(getattr(dm, f"{split}_dataloader")()))


def test_generator_is_deterministic_and_labels_every_class(tmp_path):
    spec = SyntheticMaskSpec(num_train=2, num_val=0, size=48)
    a, ma = make_sample(spec, 1)
    b, mb = make_sample(spec, 1)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    masks = np.stack([make_sample(spec, i)[1] for i in range(12)])
    assert set(np.unique(masks)) == {0, 1, 2, 3}
    root = generate_masks(tmp_path / "g", spec)
    before = (root / "train" / "images" / "train_0000.png").stat().st_mtime_ns
    ensure_masks(root, spec)  # same spec: nothing rewritten
    assert (root / "train" / "images" / "train_0000.png").stat().st_mtime_ns == before
    assert json.loads((root / "classes.json").read_text())["classes"] == ["background", "ellipse", "square", "triangle"]


def test_batches_shapes_classes_json_and_normalisation(data):
    dm = MaskDataModule(str(data), image_size=32, batch_size=3)
    assert dm.num_classes == 4 and dm.class_names[1] == "ellipse"
    batch = _first_batch(dm)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 32, 32) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3}
    unit = dm.denormalize(batch["image"])
    assert unit.min() >= 0 and unit.max() <= 1


def test_grayscale_images_and_pad_mode_keep_native_size(tmp_path):
    root = generate_masks(tmp_path / "g", SyntheticMaskSpec(num_train=4, num_val=2, size=(40, 56), channels=1))
    dm = MaskDataModule(str(root), in_channels=1, image_size=32, batch_size=2, eval_resize="pad")
    assert dm.mean == pytest.approx([0.449], abs=1e-3)
    batch = _first_batch(dm, "val")
    assert batch["image"].shape == (2, 1, 40, 56) and batch["size"].tolist() == [[40, 56], [40, 56]]
    # An RGB dataset accepts grayscale files (repeated to 3 channels).
    dm3 = MaskDataModule(str(root), in_channels=3, image_size=32, batch_size=2)
    assert _first_batch(dm3)["image"].shape[1] == 3


def test_palette_masks_through_class_colors(tmp_path):
    spec = SyntheticMaskSpec(num_train=3, num_val=1, size=32, mask_format="palette")
    root = generate_masks(tmp_path / "p", spec)
    dm = MaskDataModule(str(root), image_size=32, batch_size=4, eval_resize="pad")  # colours from classes.json
    dm.setup("fit")
    sample = dm.datasets["val"][0]
    assert torch.equal(sample["mask"], torch.from_numpy(make_sample(spec, 3)[1]).long())
    missing = MaskDataModule(str(root), class_colors=[list(c) for c in PALETTE[:3]], eval_resize="pad")
    missing.setup("fit")
    with pytest.raises(ValueError, match=r"colours not in class_colors: \(0, 130, 200\)"):
        for i in range(3):  # every class appears in these 3 images
            missing.datasets["train"][i]


def test_seeded_split_when_no_val_folder(tmp_path):
    root = generate_masks(tmp_path / "s", SyntheticMaskSpec(num_train=10, num_val=0, size=32))
    dm_a = MaskDataModule(str(root), image_size=32, val_fraction=0.3, seed=1)
    dm_b = MaskDataModule(str(root), image_size=32, val_fraction=0.3, seed=1)
    dm_a.setup("fit")
    dm_b.setup("fit")
    val_a = [p for p, _ in dm_a.datasets["val"].pairs]
    assert len(val_a) == 3 and val_a == [p for p, _ in dm_b.datasets["val"].pairs]
    assert not set(val_a) & {p for p, _ in dm_a.datasets["train"].pairs}


def test_ignore_index_and_label_map(tmp_path, data):
    mask_path = data / "val" / "masks" / "val_0006.png"
    mask = np.array(Image.open(mask_path))
    mask[:4] = 255
    Image.fromarray(mask).save(mask_path)
    dm = MaskDataModule(str(data), ignore_index=255, image_size=32, eval_resize="pad")
    dm.setup("fit")
    target = dm.datasets["val"][0]["mask"]
    assert (target[:4] == IGNORE_LABEL).all() and (target[4:] >= 0).all()
    with pytest.raises(ValueError, match=r"val_0006.png has values \[255\] outside the class ids 0..3"):
        dm = MaskDataModule(str(data), image_size=32, eval_resize="pad")
        dm.setup("fit")
        dm.datasets["val"][0]
    dm = MaskDataModule(str(data), image_size=32, eval_resize="pad", label_map={255: 0})
    dm.setup("fit")
    assert (dm.datasets["val"][0]["mask"][:4] == 0).all()


def test_missing_mask_and_size_mismatch_name_the_file(data):
    (data / "train" / "masks" / "train_0002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_0002.png has no mask"):
        MaskDataModule(str(data)).setup("fit")
    generate_masks(data, SyntheticMaskSpec(num_train=6, num_val=2, size=(40, 56), seed=3))
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(data / "val" / "masks" / "val_0007.png")
    dm = MaskDataModule(str(data), eval_resize="pad")
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"size mismatch: image .*val_0007.png is 56x40 .*val_0007.png is 50x40"):
        dm.datasets["val"][1]


def test_colour_mask_without_class_colors_is_refused(data):
    rgb = np.asarray(PALETTE, dtype=np.uint8)[np.array(Image.open(data / "val" / "masks" / "val_0006.png"))]
    Image.fromarray(rgb.astype(np.uint8)).save(data / "val" / "masks" / "val_0006.png")
    dm = MaskDataModule(str(data), eval_resize="pad")
    dm.setup("fit")
    with pytest.raises(ValueError, match="val_0006.png is a colour image; pass class_colors"):
        dm.datasets["val"][0]


def test_train_transform_resamples_masks_nearest():
    rng = np.random.default_rng(0)
    image = rng.random((50, 70, 3), dtype=np.float32)
    mask = rng.integers(0, 5, (50, 70)).astype(np.uint8) * 40  # values 0, 40, .., 160 only
    pipeline = build_transforms("train", 96, crop_scale=(0.2, 0.5))
    for _ in range(5):
        out = pipeline(image=image, mask=mask)
        assert out["image"].shape == (96, 96, 3)
        assert set(np.unique(out["mask"])) <= {0, 40, 80, 120, 160}


def test_collate_pads_differing_sizes_with_ignore():
    samples = [
        {"image": torch.ones(3, 4, 5), "mask": torch.zeros(4, 5, dtype=torch.long), "path": "a"},
        {"image": torch.ones(3, 6, 3), "mask": torch.ones(6, 3, dtype=torch.long), "path": "b"},
    ]
    batch = collate_padded(samples)
    assert batch["image"].shape == (2, 3, 6, 5) and batch["size"].tolist() == [[4, 5], [6, 3]]
    assert (batch["mask"][0, 4:] == IGNORE_LABEL).all() and (batch["mask"][1, :, 3:] == IGNORE_LABEL).all()
    assert batch["image"][0, :, 4:].abs().sum() == 0


def test_multichannel_npy_images_and_multilabel_masks(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for i in range(n):
            np.save(tmp_path / split / "images" / f"{i}.npy", rng.integers(0, 65535, (24, 40, 5), dtype=np.uint16))
            np.save(tmp_path / split / "masks" / f"{i}.npy", rng.integers(0, 2, (24, 40, 3), dtype=np.uint8))
    dm = MaskDataModule(str(tmp_path), num_classes=3, mode="multilabel", in_channels=5, image_size=16,
                        batch_size=3, eval_resize="pad")  # fmt: skip
    batch = _first_batch(dm)
    assert batch["image"].shape == (3, 5, 16, 16) and batch["mask"].shape == (3, 3, 16, 16)
    assert len(dm.mean) == 5 and set(batch["mask"].unique().tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="has 5 channels but in_channels=3"):
        wrong = MaskDataModule(str(tmp_path), num_classes=3, mode="multilabel", eval_resize="pad")
        wrong.setup("fit")
        wrong.datasets["val"][0]
