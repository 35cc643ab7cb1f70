"""Detection inference on a folder of images: a COCO results json plus images with boxes drawn.

Two ways in: :func:`predict_folder` from Python (a checkpoint or a task, a folder, an output
folder), and ``effbackbone predict --config <detection yaml> --ckpt_path <ckpt>
--data.init_args.predict_dir <folder>`` with :class:`DetectionWriter` in the config's callbacks.
Both write the same files:

- ``results.json``: COCO results (``image_id``, original ``category_id``, ``bbox`` as
  ``[x, y, w, h]`` in original pixels, ``score``), every detection the model returns.
- ``images.json``: ``{"images": [{"id", "file_name", "width", "height"}], "categories": [...]}``,
  what the ``image_id`` values refer to.
- ``<stem>_det.png``: the image with the boxes scoring at least ``score_threshold``, labelled
  ``name score``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes

from tasks.common.distributed import gather_per_image
from tasks.common.writers import PredictionWriter
from tasks.detection.coco_eval import to_coco_results
from tasks.detection.data import ImageFolderDataset, collate_detection, image_ids_by_name, load_rgb
from tasks.detection.task import DetectionTask

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4")


def draw_detections(
    image_path: str | Path, detection: dict[str, Any], class_names: Sequence[str], score_threshold: float = 0.3
) -> Image.Image:
    """The image at ``image_path`` (as RGB) with the detections scoring ``>= score_threshold`` drawn."""
    rgb = torch.from_numpy(load_rgb(Path(image_path))).permute(2, 0, 1)
    keep = detection["scores"] >= score_threshold
    labels = detection["labels"][keep].tolist()
    scores = detection["scores"][keep].tolist()
    captions = [f"{class_names[lab]} {s:.2f}" for lab, s in zip(labels, scores, strict=True)]
    colours = [_COLOURS[lab % len(_COLOURS)] for lab in labels]
    width = max(1, round(max(rgb.shape[1:]) / 300))  # visible on large photos, not blotting small ones
    drawn = draw_bounding_boxes(rgb, detection["boxes_xyxy"][keep].cpu(), captions, colours, width=width)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def write_predictions(
    predictions: Sequence[dict[str, Any]], output_dir: str | Path, category_ids: Sequence[int],
    class_names: Sequence[str], score_threshold: float = 0.3, draw: bool = True,
) -> Path:
    """Write ``results.json``, ``images.json`` and (with ``draw``) ``<stem>_det.png`` files.

    Args:
        predictions: ``DetectionTask.predict_step`` outputs, flattened: one dict per image with
            ``image_id``, ``file_name``, ``boxes_xyxy`` (original pixels), ``scores``, ``labels``.
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
    results = to_coco_results([p["image_id"] for p in preds], preds, category_ids)
    images = []
    for p in preds:
        with Image.open(p["file_name"]) as im:
            images.append({"id": p["image_id"], "file_name": Path(p["file_name"]).name, "width": im.width,
                           "height": im.height})
        if draw:
            drawn = draw_detections(p["file_name"], p, class_names, score_threshold)
            drawn.save(out / f"{Path(p['file_name']).stem}_det.png")
    categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, class_names, strict=True)]
    (out / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1))
    path = out / "results.json"
    path.write_text(json.dumps(results))
    return path


def _cpu(prediction: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in prediction.items()}


@torch.no_grad()
def predict_folder(
    task: DetectionTask | str | Path, input_dir: str | Path, output_dir: str | Path, batch_size: int = 4,
    score_threshold: float = 0.3, device: str | torch.device = "cpu", annotation_file: str | Path | None = None,
) -> Path:
    """Detect objects in every image of ``input_dir`` and write the files listed in the module docstring.

    Args:
        task: A ``DetectionTask`` or the path of its Lightning checkpoint (the checkpoint carries
            the model settings and the label -> category id map).
        input_dir: Folder of images (``.jpg``, ``.png``, ...), any size; each is letterboxed.
        output_dir: Where the results go.
        batch_size: Images per forward pass.
        score_threshold: Smallest score drawn.
        device: Where to run.
        annotation_file: A COCO json that lists these images: the results then use its image ids (and can be
            scored against it directly); other images get new ids.

    Returns:
        The path of ``results.json``.
    """
    if not isinstance(task, DetectionTask):
        # The training-time weight paths are not needed (the checkpoint has every weight).
        task = DetectionTask.load_from_checkpoint(
            task, map_location="cpu", weights_only=True, backbone_weights=None, pretrained_path=None
        )
    task = task.to(device).eval()
    ids = image_ids_by_name(annotation_file) if annotation_file is not None else None
    dataset = ImageFolderDataset(input_dir, task.image_size, ids)
    predictions: list[dict[str, Any]] = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection):
        batch["image"] = batch["image"].to(device)
        predictions.extend(_cpu(p) for p in task.predict_step(batch, 0))
    return write_predictions(predictions, output_dir, task.category_ids, task.class_names, score_threshold)


class DetectionWriter(PredictionWriter):
    """Writes the detection outputs during ``effbackbone predict`` (the files of :func:`write_predictions`).

    Args:
        output_dir: Where to write (default ``<log dir>/predictions``).
        score_threshold: Smallest score drawn.
        draw: Also write the drawn images.
    """

    def __init__(self, output_dir: str | None = None, score_threshold: float = 0.3, draw: bool = True) -> None:
        super().__init__(output_dir)
        self.score_threshold = score_threshold
        self.draw = draw
        self._predictions: dict[int, dict[str, Any]] = {}  # image id -> its detections

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
        if trainer.is_global_zero:
            out = self.output_path(trainer)
            if not isinstance(pl_module, DetectionTask):
                raise TypeError(f"DetectionWriter needs a DetectionTask, got {type(pl_module).__name__}")
            cats, names = pl_module.category_ids, pl_module.class_names
            write_predictions(unique, out, cats, names, self.score_threshold, self.draw)
