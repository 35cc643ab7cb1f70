"""Mixing augmentations (tasks/common/mixing.py, tasks/segmentation/cutmix.py, tasks/detection/mixing.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

pytest.importorskip("lightning")
pytest.importorskip("albumentations")

from tasks.common.sampling import EpochSampler, SeededDataset, make_loader  # noqa: E402
from tasks.detection.data import CocoDataModule, collate_detection  # noqa: E402
from tasks.detection.mixing import MosaicMixUpDataset, mixup, mosaic  # noqa: E402
from tasks.segmentation.cutmix import CutMixDataset, cut_box, cutmix  # noqa: E402
from tasks.segmentation.data import IGNORE_LABEL  # noqa: E402

SIZE = 64
# The fill value of each label's shapes: no value is another one times a resampling weight (a multiple of 1/64).
VALUES = (1.0, 2.3, 3.7, 5.9)


class Jitter:
    """A stand-in augmentation pipeline with albumentations' seeding method: a random offset per sample."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def offset(self) -> float:
        return float(self.rng.integers(100))


class Masks(Dataset):
    """Images whose channel 0 holds the class id of each pixel (-1 where the mask says ignore)."""

    def __init__(self, n: int = 6) -> None:
        self.n, self.transform = n, Jitter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        mask = torch.randint(0, 4, (SIZE, SIZE), generator=g)
        mask[: 4 + i, :] = IGNORE_LABEL  # an ignored band of its own height in every image
        image = torch.stack([mask.float().masked_fill(mask == IGNORE_LABEL, -1.0),
                             torch.full((SIZE, SIZE), self.transform.offset() + 1000 * i)])  # fmt: skip
        return {"image": image, "mask": mask, "path": f"{i}.png"}


def _shape_tile(label: int, boxes: list[list[float]], size: int = SIZE) -> tuple:
    """An image with each box filled with ``VALUES[label]`` (0 elsewhere), its boxes and their labels."""
    image = torch.zeros(3, size, size)
    for x1, y1, x2, y2 in boxes:
        image[:, int(y1) : int(y2), int(x1) : int(x2)] = VALUES[label]
    return image, torch.tensor(boxes, dtype=torch.float32), torch.full((len(boxes),), label)


class Shapes(Dataset):
    """Letterboxed detection samples: filled rectangles of value ``VALUES[label]`` with their boxes."""

    def __init__(self, n: int = 6) -> None:
        self.n, self.transforms = n, Jitter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        shift = self.transforms.offset() % 8
        boxes = [[4 + shift, 6, 30 + shift, 40], [36, 20 + shift, 60, 44 + shift]]
        image, boxes, labels = _shape_tile(i % 3, boxes)
        return {"image": image, "boxes_xyxy": boxes, "labels": labels, "image_id": i, "img_scale": 1.0,
                "img_size": (SIZE, SIZE), "file_name": f"{i}.jpg"}  # fmt: skip


# -- CutMix ------------------------------------------------------------------------------------------
def test_cutmix_pastes_image_and_mask_together_and_keeps_ignore():
    data = Masks()
    a, b = data[0], data[1]
    box = (10, 40, 5, 30)
    image, mask = cutmix(a["image"], a["mask"], b["image"], b["mask"], box)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[10:40, 5:30] = True
    assert torch.equal(mask[inside], b["mask"][inside]) and torch.equal(mask[~inside], a["mask"][~inside])
    # Labels stay aligned with the image they describe, ignore included.
    kept = mask != IGNORE_LABEL
    assert torch.equal(image[0][kept], mask[kept].float()) and (image[0][~kept] == -1).all()
    assert ((mask >= 0) & (mask < 4) | (mask == IGNORE_LABEL)).all()
    assert torch.equal(a["mask"], data[0]["mask"])  # inputs untouched


def test_cutmix_box_has_the_drawn_area_and_stays_inside():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.75, 1.0):
        y0, y1, x0, x1 = cut_box(SIZE, 48, lam, rng)
        assert 0 <= y0 <= y1 <= SIZE and 0 <= x0 <= x1 <= 48
        assert (y1 - y0) <= SIZE * (1 - lam) ** 0.5 + 1 and (x1 - x0) <= 48 * (1 - lam) ** 0.5 + 1
    y0, y1, x0, x1 = cut_box(SIZE, SIZE, 0.0, np.random.default_rng(1))
    assert (y1 - y0) * (x1 - x0) > 0  # lam 0: the largest box, clipped where its centre falls


