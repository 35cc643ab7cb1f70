"""Instance-segmentation inference on a folder: a COCO results json with RLE masks, and images with masks drawn.

Two ways in, as for detection: :func:`predict_folder` from Python, and ``effbackbone predict --config <instance
yaml> --ckpt_path <ckpt> --data.init_args.predict_dir <folder>`` with :class:`InstanceWriter` in the config's
callbacks. Both write:

- ``results.json``: COCO results, one per detection: ``image_id``, original ``category_id``, ``bbox``
  (``[x, y, w, h]``, original pixels), ``score`` and ``segmentation`` (compressed RLE of the original image's
  size). ``COCO.loadRes`` reads it for ``iouType="segm"`` and ``"bbox"`` alike.
- ``images.json``: ``{"images": [{"id", "file_name", "width", "height"}], "categories": [...]}``.
- ``<stem>_inst.png``: the image with the instances scoring at least ``score_threshold`` (after the per-class box
  NMS of the detection pictures) filled in their class colour and outlined in black or white, their boxes and
  ``name score`` labels, and a legend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from tasks.common.checkpoint_io import WEIGHT_SOURCES_OFF
from tasks.common.distributed import gather_per_image
from tasks.common.writers import PredictionWriter
from tasks.detection.data import ImageFolderDataset, image_ids_by_name, load_rgb
from tasks.detection.predict import _COLOURS, DRAW_NMS_IOU, _contrast, boxes_to_draw, draw_detections
from tasks.instance.coco_eval import to_instance_results
from tasks.instance.data import collate_instances
from tasks.instance.task import InstanceTask

MASK_ALPHA = 0.45  # fill opacity: the object's texture stays visible under its colour


def draw_instances(
    image_path: str | Path,
    detection: dict[str, Any],
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    nms_iou: float = DRAW_NMS_IOU,
) -> Image.Image:
    """The image with its instance masks filled and outlined, then boxes, labels and legend as detection draws them.

    Args:
        image_path: The image.
        detection: ``boxes_xyxy``, ``scores``, 0-based ``labels`` and ``segmentation`` (COCO RLEs) of the
            original image, as :meth:`InstanceTask.predict_step` returns them.
        class_names: Name of each label.
        score_threshold: Smallest score drawn.
        nms_iou: The per-class box NMS of the picture (:func:`~tasks.detection.predict.boxes_to_draw`).
    """
    image = load_rgb(Path(image_path)).astype(np.float32)
    keep = boxes_to_draw(detection, score_threshold, nms_iou).tolist()
    width = max(1, round(max(image.shape[:2]) / 300))
    for i in sorted(keep, key=lambda k: float(detection["scores"][k])):  # best drawn last, on top
        mask = mask_utils.decode(detection["segmentation"][i]).astype(bool)
        colour = _COLOURS[int(detection["labels"][i]) % len(_COLOURS)]
        image[mask] = (1 - MASK_ALPHA) * image[mask] + MASK_ALPHA * np.array(colour, dtype=np.float32)
        # The outline in black or white, not the fill colour: it must show on an object of that same colour.
        image[mask & ~_eroded(mask, width)] = _contrast(colour)
    picture = Image.fromarray(image.round().clip(0, 255).astype(np.uint8))
    return draw_detections(picture, detection, class_names, score_threshold, nms_iou)


def _eroded(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """``mask`` shrunk by ``pixels`` (4-neighbourhood steps); the image border counts as outside."""
    for _ in range(pixels):
        padded = np.pad(mask, 1)
        mask = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def write_predictions(
    predictions: Sequence[dict[str, Any]], output_dir: str | Path, category_ids: Sequence[int],
    class_names: Sequence[str], score_threshold: float = 0.3, draw: bool = True,
) -> Path:  # fmt: skip
    """Write ``results.json``, ``images.json`` and (with ``draw``) ``<stem>_inst.png`` files.

    Args:
        predictions: One dict per image with ``image_id``, ``file_name``, ``boxes_xyxy``, ``scores``, ``labels``
            and ``segmentation`` (COCO RLEs), all in original pixels (:meth:`InstanceTask.predict_step`).
        output_dir: Created if needed.
        category_ids: COCO id of each label.
        class_names: Name of each label (for the drawings).
        score_threshold: Smallest score drawn (``results.json`` keeps every detection).
        draw: Also write the drawings.

    Returns:
        The path of ``results.json``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = sorted(predictions, key=lambda p: p["image_id"])
    images = []
    for p in preds:
        with Image.open(p["file_name"]) as im:
            images.append({"id": p["image_id"], "file_name": Path(p["file_name"]).name, "width": im.width,
                           "height": im.height})  # fmt: skip
        if draw:
            drawn = draw_instances(p["file_name"], p, class_names, score_threshold)
            drawn.save(out / f"{Path(p['file_name']).stem}_inst.png")
    categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, class_names, strict=True)]
    (out / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1))
    path = out / "results.json"
    path.write_text(json.dumps(to_instance_results([p["image_id"] for p in preds], preds, category_ids)))
    return path


