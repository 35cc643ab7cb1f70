"""COCO-format detection data: dataset, collate and ``CocoDataModule``.

Layout read (the one of ``../shared/data/raccoon`` and of ``synthetic_coco``)::

    <root>/annotations/instances_<split>.json   # COCO json, bbox_xywh in original pixels
    <root>/<split>/images/<file_name>           # or any folder given as ``image_dir``

Rules applied while reading: sparse category ids map to contiguous labels 0..K-1 (sorted by id)
and back (``CategoryMap``); crowd annotations are not trained on (COCOeval still treats them as
"ignore" regions); images without annotations stay as negatives; grayscale, palette and RGBA
images become RGB; boxes are clipped to the image and the degenerate ones dropped with one
warning that counts them (and marked as crowd, i.e. "ignore", for COCOeval: a zero-size box can
never be found); a placeholder ``_background_`` category is left out (``CategoryMap``); missing and
unreadable image files are found before training and listed in one error, or left out with their
annotations (``skip_unreadable``; :mod:`tasks.common.preflight`). The json itself is checked by
:func:`tasks.common.checks.sanitize_coco` (duplicate image ids, unknown image or category ids, bad
bboxes are errors; annotation ids that are 0, missing or duplicated are renumbered).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.common.images import find_images
from tasks.common.mixing import check_probability
from tasks.common.preflight import CheckMode, find_unreadable, unreadable_error, warn_skipped
from tasks.common.progressive import ProgressiveSchedule, StagedTransform
from tasks.common.randaugment import RandAugmentSpec
from tasks.common.sampling import make_loader
from tasks.detection.boxes import clip_xyxy, xywh_to_xyxy
from tasks.detection.categories import CategoryMap
from tasks.detection.io import leave_out_images, load_coco, load_rgb
from tasks.detection.mixing import MosaicMixUpDataset
from tasks.detection.synthetic import SyntheticCocoSpec, ensure_synthetic_coco
from tasks.detection.transforms import build_det_transforms, letterbox_scale, letterbox_scales


class CocoDetection(Dataset[dict[str, Any]]):
    """One COCO split as ``{"image", "boxes_xyxy", "labels", "image_id", "img_scale", "img_size", "file_name"}``.

    ``image`` is the letterboxed, normalised ``3xSxS`` tensor; ``boxes_xyxy`` are in its pixels;
    ``img_size`` (original ``(w, h)``) maps predictions back to the original image
    (:func:`~tasks.detection.transforms.letterbox_scales`); ``img_scale`` is the longer side's factor.

    Args:
        annotation_file: The split's COCO json.
        image_dir: The folder its ``file_name`` values are relative to.
        transforms: The albumentations pipeline (:func:`~tasks.detection.transforms.build_det_transforms`).
        image_size: The letterbox side.
        category_map: Labels <-> category ids (default: from this json).
        check_images: ``full``/``header``: open every listed image now (see :mod:`tasks.common.preflight`);
            ``off``: only check that the files exist.
        skip_unreadable: Leave out missing and unreadable images, and their annotations (one warning),
            instead of raising.
    """

    def __init__(
        self, annotation_file: str | Path, image_dir: str | Path, transforms: A.Compose,
        image_size: int, category_map: CategoryMap | None = None, check_images: CheckMode = "off",
        skip_unreadable: bool = False,
    ) -> None:  # fmt: skip
        self.coco = load_coco(annotation_file)
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.image_size = image_size
        cats = self.coco.loadCats(self.coco.getCatIds())
        self.category_map = category_map or CategoryMap.from_categories(cats, annotation_file)
        self._check_files(check_images, skip_unreadable)
        self.image_ids = sorted(self.coco.getImgIds())
        self.read_fix = (
            f"re-save or re-download it, or set skip_unreadable: true in the data config (with check_images: full) "
            f"to leave it and its annotations out; deleting the file alone is not enough: {self.annotation_file.name} "
            "still lists it"
        )
        self.targets = [self._target(i) for i in self.image_ids]
        self.num_dropped = sum(t[2] for t in self.targets)
        if self.num_dropped:
            warnings.warn(f"dropped {self.num_dropped} degenerate box(es) (zero or negative size after clipping to "
                          f"the image) in {annotation_file}", UserWarning, stacklevel=2)  # fmt: skip

    def _check_files(self, mode: CheckMode, skip: bool) -> None:
        """Every listed image must exist (and, with ``mode``, be readable), or be left out with ``skip``."""
        files = {i: self.image_dir / self.coco.imgs[i]["file_name"] for i in self.coco.getImgIds()}
        bad = {f: "missing" for f in files.values() if not f.is_file()}
        if mode == "off" and skip:
            mode = "full"  # skipping needs the check
        existing = [f for f in files.values() if f not in bad]
        bad.update(find_unreadable(existing, mode, f"checking {len(existing)} images of {self.annotation_file.name}"))
        if not bad:
            return
        json_name = self.annotation_file.name
        if skip:
            removed = leave_out_images(self.coco, {i for i, f in files.items() if f in bad})
            warn_skipped(bad, len(files), str(self.image_dir), f" and their {removed} annotation(s) ({json_name})")
            if not self.coco.getImgIds():
                raise ValueError(f"no readable images left in {self.image_dir} ({json_name})")
            return
        fix = (f"Set skip_unreadable: true in the data config (data.init_args.skip_unreadable=true) to leave them and "
               f"their annotations out, or replace the files; to delete one, remove it from {self.image_dir} AND its "
               f"image entry and annotations from {self.annotation_file}.")  # fmt: skip
        if all(reason == "missing" for reason in bad.values()):
            names = [f.name for f in sorted(bad)]
            raise FileNotFoundError(f"{len(bad)} image file(s) listed in {self.annotation_file} are missing from "
                                    f"{self.image_dir}: {', '.join(names[:5])}{' ...' if len(bad) > 5 else ''}. "
                                    f"{fix}")  # fmt: skip
        raise unreadable_error(bad, len(files), f"{self.image_dir} (listed in {json_name})", fix, self.image_dir)

    def _target(self, image_id: int) -> tuple[np.ndarray, np.ndarray, int]:
        info = self.coco.imgs[image_id]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        for ann in anns:
            if ann["category_id"] in self.category_map.ignored_ids:  # a placeholder "background" category
                ann["iscrowd"] = 1
        anns = [a for a in anns if not a["iscrowd"]]
        boxes = xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float32))
        try:
            labels = np.array([self.category_map.to_label(a["category_id"]) for a in anns], dtype=np.int64)
        except KeyError as e:  # a val/test json with a category the training json does not have
            raise ValueError(f"{self.annotation_file}: {e.args[0]} (the categories of the training json); use the "
                             "same 'categories' in every split") from None  # fmt: skip
        boxes, keep = clip_xyxy(boxes, float(info["width"]), float(info["height"]))
        for ann, kept in zip(anns, keep.tolist(), strict=True):
            if not kept:  # COCOeval: an ignore region rather than a box that can never be found
                ann["iscrowd"] = 1
        return boxes[keep], labels[keep], int((~keep).sum())

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        image = load_rgb(path, self.read_fix)
        h, w = image.shape[:2]
        boxes, labels, _ = self.targets[index]
        # The json size may disagree with the file (re-encoded images): clip to what was read.
        boxes, keep = clip_xyxy(boxes, float(w), float(h))
        out = self.transforms(image=image, bboxes=boxes[keep], labels=labels[keep])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "boxes_xyxy": torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64)),
            "image_id": image_id,
            "img_scale": letterbox_scale(w, h, self.image_size),
            "img_size": (w, h),
            "file_name": str(path),
        }


class ImageFolderDataset(Dataset[dict[str, Any]]):
    """Unannotated images of a folder (sorted by name) for prediction.

    Args:
        folder: The images.
        image_size: The letterbox side.
        image_ids: ``file name -> image id`` (e.g. from the COCO json that lists these images), so results can
            be scored against it; other files get ids above the largest. Default: 1-based position.
        check_images: Open every image first (:mod:`tasks.common.preflight`); ``off`` reads them lazily.
        skip_unreadable: Leave out unreadable images (one warning) instead of raising.
    """

    def __init__(
        self, folder: str | Path, image_size: int, image_ids: dict[str, int] | None = None,
        check_images: CheckMode = "off", skip_unreadable: bool = False,
    ) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.files = find_images(self.folder, "prediction")
        if check_images != "off" or skip_unreadable:
            bad = find_unreadable(self.files, "full" if check_images == "off" else check_images,
                                  f"checking {len(self.files)} images")  # fmt: skip
            if bad and not skip_unreadable:
                fix = "Set skip_unreadable: true in the data config to predict the others, or replace the files."
                raise unreadable_error(bad, len(self.files), str(self.folder), fix, self.folder)
            if bad:
                warn_skipped(bad, len(self.files), str(self.folder))
                self.files = [f for f in self.files if f not in bad]
        self.image_size = image_size
        self.transforms = build_det_transforms("predict", image_size)
        next_id = max(image_ids.values(), default=0) + 1 if image_ids else 1
        self.image_ids: list[int] = []
        for f in self.files:
            if image_ids and f.name in image_ids:
                self.image_ids.append(image_ids[f.name])
            else:
                self.image_ids.append(next_id)
                next_id += 1
        if image_ids and next_id > max(image_ids.values()) + 1:
            extra = next_id - max(image_ids.values()) - 1
            warnings.warn(f"{extra} image(s) in {self.folder} are not in the annotation file; they get new ids "
                          f"from {max(image_ids.values()) + 1}", UserWarning, stacklevel=2)  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_rgb(self.files[index])
        h, w = image.shape[:2]
        out = self.transforms(image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "image_id": self.image_ids[index],
            "img_scale": letterbox_scale(w, h, self.image_size),
            "img_size": (w, h),
            "file_name": str(self.files[index]),
        }


def image_ids_by_name(annotation_file: str | Path) -> dict[str, int]:
    """``file name -> image id`` of the images a COCO json lists directly (not in sub-folders)."""
    images = json.loads(Path(annotation_file).read_text()).get("images") or []
    return {str(im["file_name"]): int(im["id"]) for im in images if "/" not in str(im["file_name"])}


def collate_detection(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and per-image scalars; keep the variable-length ``boxes_xyxy``/``labels`` as lists."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "img_scale": torch.tensor([s["img_scale"] for s in samples], dtype=torch.float32),
        "img_size": torch.tensor([s["img_size"] for s in samples], dtype=torch.float32),
    }
    for key in ("boxes_xyxy", "labels", "file_name"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


def _train_transforms(
    image_size: int, magnitude: float | None, *, augment: bool, randaugment: RandAugmentSpec | None
) -> A.Compose:
    """The training pipeline at ``image_size``, RandAugment at ``magnitude`` (a progressive stage's or the data's)."""
    if randaugment is not None and magnitude is not None:
        randaugment = replace(randaugment, magnitude=magnitude)
    return build_det_transforms("train", image_size, augment, randaugment)


class CocoDataModule(L.LightningDataModule):
    """Train/val(/test/predict) COCO splits, letterboxed to ``image_size``.

    Args:
        root: Dataset folder with ``annotations/instances_<split>.json``.
        image_size: Square model input side (a multiple of 128 for EfficientDet).
        batch_size: Images per batch (per device).
        num_workers: DataLoader workers.
        train_split: Split name of the training json/folder.
        val_split: Split evaluated every epoch (COCO mAP).
        test_split: Split for ``trainer.test``; defaults to ``val_split``.
        image_dir: Image folder relative to ``root``; ``{split}`` is replaced by the split name.
        augment: Train-time flip/scale/colour jitter.
        synthetic: Generate a synthetic shapes dataset with this spec into ``root`` when the
            annotation files are absent (the quickstart); ``None`` reads ``root`` as is.
        predict_dir: Folder of images for ``trainer.predict``. When it is a split's image folder, the results
            use the image ids of that split's json (so ``pycocotools`` scores them against it directly).
        predict_split: Predict the images of this split's json instead (results use its image ids).
        check_images: Before a stage starts, open every image of its splits: ``full`` (default) decodes them
            (catches truncated files), ``header`` checks headers only, ``off`` only checks that files exist.
            All bad files are listed in one error.
        skip_unreadable: Leave out missing and unreadable images and their annotations (one warning counts
            them) instead of stopping.
        mosaic: Probability that a training sample is a 2x2 mosaic of four images (0 off;
            :mod:`tasks.detection.mixing`, docs/training.md).
        mixup: Probability that a training sample is blended with another (MixUp), boxes of both kept (0 off).
        randaugment: RandAugment on the training images, ``{num_ops: 2, magnitude: 9}`` (optional ``ops``: a
            subset of :data:`tasks.common.randaugment.OPS`); boxes follow the geometric ops, clipped, and the
            boxes that leave the image are dropped with their labels. ``None`` (default): off.
    """

    #: ``image_size`` must be a multiple of this (the model's coarsest stride), for :attr:`size_reason`.
    size_multiple: ClassVar[int] = 128
    size_reason: ClassVar[str] = "EfficientDet's P7 stride"
    #: The dataset of one split and the collate function of its batches (a sibling task's data module
    #: replaces them: :class:`tasks.instance.data.CocoInstanceDataModule`).
    dataset_class: ClassVar[type[CocoDetection]] = CocoDetection
    collate = staticmethod(collate_detection)

    def __init__(
        self, root: str = "data/coco", image_size: int = 512, batch_size: int = 8, num_workers: int = 0,
        train_split: str = "train", val_split: str = "val", test_split: str | None = None,
        image_dir: str = "{split}/images", augment: bool = True, synthetic: SyntheticCocoSpec | None = None,
        predict_dir: str | None = None, predict_split: str | None = None, check_images: CheckMode = "full",
        skip_unreadable: bool = False, mosaic: float = 0.0, mixup: float = 0.0,
        randaugment: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if image_size % self.size_multiple:
            raise ValueError(f"image_size must be a multiple of {self.size_multiple} ({self.size_reason}), got "
                             f"{image_size}")  # fmt: skip
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.image_dir = image_dir
        self.augment = augment
        self.synthetic = synthetic
        self.predict_dir, self.predict_split = predict_dir, predict_split
        self.check_images, self.skip_unreadable = check_images, skip_unreadable
        self.mosaic, self.mixup = check_probability("mosaic", mosaic), check_probability("mixup", mixup)
        self.datasets: dict[str, Dataset[dict[str, Any]]] = {}
        self._category_map: CategoryMap | None = None
        self.randaugment = RandAugmentSpec.parse(randaugment)
        self._progressive: ProgressiveSchedule | None = None

    def annotation_file(self, split: str) -> Path:
        """``<root>/annotations/instances_<split>.json``."""
        return self.root / "annotations" / f"instances_{split}.json"

    @property
    def category_map(self) -> CategoryMap:
        """Label <-> category id map, from the training json (or the val json when there is no train json)."""
        if self._category_map is None:
            self.ensure_synthetic()
            path = self.annotation_file(self.splits["train"])
            if not path.is_file():
                path = self.annotation_file(self.splits["val"])
            if not path.is_file():
                raise FileNotFoundError(f"no {self.annotation_file(self.splits['train'])} or {path}; set `root`, or "
                                        "`synthetic` to generate a dataset there")  # fmt: skip
            self._category_map = CategoryMap.from_categories(json.loads(path.read_text())["categories"], path)
        return self._category_map

    @property
    def num_classes(self) -> int:
        """Number of categories (linked to the model's ``num_classes`` by the CLI)."""
        if self.synthetic is not None and self._category_map is None:
            return self.synthetic.num_classes  # known without generating anything
        return len(self.category_map)

    def ensure_synthetic(self) -> None:
        """Generate the ``synthetic`` dataset into ``root`` when configured and absent."""
        if self.synthetic is not None:
            ensure_synthetic_coco(self.root, self.synthetic)

    def _transforms(self, split_key: str) -> Any:  # noqa: ANN401 - an albumentations pipeline or a staged one
        if split_key != "train":
            return build_det_transforms("val", self.image_size)
        build = partial(_train_transforms, augment=self.augment, randaugment=self.randaugment)
        magnitude = self.randaugment.magnitude if self.randaugment is not None else None
        if self._progressive is not None:
            return StagedTransform(self._progressive, build, self.image_size, magnitude)
        return build(self.image_size, magnitude)

    def set_progressive(self, schedule: ProgressiveSchedule) -> None:
        """Letterbox each epoch's training images to its stage's size, with its RandAugment magnitude.

        Sizes must be multiples of 128 (checked when the schedule is resolved); validation and test stay at
        ``image_size``. The detector regenerates its anchors for each training size
        (:mod:`tasks.detection.sizes`).
        """
        if schedule.sets("magnitude") and self.randaugment is None:
            raise ValueError("progressive magnitude sets RandAugment's magnitude, but RandAugment is off: set "
                             "data.init_args.randaugment (e.g. {num_ops: 2, magnitude: 9})")  # fmt: skip
        if schedule.keep_scale:
            raise ValueError("progressive keep_scale is for segmentation crops; detection letterboxes whole images, "
                             "so a smaller stage is a lower resolution: leave keep_scale out")  # fmt: skip
        bad = [s.image_size for s in schedule.stages if s.image_size is not None and s.image_size % 128]
        if bad:
            raise ValueError(f"progressive image sizes {bad} are not multiples of 128 (EfficientDet's P7 stride)")
        self._progressive = schedule
        if "train" in self.datasets:
            self.datasets["train"].transforms = self._transforms("train")  # type: ignore[attr-defined]

    def prepare_data(self) -> None:
        """Generate the synthetic dataset once (on local rank 0) when configured and absent."""
        self.ensure_synthetic()

    def _dataset(self, split_key: str, split: str | None = None) -> CocoDetection:
        split = split or self.splits[split_key]
        transforms = self._transforms(split_key)
        image_dir = self.root / self.image_dir.format(split=split)
        return self.dataset_class(self.annotation_file(split), image_dir, transforms, self.image_size,
                                  self.category_map, self.check_images, self.skip_unreadable)  # fmt: skip

    def setup(self, stage: str) -> None:
        """Build the datasets ``stage`` needs (each checked first, see ``check_images``)."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}[stage]
        for key in wanted:
            if key not in self.datasets:
                self.datasets[key] = self._dataset(key)
        if stage == "predict":
            if self.predict_split is not None:
                self.datasets["predict"] = self._dataset("predict", self.predict_split)
                return
            if self.predict_dir is None:
                raise ValueError("set `predict_dir` (a folder of images) or `predict_split` (a split) to run predict")
            self.datasets["predict"] = ImageFolderDataset(
                self.predict_dir, self.image_size, self._listed_ids(Path(self.predict_dir)), self.check_images,
                self.skip_unreadable,
            )  # fmt: skip

    def _listed_ids(self, folder: Path) -> dict[str, int] | None:
        """``file name -> image id`` of the split whose image folder ``folder`` is (``None`` for other folders)."""
        for split in dict.fromkeys(self.splits.values()):
            path = self.annotation_file(split)
            if path.is_file() and (self.root / self.image_dir.format(split=split)).resolve() == folder.resolve():
                return image_ids_by_name(path)
        return None

    def training_boxes_xyxy(self) -> np.ndarray:
        """Every training box (``(N, 4)`` xyxy) in model pixels, as letterboxed to ``image_size`` (for anchors)."""
        dataset = self.datasets.get("train") or self._dataset("train")
        out = []
        for image_id, (boxes, _, _) in zip(dataset.image_ids, dataset.targets, strict=True):  # type: ignore[attr-defined]
            info = dataset.coco.imgs[image_id]  # type: ignore[attr-defined]
            sx, sy = letterbox_scales(int(info["width"]), int(info["height"]), self.image_size)
            out.append(boxes / np.array([sx, sy, sx, sy], dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, 4), np.float32)

    def _loader(self, key: str, shuffle: bool = False) -> DataLoader[dict[str, Any]]:
        return make_loader(self.datasets[key], self.batch_size, self.collate, self.num_workers, train=shuffle)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled, augmented training batches (with ``mosaic``/``mixup``: mixed, seeded per sample)."""
        dataset = self.datasets["train"]
        if self.mosaic or self.mixup:
            if self.collate is not collate_detection:  # a sibling task's samples carry more than boxes
                raise ValueError(f"mosaic/mixup mix boxes only; {type(self).__name__} samples carry more (e.g. "
                                 "masks): set data.init_args.mosaic and mixup to 0")  # fmt: skip
            dataset = MosaicMixUpDataset(dataset, self.mosaic, self.mixup)
        return make_loader(dataset, self.batch_size, self.collate, self.num_workers, train=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation batches (letterbox only)."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Test batches (letterbox only)."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Batches of the images in ``predict_dir`` (or of ``predict_split``)."""
        return self._loader("predict")