def test_cutmix_dataset_mixes_with_its_probability_and_is_seeded():
    never, always = CutMixDataset(Masks(), 0.0), CutMixDataset(Masks(), 1.0)
    always.set_random_seed(3)
    mixed = always[0]
    always.set_random_seed(3)
    again = always[0]
    assert torch.equal(again["image"], mixed["image"]) and torch.equal(again["mask"], mixed["mask"])
    # Channel 1 holds one value per sample drawn (image id and its seeded jitter): two samples are in the mix.
    assert len(mixed["image"][1].unique()) == 2
    never.set_random_seed(3)
    assert len(never[0]["image"][1].unique()) == 1
    kept = mixed["mask"] != IGNORE_LABEL
    assert torch.equal(mixed["image"][0][kept], mixed["mask"][kept].float())
    multilabel = cutmix(torch.zeros(2, 8, 8), torch.zeros(3, 8, 8), torch.ones(2, 8, 8), torch.ones(3, 8, 8),
                        (2, 6, 2, 6))  # fmt: skip
    assert multilabel[1][:, 2:6, 2:6].eq(1).all() and multilabel[1].sum() == 3 * 16
    with pytest.raises(ValueError, match="cutmix=1.5 is a probability"):
        CutMixDataset(Masks(), 1.5)


# -- Mosaic and MixUp --------------------------------------------------------------------------------
def _check_boxes(boxes: torch.Tensor, labels: torch.Tensor, size: int) -> None:
    assert boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
    assert (boxes >= 0).all() and (boxes <= size).all()
    assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()


@pytest.mark.parametrize("center", [(32, 32), (16, 48), (48, 16), (17, 45)])
def test_mosaic_boxes_cover_their_shapes_and_stay_inside(center):
    tiles = [_shape_tile(k, [[4, 6, 30 + 4 * k, 40], [36 - 2 * k, 20, 60, 44]]) for k in range(4)]
    image, boxes, labels = mosaic(tiles, SIZE, center, min_visibility=0.0, min_size=1e-3)
    _check_boxes(boxes, labels, SIZE)
    covered = torch.zeros(len(tiles), SIZE, SIZE, dtype=torch.bool)
    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
        # The inside of each box shows its own shape (away from the 1-pixel resampling rim).
        inner = image[0, int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
        if inner.numel():
            assert torch.allclose(inner, torch.tensor(VALUES[label]), atol=1e-4)
        covered[label, int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))] = True
    # Every pixel of a shape lies in a box of that shape's label: no object lost its box.
    for label in range(4):
        shape = (image[0] - VALUES[label]).abs() < 1e-4
        assert covered[label][shape].all()
    assert len(labels) > 0


def test_mosaic_drops_cut_boxes_with_their_labels():
    # Centre (8, 8): of the 128 px tiles, shrunk to 64 px, the top-left one shows its bottom-right 8 x 8 only;
    # its box there keeps 8 x 8 of 12 x 12 (44%), the one at its top-left nothing. Of the three other tiles'
    # top-left boxes only the bottom-right tile's is visible.
    tiles = [_shape_tile(0, [[0, 0, 20, 20], [104, 104, 128, 128]], size=128)] + [
        _shape_tile(1, [[0, 0, 64, 64]], size=128) for _ in range(3)
    ]
    _, boxes, labels = mosaic(tiles, 64, (8, 8))
    _check_boxes(boxes, labels, 64)
    assert labels.tolist() == [0, 1] and boxes.tolist() == [[0, 0, 8, 8], [8, 8, 40, 40]]
    _, boxes, labels = mosaic(tiles, 64, (8, 8), min_visibility=0.5)  # 44% visible: dropped with its label
    assert labels.tolist() == [1] and boxes.tolist() == [[8, 8, 40, 40]]


def test_mixup_blends_and_keeps_the_boxes_of_both():
    a = _shape_tile(0, [[4, 4, 20, 20]])
    b = _shape_tile(1, [[30, 30, 50, 60], [0, 40, 10, 50]])
    image, boxes, labels = mixup(a, b, 0.5)
    assert torch.allclose(image, 0.5 * a[0] + 0.5 * b[0])
    assert torch.equal(boxes, torch.cat([a[1], b[1]])) and labels.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="one size"):
        mixup(a, _shape_tile(0, [[0, 0, 4, 4]], size=32), 0.5)


