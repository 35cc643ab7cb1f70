"""COCO-format detection data: dataset, collate and ``CocoDataModule``.

Layout read (the one of ``../shared/data/raccoon`` and of ``synthetic_coco``)::

    <root>/annotations/instances_<split>.json   # COCO json, bbox_xywh in original pixels
    <root>/<split>/images/<file_name>           # or any folder given as ``image_dir``

Rules applied while reading: sparse category ids map to contiguous labels 0..K-1 (sorted by id)
and back (``CategoryMap``); crowd annotations are not trained on (COCOeval still treats them as
"ignore" regions); images without annotations stay as negatives; grayscale, palette and RGBA
images become RGB; boxes are clipped to the image and the degenerate ones dropped with one
warning that counts them (and marked as crowd, i.e. "ignore", for COCOeval: a zero-size box can
never be found); a missing image file is an error naming it. The json itself is checked by
:func:`tasks.common.checks.sanitize_coco` (duplicate image ids, unknown image or category ids, bad
bboxes are errors; annotation ids that are 0, missing or duplicated are renumbered).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from tasks.common.checks import reading, sanitize_coco
from tasks.common.images import find_images, read_image
from tasks.common.sampling import make_loader
from tasks.detection.boxes import clip_xyxy, xywh_to_xyxy
from tasks.detection.synthetic import SyntheticCocoSpec, ensure_synthetic_coco
from tasks.detection.transforms import build_det_transforms, letterbox_scale


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous training labels ``0..K-1`` <-> COCO ``category_id`` (sorted ascending)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict[str, Any]]) -> CategoryMap:
        """Build from a COCO ``categories`` list."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats))

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_label(self, category_id: int) -> int:
        """The contiguous label of a COCO ``category_id``."""
        try:
            return self.category_ids.index(int(category_id))
        except ValueError:
            raise KeyError(f"category_id {category_id} is not among the known ids {list(self.category_ids)}") from None

    def to_category_id(self, label: int) -> int:
        """The COCO ``category_id`` of a contiguous label."""
        return self.category_ids[int(label)]


