"""Segmentation data: ``<root>/<split>/images`` + ``<root>/<split>/masks`` as a LightningDataModule.

A sample is ``{"image": float CxHxW (normalised), "mask": long HxW (CxHxW multilabel), "path": str}``.
Pixels to ignore (the dataset's ``ignore_index`` value, and padding) become ``IGNORE_LABEL`` (-100,
PyTorch's cross-entropy default), so the model never needs to know which value a dataset used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tasks.common.images import default_stats, find_images, read_image
from tasks.common.mixing import check_probability
from tasks.common.preflight import CheckMode, find_unreadable, unreadable_error, warn_skipped
from tasks.common.progressive import ProgressiveSchedule, StagedTransform
from tasks.common.randaugment import RandAugmentSpec
from tasks.common.sampling import make_loader
from tasks.segmentation.classes import read_classes_json, resolve_classes
from tasks.segmentation.cutmix import CutMixDataset
from tasks.segmentation.io import check_pair, find_pairs, read_mask
from tasks.segmentation.synthetic import SyntheticMaskSpec, ensure_masks, holds_other_data
from tasks.segmentation.transforms import EvalResize, build_transforms

IGNORE_LABEL = -100
Mode = Literal["binary", "multiclass", "multilabel"]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """HxWxC float [0, 1] array -> normalised CxHxW tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class MaskDataset(Dataset[dict[str, Any]]):
    """Image/mask pairs, validated when read, through an albumentations pipeline.

    Args:
        pairs: ``(image_path, mask_path)``; a ``None`` mask gives image-only samples (prediction).
        transform: Pipeline called as ``transform(image=..., mask=...)``.
        num_classes: Class count (mask values must be below it, or equal ``ignore_index``).
        in_channels: Image channels.
        mean: Per-channel normalisation mean (images in [0, 1]).
        std: Per-channel normalisation std.
        mode: ``multilabel`` reads one mask plane per class.
        ignore_index: Mask value to ignore (becomes ``IGNORE_LABEL``).
        class_colors: ``[r, g, b]`` per class id, for colour masks.
        label_map: Raw mask value -> class id.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        transform: A.Compose,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        mode: Mode = "multiclass",
        ignore_index: int | None = None,
        class_colors: Sequence[Sequence[int]] | None = None,
        label_map: Mapping[int, int] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        self.num_classes, self.in_channels, self.mode = num_classes, in_channels, mode
        self.mean, self.std = list(mean), list(std)
        self.ignore_index, self.class_colors, self.label_map = ignore_index, class_colors, label_map

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path, self.in_channels)
        if mask_path is None:
            out = self.transform(image=image)
            return {"image": normalize(out["image"], self.mean, self.std), "path": str(image_path)}
        multilabel = self.mode == "multilabel"
        mask = read_mask(mask_path, multilabel=multilabel, class_colors=self.class_colors, label_map=self.label_map)
        check_pair(
            image, mask, image_path, mask_path,
            num_classes=self.num_classes, ignore_index=self.ignore_index, multilabel=multilabel,
        )  # fmt: skip
        out = self.transform(image=image, mask=mask)
        target = torch.from_numpy(np.array(out["mask"], copy=True)).long()
        if multilabel:
            # Any non-zero value but the ignore value marks the class present.
            present = (target != 0).long().masked_fill(target == IGNORE_LABEL, IGNORE_LABEL)  # shifted-in pixels
            if self.ignore_index is not None:
                present = present.masked_fill(target == self.ignore_index, IGNORE_LABEL)
            target = present.permute(2, 0, 1)
        elif self.ignore_index is not None:
            target = target.masked_fill(target == self.ignore_index, IGNORE_LABEL)
        return {"image": normalize(out["image"], self.mean, self.std), "mask": target, "path": str(image_path)}


def collate_padded(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding differing sizes at the bottom/right (images 0, masks ``IGNORE_LABEL``).

    ``"size"`` keeps each sample's ``(height, width)`` so predictions can be cropped back.
    """
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)

    def pad(t: Tensor, value: float) -> Tensor:
        return F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value)

    batch: dict[str, Any] = {
        "image": torch.stack([pad(s["image"], 0.0) for s in samples]),
        "path": [s["path"] for s in samples],
        "size": torch.tensor([list(s["image"].shape[-2:]) for s in samples]),
    }
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([pad(s["mask"], IGNORE_LABEL) for s in samples])
    return batch


