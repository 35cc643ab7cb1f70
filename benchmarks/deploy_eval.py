"""The groups of bench_deploy: each model, its timm peer, real images and how a row is scored against fp32.

Every ``*_group`` returns the keyword arguments of ``bench_deploy.Group``: ``score(fn)`` runs a row's
callable over the evaluation images and returns its accuracy figures next to the fp32 model's.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_quantize as bq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effbackbone

Fn = Callable[[Tensor], Any]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> dict[str, bool]:
    """Which of the instruction sets that decide int8 and bf16 speed the CPU reports (``/proc/cpuinfo``)."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return {}
    flags = set(line.split(":", 1)[1].split())
    return {f: f in flags for f in CPU_FLAGS}


def versions() -> dict[str, str]:
    """Versions of the runtimes in the rows."""
    import importlib.metadata

    out = {}
    for name in ("onnxruntime", "onnxruntime-gpu", "torch-tensorrt", "timm", "segmentation-models-pytorch", "effdet"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def to_float(out: Any) -> Any:  # noqa: ANN401 - a tensor, or dicts/lists/tuples of them
    """Outputs as float32 CPU tensors, the nesting kept."""
    if isinstance(out, Tensor):
        return out.detach().float().cpu()
    if isinstance(out, dict):
        return {k: to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(to_float(v) for v in out)
    return out


def flat(out: Any) -> Tensor:  # noqa: ANN401
    """All output values of one batch as ``(N, -1)``."""
    if isinstance(out, Tensor):
        return out.flatten(1)
    items = out.values() if isinstance(out, dict) else out
    return torch.cat([flat(v) for v in items], 1)


def reference(model: nn.Module, args: argparse.Namespace) -> Callable[[Tensor], Any]:
    """The fp32 model on the run's device (a copy), returning float CPU outputs: what every row is compared with."""
    device = torch.device(args.device)
    ref = copy.deepcopy(model).to(device).eval()

    def run(x: Tensor) -> Any:  # noqa: ANN401
        with torch.inference_mode():
            return to_float(ref(x.to(device)))

    return run


def cosine(ref: Tensor, out: Tensor) -> float:
    """Mean per-image cosine similarity."""
    return float(F.cosine_similarity(out.flatten(1).float(), ref.flatten(1).float()).mean())


# -- classifiers ------------------------------------------------------------------------------------


def classifier_group(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Lite0 (real TF ImageNet weights when installed) or B0 (random weights), batch 8 at 224."""
    import timm

    bq.RACCOON = args.data / "raccoon"
    n_eval, n_calib = (16, 16) if args.quick else (136, 64)
    real = bq.lite0_real() if name == "lite0" else None
    model = real if real is not None else effbackbone.create_model(name, features_only=False).eval()
    weights = "TF ImageNet weights" if real is not None else "random weights"
    if (bq.RACCOON / "val" / "images").is_dir():
        images = bq.raccoon("val", 0, min(40, n_eval))
        if n_eval > 40:  # the val photos, then train photos the calibration does not use
            images = torch.cat([images, bq.raccoon("train", 64, n_eval - 40)])
        calibration = list(bq.raccoon("train", 0, n_calib).split(8))
        where = f"{len(images)} raccoon photos (centre crop 224), calibration on {n_calib} others"
    else:
        print(f"[skip] real photos: no {bq.RACCOON}; random images instead")
        images, calibration = torch.randn(n_eval, 3, 224, 224), list(torch.randn(n_calib, 3, 224, 224).split(8))
        where = f"{n_eval} random images"
    ref = bq.batched(reference(model, args), images)

    def score(fn: Fn) -> dict[str, float]:
        out = torch.cat([to_float(fn(images[i : i + 8])) for i in range(0, len(images), 8)])
        top1 = ref.argmax(1)
        return {
            "top1_agreement": float((out.argmax(1) == top1).float().mean()),
            "top5_hit": float((out.topk(5, 1).indices == top1[:, None]).any(1).float().mean()),
            "cosine": cosine(ref, out),
        }

    peer_name = {"lite0": "tf_efficientnet_lite0", "b0": "efficientnet_b0"}[name]
    return {
        "name": name, "title": f"{name} classifier ({weights}), batch 8 at 224", "model": model,
        "example": images[:8], "calibration": calibration, "score": score,
        "accuracy_note": f"top-1 agreement with fp32 / fp32 top-1 in the row's top-5, {where}",
        "peer": lambda: timm.create_model(peer_name, pretrained=False).eval(), "peer_name": f"timm {peer_name}",
    }  # fmt: skip


# -- U-Net ------------------------------------------------------------------------------------------


def _membrane(root: Path, split: str, n: int, in_channels: int, mean: Any, std: Any) -> tuple[Tensor, Tensor]:
    """Normalised membrane slices ``(n, C, 512, 512)`` and their masks ``(n, 512, 512)``."""
    import numpy as np

    from tasks.common.images import read_image
    from tasks.segmentation.io import read_mask

    files = sorted((root / split / "images").glob("*.png"))[:n]
    images = [torch.from_numpy(read_image(f, in_channels)).permute(2, 0, 1) for f in files]
    masks = [torch.from_numpy(read_mask(root / split / "masks" / f.name).astype(np.int64)) for f in files]
    x = torch.stack(images)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1), torch.stack(masks)


def unet_group(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """U-Net-B0 (smp on our encoder): a trained membrane checkpoint (``--seg-ckpt``) or random weights."""
    import segmentation_models_pytorch as smp

    import effbackbone.integrations.smp  # noqa: F401 - registers the effbackbone-* encoders
    from tasks.common.images import default_stats
    from tasks.segmentation.metrics import to_metric_input

    if args.seg_ckpt is not None:
        from tasks.export import load_task

        task = load_task(args.seg_ckpt)
        model, mode, num_classes = task.eval_network().eval(), task.mode, task.num_classes
        in_channels, variant, decoder = task.in_channels, task.hparams["variant"], task.hparams["decoder"]
        mean, std = (task.mean, task.std) if task.mean is not None else default_stats(in_channels)
        weights = f"trained: {args.seg_ckpt.name}"
    else:
        model = smp.Unet("effbackbone-b0", encoder_weights=None, in_channels=1, classes=1).eval()
        mode, num_classes, in_channels, variant, decoder = "binary", 2, 1, "b0", "unet"
        mean, std = default_stats(1)
        weights = "random weights"
    root = args.data / "isbi2012_membrane"
    n_eval, n_calib = (2, 2) if args.quick else (6, 8)
    masks = None
    if (root / "val" / "images").is_dir():
        images, masks = _membrane(root, "val", n_eval, in_channels, mean, std)
        calibration = list(_membrane(root, "train", n_calib, in_channels, mean, std)[0].split(2))
        where = f"{len(images)} membrane val slices, calibration on {n_calib} train slices"
    else:
        print(f"[skip] membrane slices: no {root}; random images instead (no mIoU)")
        images, calibration = (
            torch.randn(n_eval, in_channels, 512, 512),
            list(torch.randn(2, in_channels, 512, 512)[None]),
        )
        where = f"{n_eval} random images"
    fp32 = reference(model, args)
    ref = torch.cat([to_metric_input(fp32(images[i : i + 2]), mode) for i in range(0, len(images), 2)])

    def score(fn: Fn) -> dict[str, float]:
        from torchmetrics.classification import MulticlassJaccardIndex

        preds = torch.cat([to_metric_input(to_float(fn(images[i : i + 2])), mode) for i in range(0, len(images), 2)])
        out = {"pixel_agreement": float((preds == ref).float().mean())}
        if args.seg_ckpt is not None and masks is not None:
            out["mIoU"] = float(MulticlassJaccardIndex(num_classes, average="macro")(preds, masks))
        return out

    scored = args.seg_ckpt is not None and masks is not None
    what = "membrane val mIoU (2 classes)" if scored else "share of pixels whose class agrees"
    peer = None
    if decoder == "unet" and variant.startswith("b"):
        classes = 1 if mode == "binary" else num_classes

        def peer() -> nn.Module:
            return smp.Unet(f"tu-efficientnet_{variant}", encoder_weights=None, in_channels=in_channels,
                            classes=classes).eval()  # fmt: skip

    return {
        "name": f"{name}-{variant}",
        "title": f"U-Net-{variant.upper()} ({weights}), batch 2 at 512x512, {in_channels} channel(s)",
        "model": model, "example": images[:2], "calibration": calibration, "score": score,
        "accuracy_note": f"{what} with fp32, {where}",
        "peer": peer, "peer_name": f"smp Unet tu-efficientnet_{variant} (timm encoder)",
    }  # fmt: skip


# -- EfficientDet -----------------------------------------------------------------------------------


class _Raw(nn.Module):
    """A row's callable in the place of the EfficientDet inside effdet's prediction bench."""

    def __init__(self, fn: Fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Any:  # noqa: ANN401 - effdet's ([class per level], [box per level])
        """The row's raw outputs, as float."""
        return to_float(self.fn(x))


def det_group(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """EfficientDet network: a trained raccoon checkpoint (``--det-ckpt``, AP) or random D0 (output cosine)."""
    import effdet

    from effbackbone.integrations.effdet import create_efficientdet
    from tasks.detection.data import CocoDataModule

    task = None
    if args.det_ckpt is not None:
        from tasks.export import load_task

        task = load_task(args.det_ckpt)
        model, variant, size = task.eval_bench().model.eval(), task.hparams["model"], task.image_size
        weights, num_classes = f"trained: {args.det_ckpt.name}", task.num_classes
    else:
        variant, size, num_classes = "d0", 256 if args.quick else 512, 1
        model, weights = create_efficientdet("d0", num_classes, image_size=size).eval(), "random weights"
    n_eval, n_calib = (4, 4) if args.quick else (40, 32)
    root = args.data / "raccoon"
    if (root / "annotations").is_dir():
        dm = CocoDataModule(str(root), image_size=size, batch_size=2, augment=False, check_images="off")
        dm.setup("fit")
        val = list(itertools.islice(dm.val_dataloader(), (n_eval + 1) // 2))
        calibration = [b["image"] for b in itertools.islice(dm.train_dataloader(), (n_calib + 1) // 2)]
        where = "raccoon val images"
    else:
        print(f"[skip] raccoon photos: no {root}; random images instead (no AP)")
        dm, task = None, None
        val = [{"image": torch.randn(2, 3, size, size)} for _ in range((n_eval + 1) // 2)]
        calibration = [torch.randn(2, 3, size, size)]
        where = "random images"
    fp32 = reference(model, args)
    ref = [flat(fp32(b["image"])) for b in val]

    def score(fn: Fn) -> dict[str, float]:
        outs = [flat(to_float(fn(b["image"]))) for b in val]
        result = {"output_cosine": cosine(torch.cat(ref), torch.cat(outs))}
        if task is not None:
            result.update(_average_precision(task, model, fn, val, dm))
        return result

    peer_tag = f"tf_efficientdet_{variant}"
    has_peer = peer_tag in effdet.config.model_config.efficientdet_model_param_dict

    def peer() -> nn.Module:
        return effdet.create_model(peer_tag, pretrained=False, pretrained_backbone=False, image_size=(size, size),
                                   num_classes=num_classes).eval()  # fmt: skip

    what = "raccoon val AP (COCO, same decoding and NMS)" if task is not None else "cosine of the raw outputs"
    return {
        "name": f"{name}-{variant}",
        "title": f"EfficientDet-{variant.upper()} network ({weights}), batch 2 at {size}x{size}",
        "model": model, "example": val[0]["image"], "calibration": calibration, "score": score,
        "accuracy_note": f"{what} vs fp32, {sum(len(b['image']) for b in val)} {where}, calibration on "
        f"{sum(len(c) for c in calibration)} train images",
        "peer": peer if has_peer else None, "peer_name": f"effdet {peer_tag} (timm backbone)",
    }  # fmt: skip


def _average_precision(task: Any, model: nn.Module, fn: Fn, val: list[Any], dm: Any) -> dict[str, float]:  # noqa: ANN401
    """COCO AP of a row: its raw outputs through the task's decoding, NMS and letterbox mapping."""
    from effbackbone.integrations.effdet_inference import FastDetBenchPredict
    from tasks.detection.boxes import split_detections
    from tasks.detection.coco_eval import coco_map, to_coco_results

    bench = FastDetBenchPredict(model).eval()
    bench.model = _Raw(fn)
    results, ids = [], []
    with torch.inference_mode():
        for b in val:
            info, scales = task._letterbox_info(b["img_size"])
            dets = task._to_original(split_detections(bench(b["image"], info)), scales)
            ids += b["image_id"].tolist()
            results += to_coco_results(b["image_id"].tolist(), dets, task.category_ids)
    stats = coco_map(dm.datasets["val"].coco, results, ids)
    return {"AP": stats["AP"], "AP50": stats["AP50"]}


__all__ = ["classifier_group", "cpu_flags", "det_group", "to_float", "unet_group", "versions"]