def test_mosaic_mixup_dataset_is_valid_and_seeded():
    data = MosaicMixUpDataset(Shapes(), mosaic=1.0, mixup=1.0)
    for seed in range(5):
        data.set_random_seed(seed)
        sample = data[seed]
        assert sample["image"].shape == (3, SIZE, SIZE) and sample["image_id"] == seed
        _check_boxes(sample["boxes_xyxy"], sample["labels"], SIZE)
        data.set_random_seed(seed)
        again = data[seed]
        assert torch.equal(again["image"], sample["image"]) and torch.equal(again["boxes_xyxy"], sample["boxes_xyxy"])
    plain = MosaicMixUpDataset(Shapes(), mosaic=0.0, mixup=0.0)
    plain.set_random_seed(0)
    assert len(plain[1]["labels"]) == 2  # off: the sample as the dataset gave it
    with pytest.raises(ValueError, match="mosaic=-0.1 is a probability"):
        MosaicMixUpDataset(Shapes(), mosaic=-0.1, mixup=0.0)


def _batches(loader) -> list:
    return [(b["image"], b["boxes_xyxy"]) for b in loader]


def test_mixed_batches_depend_on_seed_and_epoch_only_not_on_workers(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    dataset = MosaicMixUpDataset(Shapes(8), mosaic=0.5, mixup=0.5)
    runs = [_batches(make_loader(dataset, 2, collate_detection, workers, train=True)) for workers in (0, 0, 2)]
    for other in runs[1:]:
        for (image, boxes), (image2, boxes2) in zip(runs[0], other, strict=True):
            assert torch.equal(image, image2) and all(torch.equal(x, y) for x, y in zip(boxes, boxes2, strict=True))
    sampler = EpochSampler(8, seed=7)
    sampler.set_epoch(1)
    epoch1 = DataLoader(SeededDataset(dataset), batch_size=2, sampler=sampler, collate_fn=collate_detection)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], _batches(epoch1), strict=True))


def test_mosaic_on_raccoon_gives_valid_boxes(raccoon_data):
    dm = CocoDataModule(root=str(raccoon_data), image_size=256, batch_size=4, check_images="off", mosaic=1.0,
                        mixup=0.5)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset.dataset, MosaicMixUpDataset)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 256, 256)
    for boxes, labels in zip(batch["boxes_xyxy"], batch["labels"], strict=True):
        _check_boxes(boxes, labels, 256)
    with pytest.raises(ValueError, match="mixup=2.0 is a probability"):
        CocoDataModule(root=str(raccoon_data), mixup=2.0)


# -- the options through the CLI -------------------------------------------------------------------
CONF = Path(__file__).resolve().parents[1] / "conf"


def test_cli_fast_dev_run_with_cutmix(tmp_path):
    pytest.importorskip("jsonargparse")
    pytest.importorskip("segmentation_models_pytorch")
    from tasks.cli import run_cli
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    root = generate_masks(tmp_path / "d", SyntheticMaskSpec(num_train=4, num_val=2, size=32))
    cli = run_cli([
        "fit", "--config", str(CONF / "seg_unet_b0.yaml"), "--config", str(CONF / "seg_mixing.yaml"),
        f"--data.root={root}", "--data.image_size=32", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true",
    ])  # fmt: skip
    assert isinstance(cli.trainer.train_dataloader.dataset.dataset, CutMixDataset)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss_step"]))


def test_cli_fast_dev_run_with_mosaic_and_mixup(tmp_path):
    pytest.importorskip("jsonargparse")
    pytest.importorskip("effdet")
    from tasks.cli import run_cli

    cli = run_cli([
        "fit", "--config", str(CONF / "det_d0.yaml"), "--config", str(CONF / "det_mixing.yaml"),
        f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.fast_dev_run=true",
    ])  # fmt: skip
    loader = cli.trainer.train_dataloader
    assert isinstance(loader.dataset.dataset, MosaicMixUpDataset)
    assert (loader.dataset.dataset.mosaic, loader.dataset.dataset.mixup) == (1.0, 1.0)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