def _split_transforms(
    split: str, image_size: int, magnitude: float | None, *, randaugment: RandAugmentSpec | None,
    scale_from: int | None = None, crop_scale: tuple[float, float] = (0.25, 1.0), **kwargs: Any,
) -> A.Compose:  # fmt: skip
    """:func:`build_transforms` with RandAugment at ``magnitude`` (a progressive stage's, or the data's own).

    With ``scale_from`` (the data's ``image_size``), the crop area scales with ``(image_size / scale_from)^2``,
    so that a smaller stage crops a smaller region at the same pixel scale (progressive ``keep_scale``).
    """
    if randaugment is not None and magnitude is not None:
        randaugment = replace(randaugment, magnitude=magnitude)
    if scale_from is not None:
        area = (image_size / scale_from) ** 2
        crop_scale = (min(1.0, crop_scale[0] * area), min(1.0, crop_scale[1] * area))
    return build_transforms(split, image_size, randaugment=randaugment, crop_scale=crop_scale,
                            **kwargs)  # type: ignore[arg-type]  # fmt: skip


class MaskDataModule(L.LightningDataModule):
    """Folders of images and class-id (or colour) masks, with a seeded val split when there is no ``val``.

    Layout: ``<root>/train/{images,masks}``, optional ``<root>/val/...`` and ``<root>/test/...``, and an
    optional ``<root>/classes.json`` (``{"classes": [...], "ignore_index": ..., "colors": [[r, g, b], ...]}``)
    that fills whatever is not given here. Masks share their image's file stem.

    Args:
        root: Dataset folder.
        num_classes: Number of classes (2 for ``binary``: background and foreground).
        class_names: One name per class (for logs and overlays). A last name for ``ignore_index`` (a void
            label listed among the classes) is dropped: it is not a class.
        class_weights: Per-class loss weights (``ce``, ``dice``), one per class; default from ``classes.json``
            (``"class_weights"``). Linked to the model.
        class_colors: ``[r, g, b]`` of each class id when masks are colour images.
        mode: ``binary`` (ids 0/1), ``multiclass`` (ids 0..n-1) or ``multilabel`` (one mask plane per class).
        ignore_index: Mask value excluded from loss and metrics (e.g. 255).
        label_map: Raw mask value -> class id, e.g. ``{255: 1}`` for 0/255 masks.
        in_channels: Image channels (1 grayscale, 3 RGB, any for ``.npy`` images).
        image_size: Training crop side; evaluation resize side with ``eval_resize="resize"``.
        eval_resize: ``pad`` (default) evaluates val/test images at their own size, aspect ratio kept (the
            model pads to a multiple of 32 and crops back; a batch of differing sizes is padded with the ignore
            label); ``resize`` squashes them to ``image_size`` x ``image_size``.
        batch_size: Training batch size.
        eval_batch_size: Val/test batch size (default ``batch_size``; predict always uses 1).
        num_workers: DataLoader workers.
        val_fraction: Share of ``train`` held out when there is no ``val`` folder.
        seed: Seed of that split.
        train_repeats: Each training image is seen this many times per epoch (different random crops),
            for datasets with few, large images.
        crop_scale: Area range of the random training crop.
        vertical_flip: Also flip vertically.
        color_jitter: Colour jitter strength (0 off).
        mean: Normalisation mean per channel (default ImageNet's, averaged for non-RGB).
        std: Normalisation std per channel.
        predict_dir: Folder of images for ``predict`` (default ``<root>/test/images`` or the val images).
        synthetic: Generate the synthetic shapes dataset of this spec into ``root`` on first use (the
            quickstart); ignored when ``root`` holds other data, which is read as is.
        check_images: Before a stage starts, open every image and mask of its splits: ``full`` (default)
            decodes them (catches truncated files), ``header`` checks headers only (fast), ``off`` skips the
            check (a bad file then stops the run when it is reached). All bad files are listed at once.
        skip_unreadable: Leave out the samples whose image or mask cannot be read (one warning counts
            them) instead of stopping with the list.
        cutmix: Probability that a training sample gets a box of another pasted in, with its mask (CutMix;
            0 off; :mod:`tasks.segmentation.cutmix`, docs/training.md).
        randaugment: RandAugment on the training crops, ``{num_ops: 2, magnitude: 9}`` (optional ``ops``: a
            subset of :data:`tasks.common.randaugment.OPS`); geometric ops move the masks too (nearest), and
            pixels shifted in from outside are ignored by the loss. ``None`` (default): off.
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        class_weights: list[float] | None = None,
        class_colors: list[list[int]] | None = None,
        mode: Mode = "multiclass",
        ignore_index: int | None = None,
        label_map: dict[int, int] | None = None,
        in_channels: int = 3,
        image_size: int = 256,
        eval_resize: EvalResize = "pad",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        train_repeats: int = 1,
        crop_scale: tuple[float, float] = (0.25, 1.0),
        vertical_flip: bool = False,
        color_jitter: float = 0.2,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        predict_dir: str | None = None,
        synthetic: SyntheticMaskSpec | None = None,
        check_images: CheckMode = "full",
        skip_unreadable: bool = False,
        cutmix: float = 0.0,
        randaugment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Resolved values (from classes.json, defaults) live in attributes and are linked into the model;
        # saving the raw arguments too would clash with the model's hparams when Lightning merges them.
        # (The spec is a dataclass, which a weights-only checkpoint cannot hold.)
        self.save_hyperparameters(
            ignore=["num_classes", "class_names", "class_weights", "ignore_index", "mean", "std", "synthetic"]
        )
        self.root = Path(root)
        # A config's synthetic spec (the quickstart's) with a root that holds the user's own data: read that data.
        self.synthetic = None if synthetic is None or holds_other_data(self.root) else synthetic
        synthetic = self.synthetic
        if not self.root.is_dir() and synthetic is None and predict_dir is None:
            raise FileNotFoundError(
                f"segmentation data folder {self.root} does not exist; set data root to a folder "
                "with train/images and train/masks (layout: docs/segmentation.md)"
            )
        # Known without generating anything: the spec names the classes.
        meta = read_classes_json(self.root) or ({"classes": synthetic.class_names} if synthetic else {})
        classes = resolve_classes(
            self.root, meta, num_classes=num_classes, class_names=class_names, class_weights=class_weights,
            ignore_index=ignore_index, mode=mode,
        )  # fmt: skip
        self.num_classes: int = classes.num_classes
        self.class_names: list[str] = list(classes.names)
        self.class_weights: list[float] | None = list(classes.weights) if classes.weights is not None else None
        self.ignore_index: int | None = classes.ignore_index
        self.class_colors = class_colors or meta.get("colors")
        self.mode, self.in_channels = mode, in_channels
        default_mean, default_std = default_stats(in_channels)
        self.mean: list[float] = list(mean or default_mean)
        self.std: list[float] = list(std or default_std)
        if len(self.mean) != in_channels or len(self.std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} values (in_channels), got {self.mean} / {self.std}")
        check_probability("cutmix", cutmix)
        self.datasets: dict[str, MaskDataset] = {}
        self.randaugment = RandAugmentSpec.parse(randaugment)
        self._progressive: ProgressiveSchedule | None = None

    def _transform(self, split: str) -> Any:  # noqa: ANN401 - an albumentations pipeline or a staged one
        hp = self.hparams
        build = partial(
            _split_transforms, split, randaugment=self.randaugment if split == "train" else None, fill=self.mean,
            in_channels=self.in_channels, eval_resize=hp.eval_resize, crop_scale=tuple(hp.crop_scale),
            vertical_flip=hp.vertical_flip, color_jitter=hp.color_jitter,
        )  # fmt: skip
        magnitude = self.randaugment.magnitude if self.randaugment is not None else None
        if split == "train" and self._progressive is not None:
            if self._progressive.keep_scale:
                build = partial(build, scale_from=hp.image_size)
            return StagedTransform(self._progressive, build, hp.image_size, magnitude)
        return build(hp.image_size, magnitude)

    def set_progressive(self, schedule: ProgressiveSchedule) -> None:
        """Train each epoch at its stage's crop size and RandAugment magnitude (:mod:`tasks.common.progressive`).

        The stage's crop covers the same share of the image resized to the stage's size, or with the schedule's
        ``keep_scale`` a smaller share at the data's pixel scale (``crop_scale`` x ``(size / image_size)^2``).
        Validation and test keep ``image_size`` / their own size (``eval_resize``).
        """
        if schedule.sets("magnitude") and self.randaugment is None:
            raise ValueError("progressive magnitude sets RandAugment's magnitude, but RandAugment is off: set "
                             "data.init_args.randaugment (e.g. {num_ops: 2, magnitude: 9})")  # fmt: skip
        self._progressive = schedule
        if "train" in self.datasets:
            self.datasets["train"].transform = self._transform("train")

    def _dataset(self, pairs: Sequence[tuple[Path, Path | None]], split: str) -> MaskDataset:
        transform = self._transform(split)
        return MaskDataset(
            pairs, transform, num_classes=self.num_classes, in_channels=self.in_channels, mean=self.mean,
            std=self.std, mode=self.mode, ignore_index=self.ignore_index, class_colors=self.class_colors,
            label_map=self.hparams.label_map,
        )  # fmt: skip

    def _train_val_pairs(self) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
        train = find_pairs(self.root / "train")
        if (self.root / "val").is_dir():
            return train, find_pairs(self.root / "val")
        n_val = max(1, round(len(train) * self.hparams.val_fraction))
        if n_val >= len(train):
            raise ValueError(f"{len(train)} training images cannot give a val split of {n_val}; add a val folder")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        rank_zero_info(f"no {self.root / 'val'}: holding out {n_val} of {len(train)} training images")
        return [train[i] for i in order[n_val:]], [train[i] for i in sorted(order[:n_val])]

    def prepare_data(self) -> None:
        """Generate the synthetic dataset once (on local rank 0) when configured and absent."""
        if self.synthetic is not None:
            ensure_masks(self.root, self.synthetic)

    def setup(self, stage: str) -> None:
        """Build the datasets ``stage`` needs, after the pre-flight check of their files (``check_images``)."""
        self.prepare_data()  # a no-op when the data is there (Python users may call setup alone)
        if stage in ("fit", "validate") and "val" not in self.datasets:
            train, val = self._train_val_pairs()
            if stage == "fit":  # one check (one message) over both splits
                train, val = self._readable({"train": train, "val": val}).values()
            else:
                val = self._readable({"val": val})["val"]
            self.datasets["train"] = self._dataset(train * self.hparams.train_repeats, "train")
            self.datasets["val"] = self._dataset(val, "val")
        if stage == "test" and "test" not in self.datasets:
            test_dir = self.root / "test"
            pairs = find_pairs(test_dir) if test_dir.is_dir() else self._train_val_pairs()[1]
            self.datasets["test"] = self._dataset(self._readable({"test": pairs})["test"], "test")
        if stage == "predict" and "predict" not in self.datasets:
            images = [(p, None) for p in find_images(self._predict_dir())]
            self.datasets["predict"] = self._dataset(self._readable({"predict": images})["predict"], "predict")

    def _readable(self, splits: dict[str, list[tuple[Path, Path | None]]]) -> dict[str, list[tuple[Path, Path | None]]]:
        """``splits`` without the pairs whose image or mask cannot be read, or an error listing every such file.

        Every file is opened (and with ``check_images: full`` decoded) once, before training: a bad file is
        then reported with all the others, not when the loader reaches it.
        """
        mode = self.hparams.check_images
        if mode == "off" and self.hparams.skip_unreadable:
            mode = "full"  # skipping needs the check
        files = {f for pairs in splits.values() for pair in pairs for f in pair if f is not None}
        bad = find_unreadable(files, mode, f"checking {len(files)} files of {', '.join(splits)}")
        if not bad:
            return splits
        if not self.hparams.skip_unreadable:
            fix = ("Set skip_unreadable: true in the data config (data.init_args.skip_unreadable=true) to leave them "
                   "out, or re-save them, or delete each bad image together with its mask.")  # fmt: skip
            raise unreadable_error(bad, len(files), f"{self.root} ({', '.join(splits)})", fix, self.root)
        kept = {k: [p for p in pairs if p[0] not in bad and p[1] not in bad] for k, pairs in splits.items()}
        dropped = sum(len(v) for v in splits.values()) - sum(len(v) for v in kept.values())
        warn_skipped(bad, len(files), f"{self.root} ({', '.join(splits)})", f"; {dropped} sample(s) dropped")
        for split, pairs in kept.items():
            if not pairs:
                raise ValueError(f"no readable samples left in the {split} split of {self.root}; see the files above")
        return kept

    def _predict_dir(self) -> Path:
        if self.hparams.predict_dir:
            return Path(self.hparams.predict_dir)
        for split in ("test", "val"):
            if (self.root / split / "images").is_dir():
                return self.root / split / "images"
        return self.root / "train" / "images"

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader[dict[str, Any]]:
        return make_loader(self.datasets[split], batch_size, collate_padded, self.hparams.num_workers, train=shuffle)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled random crops (with ``cutmix``: mixed, seeded per sample)."""
        if not self.hparams.cutmix:
            return self._loader("train", self.hparams.batch_size, shuffle=True)
        dataset = CutMixDataset(self.datasets["train"], self.hparams.cutmix)
        return make_loader(dataset, self.hparams.batch_size, collate_padded, self.hparams.num_workers, train=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation images (resized or at their own size)."""
        return self._loader("val", self.hparams.eval_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """``test`` folder, or the val split when there is none."""
        return self._loader("test", self.hparams.eval_batch_size or self.hparams.batch_size)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Images at their own size, one at a time (sizes differ; large ones are tiled by the model)."""
        return self._loader("predict", 1)

    def denormalize(self, image: Tensor) -> Tensor:
        """Normalised CxHxW (or BxCxHxW) tensor -> [0, 1], for display."""
        mean = torch.tensor(self.mean, device=image.device)[:, None, None]
        std = torch.tensor(self.std, device=image.device)[:, None, None]
        return (image * std + mean).clamp(0, 1)