def load_coco(annotation_file: str | Path) -> COCO:
    """``pycocotools.COCO`` without its progress prints; a missing file is a clear error."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist; expected <root>/annotations/"
                                "instances_<split>.json (set `root`/`train_split`/`val_split`)")
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


def load_rgb(path: Path) -> np.ndarray:
    """Read an image as ``HxWx3`` uint8 RGB (grayscale, palette, 16-bit and RGBA are converted)."""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.suffix.lower() == ".npy":  # an array: the segmentation reader's rules, scaled to 8 bits
        return (read_image(path, 3) * 255).round().clip(0, 255).astype(np.uint8)
    with reading(path, "image"), Image.open(path) as im:  # corrupt/truncated: a ValueError naming the file
        if im.mode in ("I;16", "I;16B", "I"):  # 16/32-bit grey: rescale rather than clip to 255
            arr = np.asarray(im, dtype=np.float32)
            im = Image.fromarray((255 * arr / max(float(arr.max()), 1.0)).astype(np.uint8))
        return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only)


class CocoDetection(Dataset[dict[str, Any]]):
    """One COCO split as ``{"image", "boxes_xyxy", "labels", "image_id", "img_scale", "img_size"}`` samples.

    ``image`` is the letterboxed, normalised ``3xSxS`` tensor; ``boxes_xyxy`` are in its pixels;
    ``img_scale`` (original pixels per model pixel) and ``img_size`` (original ``(w, h)``) map
    predictions back to the original image.
    """

    def __init__(
        self, annotation_file: str | Path, image_dir: str | Path, transforms: A.Compose,
        image_size: int, category_map: CategoryMap | None = None,
    ) -> None:
        self.coco = load_coco(annotation_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.image_size = image_size
        self.category_map = category_map or CategoryMap.from_categories(self.coco.loadCats(self.coco.getCatIds()))
        self.image_ids = sorted(self.coco.getImgIds())
        missing = [self.coco.imgs[i]["file_name"] for i in self.image_ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) listed in {annotation_file} are missing from "
                                    f"{self.image_dir}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.annotation_file = Path(annotation_file)
        self.targets = [self._target(i) for i in self.image_ids]
        self.num_dropped = sum(t[2] for t in self.targets)
        if self.num_dropped:
            warnings.warn(f"dropped {self.num_dropped} degenerate box(es) (zero or negative size after clipping to "
                          f"the image) in {annotation_file}", UserWarning, stacklevel=2)

    def _target(self, image_id: int) -> tuple[np.ndarray, np.ndarray, int]:
        info = self.coco.imgs[image_id]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float32))
        try:
            labels = np.array([self.category_map.to_label(a["category_id"]) for a in anns], dtype=np.int64)
        except KeyError as e:  # a val/test json with a category the training json does not have
            raise ValueError(f"{self.annotation_file}: {e.args[0]} (the categories of the training json); use the "
                             "same 'categories' in every split") from None
        boxes, keep = clip_xyxy(boxes, float(info["width"]), float(info["height"]))
        for ann, kept in zip(anns, keep.tolist(), strict=True):
            if not kept:  # COCOeval: an ignore region rather than a box that can never be found
                ann["iscrowd"] = 1
        return boxes[keep], labels[keep], int((~keep).sum())

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        image = load_rgb(self.image_dir / self.coco.imgs[image_id]["file_name"])
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
        }


class ImageFolderDataset(Dataset[dict[str, Any]]):
    """Unannotated images of a folder (sorted by name) for prediction; ``image_id`` is 1-based position."""

    def __init__(self, folder: str | Path, image_size: int) -> None:
        self.folder = Path(folder)
        self.files = find_images(self.folder, "prediction")
        self.image_size = image_size
        self.transforms = build_det_transforms("predict", image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_rgb(self.files[index])
        h, w = image.shape[:2]
        out = self.transforms(image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "image_id": index + 1,
            "img_scale": letterbox_scale(w, h, self.image_size),
            "img_size": (w, h),
            "file_name": str(self.files[index]),
        }


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
        predict_dir: Folder of images for ``trainer.predict``.
    """

    def __init__(
        self, root: str = "data/coco", image_size: int = 512, batch_size: int = 8, num_workers: int = 0,
        train_split: str = "train", val_split: str = "val", test_split: str | None = None,
        image_dir: str = "{split}/images", augment: bool = True, synthetic: SyntheticCocoSpec | None = None,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        if image_size % 128:
            raise ValueError(f"image_size must be a multiple of 128 (EfficientDet's P7 stride), got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.image_dir = image_dir
        self.augment = augment
        self.synthetic = synthetic
        self.predict_dir = predict_dir
        self.datasets: dict[str, Dataset[dict[str, Any]]] = {}
        self._category_map: CategoryMap | None = None

    def annotation_file(self, split: str) -> Path:
        """``<root>/annotations/instances_<split>.json``."""
        return self.root / "annotations" / f"instances_{split}.json"

    @property
    def category_map(self) -> CategoryMap:
        """Label <-> category id map, from the training json (or the val json when there is no train json)."""
        if self._category_map is None:
            if self.synthetic is not None:
                ensure_synthetic_coco(self.root, self.synthetic)
            path = self.annotation_file(self.splits["train"])
            if not path.is_file():
                path = self.annotation_file(self.splits["val"])
            if not path.is_file():
                raise FileNotFoundError(f"no {self.annotation_file(self.splits['train'])} or {path}; set `root`, or "
                                        "`synthetic` to generate a dataset there")
            self._category_map = CategoryMap.from_categories(json.loads(path.read_text())["categories"])
        return self._category_map

    @property
    def num_classes(self) -> int:
        """Number of categories (linked to the model's ``num_classes`` by the CLI)."""
        if self.synthetic is not None and self._category_map is None:
            return self.synthetic.num_classes  # known without generating anything
        return len(self.category_map)

    def prepare_data(self) -> None:
        """Generate the synthetic dataset once (on local rank 0) when configured and absent."""
        if self.synthetic is not None:
            ensure_synthetic_coco(self.root, self.synthetic)

    def _dataset(self, split_key: str) -> CocoDetection:
        split = self.splits[split_key]
        transforms = build_det_transforms("train" if split_key == "train" else "val", self.image_size, self.augment)
        image_dir = self.root / self.image_dir.format(split=split)
        return CocoDetection(self.annotation_file(split), image_dir, transforms, self.image_size, self.category_map)

    def setup(self, stage: str) -> None:
        """Build the datasets ``stage`` needs."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}[stage]
        for key in wanted:
            if key not in self.datasets:
                self.datasets[key] = self._dataset(key)
        if stage == "predict":
            if self.predict_dir is None:
                raise ValueError("set `predict_dir` (a folder of images) to run predict")
            self.datasets["predict"] = ImageFolderDataset(self.predict_dir, self.image_size)

    def _loader(self, key: str, shuffle: bool = False) -> DataLoader[dict[str, Any]]:
        return make_loader(self.datasets[key], self.batch_size, collate_detection, self.num_workers, train=shuffle)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled, augmented training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation batches (letterbox only)."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Test batches (letterbox only)."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Batches of the images in ``predict_dir``."""
        return self._loader("predict")
