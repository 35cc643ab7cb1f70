"""COCO-format instance-segmentation data: the detection reader plus one mask per box.

Everything the detection reader does applies (:mod:`tasks.detection.data`: contiguous labels, crowd regions
left out of training and kept as "ignore" for COCOeval, degenerate boxes, unreadable files, the letterbox); this
module adds the ``segmentation`` of each trained annotation, decoded by pycocotools from polygons or RLE
(:mod:`tasks.instance.masks`) and letterboxed and augmented together with the image and its boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from tasks.common.preflight import CheckMode
from tasks.detection.boxes import clip_xyxy
from tasks.detection.categories import CategoryMap
from tasks.detection.data import CocoDataModule, CocoDetection, collate_detection
from tasks.detection.io import load_rgb
from tasks.detection.transforms import letterbox_scale
from tasks.instance.masks import decode_segmentation
from tasks.instance.synthetic import SyntheticInstanceSpec, ensure_synthetic_instances


class CocoInstances(CocoDetection):
    """One COCO split as :class:`~tasks.detection.data.CocoDetection`'s samples plus ``masks``.

    ``masks`` is an ``(N, S, S)`` uint8 tensor, one mask per row of ``boxes_xyxy``, letterboxed (and in training
    augmented) exactly as the image. Arguments as ``CocoDetection``'s; every annotation trained on must have a
    ``segmentation`` (polygons or RLE).
    """

    def __init__(
        self, annotation_file: str | Path, image_dir: str | Path, transforms: A.Compose,
        image_size: int, category_map: CategoryMap | None = None, check_images: CheckMode = "off",
        skip_unreadable: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(annotation_file, image_dir, transforms, image_size, category_map, check_images,
                         skip_unreadable)  # fmt: skip
        missing = [a["id"] for i in self.image_ids for a in self._trained(i) if not a.get("segmentation")]
        if missing:
            raise ValueError(
                f"{self.annotation_file}: {len(missing)} annotation(s) have no 'segmentation' (ids "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}); instance segmentation trains on masks: add "
                "polygons or RLE to them, mark them iscrowd: 1 to ignore them, or train tasks.detection.DetectionTask "
                "on the boxes"
            )

    def _trained(self, image_id: int) -> list[dict[str, Any]]:
        """The annotations of ``image_id`` that are trained on, in the order of its ``targets`` boxes.

        ``CocoDetection`` marks every annotation it leaves out (placeholder category, degenerate box) as crowd,
        so the others are its kept boxes, in the same order.
        """
        return [a for a in self.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]

    def masks_of(self, image_id: int, height: int, width: int) -> np.ndarray:
        """The ``(N, height, width)`` uint8 masks of the trained annotations of ``image_id``.

        Decoded at the size the json gives; an image file of another size (re-encoded) gets them resized to its
        own, as its boxes are clipped to it.
        """
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        where = f"{self.annotation_file.name}, image {info['file_name']}"
        masks = [decode_segmentation(a["segmentation"], h, w, f"{where}, annotation {a['id']}")
                 for a in self._trained(image_id)]  # fmt: skip
        if (h, w) != (height, width):
            masks = [cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in masks]
        return np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        image = load_rgb(path, self.read_fix)
        h, w = image.shape[:2]
        boxes, labels, _ = self.targets[index]
        masks = self.masks_of(image_id, h, w)
        boxes, keep = clip_xyxy(boxes, float(w), float(h))
        # The positions ride along as the label field: albumentations drops a box with its label, and the
        # surviving positions pick the labels and masks that go with the surviving boxes.
        positions = np.flatnonzero(keep)
        out = self.transforms(image=image, bboxes=boxes[positions], labels=np.arange(len(positions)),
                              masks=list(masks[positions]) or [np.zeros((h, w), np.uint8)])  # fmt: skip
        kept = np.asarray(out["labels"], dtype=np.int64)
        side = out["image"].shape[:2]
        out_masks = np.stack([out["masks"][k] for k in kept]) if len(kept) else np.zeros((0, *side), np.uint8)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "boxes_xyxy": torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(labels[positions][kept]),
            "masks": torch.from_numpy(np.ascontiguousarray(out_masks, dtype=np.uint8)),
            "image_id": image_id,
            "img_scale": letterbox_scale(w, h, self.image_size),
            "img_size": (w, h),
            "file_name": str(path),
        }


def collate_instances(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~tasks.detection.data.collate_detection`, plus the per-image ``masks`` as a list."""
    batch = collate_detection(samples)
    if "masks" in samples[0]:
        batch["masks"] = [s["masks"] for s in samples]
    return batch


class CocoInstanceDataModule(CocoDataModule):
    """Train/val(/test/predict) COCO splits with instance masks, letterboxed to ``image_size``.

    The options of :class:`~tasks.detection.data.CocoDataModule`, with ``image_size`` a multiple of 32 and
    ``synthetic`` the instance quickstart's shapes (:class:`~tasks.instance.synthetic.SyntheticInstanceSpec`).

    Args:
        root: Dataset folder with ``annotations/instances_<split>.json`` (their ``segmentation`` polygons or RLE).
        image_size: Square model input side (a multiple of 32).
        synthetic: Generate a synthetic dataset of shapes with masks with this spec into ``root`` when the
            annotation files are absent (the quickstart); ``None`` reads ``root`` as is.
        **kwargs: The other options of ``CocoDataModule`` (``batch_size``, ``num_workers``, splits,
            ``image_dir``, ``augment``, ``predict_dir``, ``predict_split``, ``check_images``, ``skip_unreadable``).
    """

    size_multiple = 32
    size_reason = "the FPN's coarsest encoder level, C5"
    dataset_class = CocoInstances
    collate = staticmethod(collate_instances)

    def __init__(
        self, root: str = "data/coco", image_size: int = 512, synthetic: SyntheticInstanceSpec | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.synthetic = synthetic  # type: ignore[assignment]  # the instance spec, not the detection one

    def ensure_synthetic(self) -> None:
        """Generate the ``synthetic`` dataset (with masks) into ``root`` when configured and absent."""
        if self.synthetic is not None:
            ensure_synthetic_instances(self.root, self.synthetic)  # type: ignore[arg-type]


__all__ = ["CocoInstanceDataModule", "CocoInstances", "collate_instances"]