def _cpu(prediction: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in prediction.items()}


@torch.no_grad()
def predict_folder(
    task: InstanceTask | str | Path, input_dir: str | Path, output_dir: str | Path, batch_size: int = 4,
    score_threshold: float = 0.3, device: str | torch.device = "cpu", annotation_file: str | Path | None = None,
) -> Path:  # fmt: skip
    """Segment the instances in every image of ``input_dir`` and write the files listed in the module docstring.

    Args:
        task: An ``InstanceTask`` or the path of its Lightning checkpoint (it carries the model settings and the
            label -> category id map).
        input_dir: Folder of images, any size; each is letterboxed.
        output_dir: Where the results go.
        batch_size: Images per forward pass.
        score_threshold: Smallest score drawn.
        device: Where to run.
        annotation_file: A COCO json that lists these images: the results then use its image ids (and can be
            scored against it directly); other images get new ids.

    Returns:
        The path of ``results.json``.
    """
    if not isinstance(task, InstanceTask):
        task = InstanceTask.load_from_checkpoint(task, map_location="cpu", weights_only=True, **WEIGHT_SOURCES_OFF)
    task = task.to(device).eval()
    ids = image_ids_by_name(annotation_file) if annotation_file is not None else None
    dataset = ImageFolderDataset(input_dir, task.image_size, ids)
    predictions: list[dict[str, Any]] = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_instances):
        batch["image"] = batch["image"].to(device)
        predictions.extend(_cpu(p) for p in task.predict_step(batch, 0))
    return write_predictions(predictions, output_dir, task.category_ids, task.class_names, score_threshold)


class InstanceWriter(PredictionWriter):
    """Writes the instance outputs during ``effbackbone predict`` (the files of :func:`write_predictions`).

    Args:
        output_dir: Where to write (default ``<log dir>/predictions``).
        score_threshold: Smallest score drawn.
        draw: Also write the drawn images.
    """

    def __init__(self, output_dir: str | None = None, score_threshold: float = 0.3, draw: bool = True) -> None:
        super().__init__(output_dir)
        self.score_threshold = score_threshold
        self.draw = draw
        self._predictions: dict[int, dict[str, Any]] = {}  # image id -> its detections (masks as RLE)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh collection."""
        self._predictions = {}

    def write_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any) -> None:  # noqa: ANN401
        """Keep the batch's detections (on the CPU) until the epoch ends."""
        self._predictions.update((p["image_id"], _cpu(p)) for p in prediction)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather every rank's detections and write the files once (rank 0)."""
        unique = list(gather_per_image(self._predictions).values())  # DistributedSampler repeats some images
        self._predictions = {}
        out = self.output_path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            if not isinstance(pl_module, InstanceTask):
                raise TypeError(f"InstanceWriter needs an InstanceTask, got {type(pl_module).__name__}")
            cats, names = pl_module.category_ids, pl_module.class_names
            results = write_predictions(unique, out, cats, names, self.score_threshold, self.draw)
            drawn = [out / f"{Path(p['file_name']).stem}_inst.png" for p in unique] if self.draw else []
            self.record([results, out / "images.json", *drawn])


__all__ = ["InstanceWriter", "draw_instances", "predict_folder", "write_predictions"]
