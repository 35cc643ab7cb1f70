"""Detection inference on a folder of images: a COCO results json plus images with boxes drawn.

Two ways in: :func:`predict_folder` from Python (a checkpoint or a task, a folder, an output
folder), and ``effbackbone predict --config <detection yaml> --ckpt_path <ckpt>
--data.init_args.predict_dir <folder>`` with :class:`DetectionWriter` in the config's callbacks.
Both write the same files:

- ``results.json``: COCO results (``image_id``, original ``category_id``, ``bbox`` as
  ``[x, y, w, h]`` in original pixels, ``score``), every detection the model returns.
- ``images.json``: ``{"images": [{"id", "file_name", "width", "height"}], "categories": [...]}``,
  what the ``image_id`` values refer to.
- ``<stem>_det.png``: the image with the boxes scoring at least ``score_threshold`` after a per-class
  NMS (for the picture only), labelled ``name score``, and a legend with the threshold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.ops import batched_nms

from tasks.common.checkpoint_io import WEIGHT_SOURCES_OFF
from tasks.common.deploy import is_model_file
from tasks.common.distributed import gather_per_image
from tasks.common.drawing import CANVAS_RGB, LegendEntry, draw_legend, font, legend_height
from tasks.common.writers import PredictionWriter
from tasks.detection.coco_eval import to_coco_results
from tasks.detection.data import ImageFolderDataset, collate_detection, image_ids_by_name, load_rgb
from tasks.detection.task import DetectionTask

# Distinct saturated colours; label i gets _COLOURS[i % len]. Every box also gets a black outer line, so it
# stays visible on an object of its own colour.
_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (255, 225, 25))  # fmt: skip
DRAW_NMS_IOU = 0.5


def boxes_to_draw(detection: dict[str, Any], score_threshold: float, nms_iou: float = DRAW_NMS_IOU) -> Tensor:
    """Indices of the detections worth drawing: score ``>= score_threshold``, then per-class NMS at ``nms_iou``.

    The model returns up to 100 detections per image (what COCO scoring wants), many of them overlapping
    copies of one object at low scores; a picture shows one box per object.
    """
    scores = detection["scores"].float()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    if len(keep) == 0:
        return keep
    boxes = detection["boxes_xyxy"][keep].float()
    kept = batched_nms(boxes, scores[keep], detection["labels"][keep], nms_iou)
    return keep[kept]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``colour``."""
    return (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)


def draw_detections(
    image_path: str | Path | Image.Image,
    detection: dict[str, Any],
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    nms_iou: float = DRAW_NMS_IOU,
    min_side: int = 320,
) -> Image.Image:
    """The image at ``image_path`` (or that image, as RGB) with its detections drawn, and a legend strip below it.

    Drawn: the detections of :func:`boxes_to_draw`, each a box in its class colour with a black outer
    line and a ``name score`` label; line width and text size follow the image size. Images whose
    longer side is under ``min_side`` are enlarged by an integer factor first, so labels stay readable.
    The legend names the classes drawn, the threshold and how many of the detections are shown.
    """
    if isinstance(image_path, Image.Image):
        image = image_path.convert("RGB")
    else:
        image = Image.fromarray(load_rgb(Path(image_path)))
    factor = max(1, -(-min_side // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC)
    keep = boxes_to_draw(detection, score_threshold, nms_iou).tolist()
    long_side = max(image.size)
    line, size = max(2, round(long_side / 250)), max(12, min(40, round(long_side / 32)))
    draw = ImageDraw.Draw(image)
    order = sorted(keep, key=lambda k: float(detection["scores"][k]))
    for i in order:  # best boxes drawn last, on top
        colour = _COLOURS[int(detection["labels"][i]) % len(_COLOURS)]
        x1, y1, x2, y2 = (float(v) * factor for v in detection["boxes_xyxy"][i])
        draw.rectangle((x1 - line, y1 - line, x2 + line, y2 + line), outline=(0, 0, 0), width=line + 2)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
    placed: list[tuple[float, float, float, float]] = []
    for i in reversed(order):  # the best boxes choose their label's place first
        label = int(detection["labels"][i])
        caption = f"{class_names[label]} {float(detection['scores'][i]):.2f}"
        x1, y1, x2, y2 = (float(v) * factor for v in detection["boxes_xyxy"][i])
        w, h = draw.textlength(caption, font=font(size)) + 4, size + 3
        x = min(max(x1 - line, 0), image.width - w)
        # Above the box, else inside its top, else below it: the first place no other label covers.
        spots = [(x, y) for y in (y1 - line - h - 1, y1 + line, y2 + line + 1) if 0 <= y <= image.height - h]
        free = [r for r in ((sx, sy, sx + w, sy + h) for sx, sy in spots) if not any(_overlap(r, p) for p in placed)]
        box = free[0] if free else (x, max(0.0, min(y1 + line, image.height - h)), x + w, 0.0)
        box = (box[0], box[1], box[0] + w, box[1] + h)
        placed.append(box)
        colour = _COLOURS[label % len(_COLOURS)]
        draw.rectangle(box, fill=colour, outline=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 1), caption, fill=_contrast(colour), font=font(size))
    labels = sorted({int(detection["labels"][i]) for i in keep})
    entries: list[LegendEntry] = [(_COLOURS[k % len(_COLOURS)], str(class_names[k])) for k in labels]
    entries.append((None, f"score >= {score_threshold:.2f}, per-class NMS {nms_iou:.1f}: "
                                  f"{len(keep)} of {len(detection['scores'])} detections"))  # fmt: skip
    legend_size = max(12, min(24, round(long_side / 40)))
    canvas = Image.new("RGB", (image.width, image.height + legend_height(entries, image.width, legend_size)),
                       CANVAS_RGB)  # fmt: skip
    canvas.paste(image, (0, 0))
    draw_legend(canvas, entries, image.height + 4, legend_size)
    return canvas


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
        task: A ``DetectionTask``, the path of its Lightning checkpoint (the checkpoint carries
            the model settings and the label -> category id map), or an ``.onnx`` file from ``effbackbone
            export`` or ``effbackbone quantize`` (run by ONNX Runtime on the CPU; ``device`` is then ignored), or
            an OpenVINO ``.xml`` from ``effbackbone quantize`` (run by OpenVINO on the CPU).
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
    if isinstance(task, (str, Path)) and is_model_file(task):
        from tasks.detection.deploy import DetectionFileModel

        task, device = DetectionFileModel(str(task)), "cpu"  # type: ignore[assignment]
    if not isinstance(task, L.LightningModule):
        # The training-time weight paths are not needed (the checkpoint has every weight).
        task = DetectionTask.load_from_checkpoint(
            task, map_location="cpu", weights_only=True, **WEIGHT_SOURCES_OFF
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
        out = self.output_path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            cats, names = getattr(pl_module, "category_ids", None), getattr(pl_module, "class_names", None)
            if cats is None or names is None:  # a DetectionTask, or the file model of an exported one
                raise TypeError(
                    f"DetectionWriter needs a detection model (category_ids, class_names), got "
                    f"{type(pl_module).__name__}"
                )
            results = write_predictions(unique, out, cats, names, self.score_threshold, self.draw)
            drawn = [out / f"{Path(p['file_name']).stem}_det.png" for p in unique] if self.draw else []
            self.record([results, out / "images.json", *drawn])
