"""InstanceTask (Mask R-CNN): mask formats, the synthetic fixture, data, outputs, COCO RLE results and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("jsonargparse")

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from tasks.cli import main, run_cli  # noqa: E402
from tasks.detection.boxes import xywh_to_xyxy  # noqa: E402
from tasks.detection.synthetic import _COLOURS  # noqa: E402
from tasks.detection.transforms import build_det_transforms  # noqa: E402
from tasks.instance import CocoInstanceDataModule, InstanceTask  # noqa: E402
from tasks.instance.coco_eval import instance_map  # noqa: E402
from tasks.instance.data import CocoInstances  # noqa: E402
from tasks.instance.masks import decode_segmentation, encode_masks  # noqa: E402
from tasks.instance.predict import predict_folder, write_predictions  # noqa: E402
from tasks.instance.synthetic import (  # noqa: E402
    SyntheticInstanceSpec,
    generate_synthetic_instances,
    shape_polygons,
    uncompressed_rle,
)

REPO = Path(__file__).resolve().parents[2]
CONF = str(REPO / "tests" / "conf" / "inst_maskrcnn.yaml")
# Small images with every annotation form: polygons, compressed RLE, crowd (uncompressed RLE), empty images.
SPEC = SyntheticInstanceSpec(num_train=8, num_val=4, num_classes=3, category_ids=(3, 17, 90), min_size=48,
                             max_size=80, rle_fraction=0.4, crowd_fraction=0.5, empty_fraction=0.2)  # fmt: skip
TINY = {"fpn_channels": 32, "box_head_width": 64, "mask_head_width": 32, "anchor_sizes": [8, 16, 32, 64, 128],
        "backbone_options": {"phi": -3}}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is 2 shared cores: one intra-op thread avoids oversubscription stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synthetic_instances(tmp_path_factory.mktemp("inst") / "data", SPEC)


def _annotations(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


# -- mask formats ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["rectangle", "ellipse", "triangle", "cross", "diamond"])
def test_polygon_and_rle_annotations_decode_to_the_same_mask(shape):
    h, w = 40, 56
    polygon = shape_polygons(shape, (5.0, 4.0, 47.5, 33.0))
    from_polygon = decode_segmentation(polygon, h, w)
    assert from_polygon.shape == (h, w) and from_polygon.dtype == np.uint8 and 100 < from_polygon.sum() < h * w
    compressed = encode_masks(from_polygon[None])[0]  # counts as a json string
    assert isinstance(compressed["counts"], str)
    uncompressed = uncompressed_rle(from_polygon)  # COCO's crowd format: counts as a list of run lengths
    assert isinstance(uncompressed["counts"], list) and sum(uncompressed["counts"]) == h * w
    as_bytes = {"size": compressed["size"], "counts": compressed["counts"].encode()}  # as pycocotools returns it
    for rle in (compressed, uncompressed, as_bytes):
        np.testing.assert_array_equal(decode_segmentation(rle, h, w), from_polygon)
    # and COCOeval's own conversion agrees with ours
    np.testing.assert_array_equal(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, h, w))),
                                  from_polygon)  # fmt: skip


def test_rle_starting_inside_the_object_and_short_polygon_parts():
    mask = np.zeros((6, 5), np.uint8)
    mask[:3, 0] = 1  # the first pixel is set: the uncompressed RLE starts with a zero-length run
    rle = uncompressed_rle(mask)
    assert rle["counts"][:2] == [0, 3]
    np.testing.assert_array_equal(decode_segmentation(rle, 6, 5), mask)
    # A part with fewer than three points covers nothing and is left out; only such parts give an empty mask.
    assert decode_segmentation([[1, 1, 4, 4]], 6, 5).sum() == 0
    assert decode_segmentation([[1, 1, 4, 4], [0, 0, 4, 0, 4, 5, 0, 5]], 6, 5).sum() > 0


@pytest.mark.parametrize(
    ("segmentation", "match"),
    [([[1, 2, 3, 4, 5, 6, 7]], "odd number"), ({"size": [10, 10], "counts": "abc"}, r"size \[10, 10\]"),
     ("polygon", "must be a list of polygons")],
)  # fmt: skip
def test_bad_segmentation_names_the_annotation(segmentation, match):
    with pytest.raises(ValueError, match=match) as error:
        decode_segmentation(segmentation, 6, 5, "val.json, annotation 7")
    assert "annotation 7" in str(error.value)


# -- the synthetic fixture and the data ---------------------------------------------------------------
def test_synthetic_fixture_has_polygons_rle_crowd_and_empty_images_painted_from_the_masks(data):
    ann = _annotations(data)
    forms = {("crowd" if a["iscrowd"] else "object",
              "polygon" if isinstance(a["segmentation"], list) else type(a["segmentation"]["counts"]).__name__)
             for a in ann["annotations"]}  # fmt: skip
    assert forms == {("object", "polygon"), ("object", "str"), ("crowd", "list")}
    assert any(not any(a["image_id"] == im["id"] for a in ann["annotations"]) for im in ann["images"])  # empty
    assert {c["id"] for c in ann["categories"]} == {3, 17, 90}
    for a in ann["annotations"]:
        im = next(i for i in ann["images"] if i["id"] == a["image_id"])
        mask = decode_segmentation(a["segmentation"], im["height"], im["width"]).astype(bool)
        pixels = np.asarray(Image.open(data / "train" / "images" / im["file_name"]))
        colour = _COLOURS[[3, 17, 90].index(a["category_id"])]
        assert (pixels[mask] == colour).all() and mask.sum() == a["area"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_dataset_masks_follow_their_boxes_through_letterbox_and_augmentation(data, split):
    dataset = CocoInstances(data / "annotations" / "instances_train.json", data / "train" / "images",
                            build_det_transforms(split, 64), 64)  # fmt: skip
    crowd_images = {a["image_id"] for a in _annotations(data)["annotations"] if a["iscrowd"]}
    assert crowd_images
    for index in range(len(dataset)):
        sample = dataset[index]
        boxes, masks = sample["boxes_xyxy"], sample["masks"]
        assert sample["image"].shape == (3, 64, 64) and masks.shape == (len(boxes), 64, 64)
        assert masks.dtype == torch.uint8 and len(sample["labels"]) == len(boxes)
        for box, mask in zip(boxes, masks, strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(xs) > 0
            # the mask lies in its box (one pixel of resampling slack)
            assert xs.min() >= box[0] - 1.5 and xs.max() + 1 <= box[2] + 1.5
            assert ys.min() >= box[1] - 1.5 and ys.max() + 1 <= box[3] + 1.5
    trained = sum(len(dataset[i]["labels"]) for i in range(len(dataset)))
    objects = sum(not a["iscrowd"] for a in _annotations(data)["annotations"])
    assert trained <= objects  # crowd regions are never trained on


def test_annotation_without_segmentation_names_the_file_and_the_fix(data, tmp_path):
    ann = _annotations(data)
    first = next(a for a in ann["annotations"] if not a["iscrowd"])
    del first["segmentation"]
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="no 'segmentation'") as error:
        CocoInstances(path, data / "train" / "images", build_det_transforms("val", 64), 64)
    assert str(path) in str(error.value) and "DetectionTask" in str(error.value)


def test_sizes_and_anchor_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        CocoInstanceDataModule(root=str(tmp_path), image_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        InstanceTask(image_size=100, **TINY)
    with pytest.raises(ValueError, match="5 values"):
        InstanceTask(image_size=64, **{**TINY, "anchor_sizes": [8, 16]})


# -- outputs ------------------------------------------------------------------------------------------
def test_forward_and_training_step_shapes(data):
    dm = CocoInstanceDataModule(root=str(data), image_size=64, batch_size=3, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    task = InstanceTask(num_classes=3, image_size=64, **TINY)
    task.log = lambda *args, **kwargs: None  # no trainer here
    task.train()
    loss = task.training_step(next(iter(dm.train_dataloader())), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert task.encoder.conv_stem.weight.grad is not None  # the loss reaches the encoder
    assert task.detector.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    task.eval()
    with torch.no_grad():
        original = task(batch["image"], batch["img_size"])
        model_pixels = task(batch["image"])
    assert len(original) == len(model_pixels) == len(batch["image"])
    for det, (w, h) in zip(original, batch["img_size"].int().tolist(), strict=True):
        n = len(det["scores"])
        assert det["boxes_xyxy"].shape == (n, 4) and det["labels"].shape == (n,)
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool  # the original image's size
        assert ((det["labels"] >= 0) & (det["labels"] < 3)).all()
        assert (det["boxes_xyxy"][:, 2] <= w).all() and (det["boxes_xyxy"][:, 3] <= h).all()
    for det in model_pixels:
        assert det["masks"].shape[1:] == (64, 64)


def _ground_truth_predictions(root: Path, split: str) -> list[dict]:
    """The ground truth of ``split`` in predict_step's format: every object as a detection of score 1."""
    ann, preds = _annotations(root, split), []
    ids = [c["id"] for c in ann["categories"]]
    for im in ann["images"]:
        objects = [a for a in ann["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        masks = [decode_segmentation(a["segmentation"], im["height"], im["width"]) for a in objects]
        preds.append({
            "image_id": im["id"], "file_name": str(root / split / "images" / im["file_name"]),
            "boxes_xyxy": torch.as_tensor(xywh_to_xyxy(np.array([a["bbox"] for a in objects]))),
            "scores": torch.ones(len(objects)),
            "labels": torch.tensor([ids.index(a["category_id"]) for a in objects], dtype=torch.int64),
            "segmentation": encode_masks(np.stack(masks) if masks else np.zeros((0, 1, 1), np.uint8)),
        })  # fmt: skip
    return preds


def test_ground_truth_as_rle_results_json_scores_ap_1_with_pycocotools(data, tmp_path):
    preds = _ground_truth_predictions(data, "train")
    results = write_predictions(preds, tmp_path, [3, 17, 90], ["rectangle", "ellipse", "triangle"], draw=True)
    written = json.loads(results.read_text())
    assert written and {r["category_id"] for r in written} <= {3, 17, 90}  # original ids
    assert all(isinstance(r["segmentation"]["counts"], str) for r in written)
    assert len(list(tmp_path.glob("*_inst.png"))) == len(preds)
    gt_file = data / "annotations" / "instances_train.json"
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(str(gt_file))
        for iou_type in ("segm", "bbox"):
            evaluator = COCOeval(gt, gt.loadRes(str(results)), iouType=iou_type)  # the file as it is
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            assert evaluator.stats[0] == pytest.approx(1.0), iou_type
        stats = instance_map(gt, written, class_names={3: "rectangle", 17: "ellipse", 90: "triangle"})
    assert stats["AP"] == pytest.approx(1.0) and stats["segm_AP"] == pytest.approx(1.0)
    # one object's mask shifted: its box still matches, its mask less so
    shifted = [dict(r) for r in written]
    m = mask_utils.decode(shifted[0]["segmentation"])
    shifted[0]["segmentation"] = encode_masks(np.roll(m, m.shape[1] // 3, axis=1)[None])[0]
    with contextlib.redirect_stdout(io.StringIO()):
        worse = instance_map(gt, shifted)
    assert worse["AP"] == pytest.approx(1.0) and worse["segm_AP"] < 1.0


# -- through the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short CLI fit (2 steps + validation) on generated data with sparse category ids 3, 17, 90."""
    root = tmp_path_factory.mktemp("inst_cli")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = run_cli(["fit", "--config", CONF, f"--data.init_args.root={root / 'data'}",
                       f"--trainer.default_root_dir={root}"])  # fmt: skip
    finally:
        torch.set_num_threads(n)
    return SimpleNamespace(root=root, cli=cli, ckpt=root / "checkpoints" / "last.ckpt")


def test_cli_fit_fast_dev_run_partly_frozen_mixed_precision(tmp_path):
    # bf16 autocast on the CPU goes through the same mixed-precision path as 16-mixed on a GPU.
    args = ["fit", "--config", CONF, "--trainer.fast_dev_run=true", f"--data.init_args.root={tmp_path / 'data'}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.precision=bf16-mixed",
            "--model.init_args.trainable_levels=2", "--model.init_args.ema_decay=null"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "data" / "annotations" / "instances_train.json").is_file()  # generated on first use


def test_cli_fit_logs_box_and_mask_ap_and_checkpoints_categories(trained):
    metrics = trained.cli.trainer.callback_metrics
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_rectangle", "AP50_triangle"):
        assert f"val/{name}" in metrics and f"val/segm_{name}" in metrics, name
    for name in ("loss", "loss_mask", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert f"train/{name}" in metrics, name
    assert 0.0 <= float(metrics["val/segm_AP"]) <= 1.0
    task = trained.cli.model
    assert task.num_classes == 3 and task.category_ids == (3, 17, 90)  # linked from the data, sparse ids kept
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    assert ckpt["detection_categories"]["category_ids"] == [3, 17, 90]
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])


def test_cli_predict_writes_rle_results_scorable_against_the_split_json(trained):
    data, out = trained.root / "data", trained.root / "predicted"
    args = ["predict", "--config", CONF, f"--ckpt_path={trained.ckpt}", f"--data.init_args.root={data}",
            f"--data.init_args.predict_dir={data / 'val' / 'images'}", f"--trainer.default_root_dir={out}"]  # fmt: skip
    assert main(args) == 0
    results = out / "predictions" / "results.json"
    written = json.loads(results.read_text())
    gt_file = data / "annotations" / "instances_val.json"
    assert {r["image_id"] for r in written} <= {im["id"] for im in _annotations(data, "val")["images"]}
    assert len(list((out / "predictions").glob("*_inst.png"))) == len(_annotations(data, "val")["images"])
    if written:  # a two-step model may find nothing; what it writes must score
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt_file))
            evaluator = COCOeval(gt, gt.loadRes(str(results)), iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
        assert {r["category_id"] for r in written} <= {3, 17, 90}


def test_predict_folder_from_a_checkpoint_uses_the_json_image_ids(trained, tmp_path):
    data = trained.root / "data"
    results = predict_folder(trained.ckpt, data / "val" / "images", tmp_path, batch_size=2, score_threshold=0.0,
                             annotation_file=data / "annotations" / "instances_val.json")  # fmt: skip
    images = json.loads((tmp_path / "images.json").read_text())["images"]
    assert {im["id"] for im in images} == {im["id"] for im in _annotations(data, "val")["images"]}
    for r in json.loads(results.read_text()):
        im = next(i for i in images if i["id"] == r["image_id"])
        assert r["segmentation"]["size"] == [im["height"], im["width"]]  # masks at the original size


def test_shipped_config_parses(capsys):
    config = REPO / "configs" / "instance" / "quickstart_maskrcnn_b0.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "tasks.instance.InstanceTask" in capsys.readouterr().out
