"""Shipping a trained task: `effbackbone quantize`, and `effbackbone predict` from an exported or int8 ONNX file.

A tiny U-Net-B0 and a tiny EfficientDet-D0 are trained for one epoch on generated data; the files are made with
the commands themselves, and predict from a file is compared with predict from the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("onnxruntime")

from tasks.cli import main, run_cli  # noqa: E402
from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
SEG_CONF = str(CONF / "seg_unet_b0.yaml")
DET_CONF = str(CONF / "det_d0.yaml")


def _best_score(ckpt: str | Path) -> float:
    """The monitored validation metric of the epoch whose weights ``ckpt`` holds (ModelCheckpoint's best score)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    return float(next(v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint")))


def _table(printed: str) -> dict[str, tuple[float, float]]:
    """The float32 and int8 columns of quantize's table, by metric name."""
    rows = re.findall(r"^(\S.*?)\s+(-?\d\.\d{4}|nan)\s+(-?\d\.\d{4}|nan)\s+\S*$", printed, re.M)
    return {name.strip(): (float(a), float(b)) for name, a, b in rows}


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*_mask.png"))}


# -- segmentation ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A U-Net-B0 trained for one epoch on 8 generated images, its exported and its int8 file."""
    root = tmp_path_factory.mktemp("seg")
    data = generate_masks(root / "data", SyntheticMaskSpec(num_train=8, num_val=4, size=64))
    cli = run_cli(["fit", "--config", SEG_CONF, f"--data.root={data}", f"--trainer.default_root_dir={root}",
                   f"--trainer.logger.init_args.save_dir={root}"])  # fmt: skip
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert main(["export", "--ckpt", ckpt, "--output", str(root / "fp32.onnx")]) == 0
    return SimpleNamespace(root=root, data=data, ckpt=ckpt, fp32=root / "fp32.onnx", int8=root / "int8.onnx")


@pytest.fixture(scope="module")
def seg_quantized(seg):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["quantize", "--config", SEG_CONF, "--ckpt", seg.ckpt, "--output", str(seg.int8),
                     f"--data.root={seg.data}", "--calibration-batches=2"])  # fmt: skip
    assert code == 0
    return out.getvalue()


def _seg_predict(seg, model: str | Path, name: str) -> Path:
    out = seg.root / name
    images = seg.data / "val" / "images"
    assert main(["predict", "--config", SEG_CONF, f"--data.root={seg.data}", f"--ckpt_path={model}",
                 f"--trainer.default_root_dir={out}", f"--data.predict_dir={images}"]) == 0  # fmt: skip
    return out / "predictions"


@pytest.fixture(scope="module")
def seg_from_ckpt(seg):
    return _seg_predict(seg, seg.ckpt, "pred_ckpt")


def test_quantize_segmentation_writes_the_file_and_prints_float_and_int8_metrics(seg, seg_quantized):
    from effbackbone.quantize import load_int8

    model = load_int8(seg.int8)
    assert model.quantization["calibration_images"] == 8  # 2 batches of the config's 4 training images
    task = model.metadata["task"]
    assert task["name"] == "segmentation" and task["class_names"] == ["background", "ellipse", "square", "triangle"]
    assert task["mean"] == pytest.approx([0.485, 0.456, 0.406]) and task["tile_size"] == 64
    table = _table(seg_quantized)
    assert set(table) == {"mIoU", "IoU background", "IoU ellipse", "IoU square", "IoU triangle"}
    float_miou, int8_miou = table["mIoU"]
    # The float column is the model's validation mIoU of the epoch the checkpoint was saved at (fit's value).
    assert float_miou == pytest.approx(_best_score(seg.ckpt), abs=1e-4)
    assert abs(int8_miou - float_miou) < 0.1
    assert f"quantize: {seg.int8} (" in seg_quantized and "MB int8" in seg_quantized


def test_predict_from_the_exported_file_gives_the_checkpoint_masks(seg, seg_from_ckpt):
    from_file = _masks(_seg_predict(seg, seg.fp32, "pred_fp32"))
    from_ckpt = _masks(seg_from_ckpt)
    assert sorted(from_file) == sorted(from_ckpt) and len(from_ckpt) == 4
    for name, mask in from_ckpt.items():
        assert (from_file[name] == mask).mean() > 0.999, name  # float rounding (BN folded) may flip a tie
    assert sorted(p.name for p in (seg.root / "pred_fp32" / "predictions").iterdir()) == sorted(
        p.name for p in seg_from_ckpt.iterdir()
    )  # the same files: masks, overlays, panels


def test_predict_from_the_int8_file_runs_and_stays_close_to_float(seg, seg_quantized, seg_from_ckpt):
    from_int8 = _masks(_seg_predict(seg, seg.int8, "pred_int8"))
    from_ckpt = _masks(seg_from_ckpt)
    agreement = np.mean([(from_int8[n] == m).mean() for n, m in from_ckpt.items()])
    assert agreement > 0.9


def test_int8_logits_are_close_to_float(seg, seg_quantized):
    from tasks.export import load_task
    from tasks.segmentation.deploy import SegmentationFileModel

    task, file = load_task(seg.ckpt), SegmentationFileModel(str(seg.int8))
    x = torch.randn(2, 3, 64, 96)  # another size than the calibration images
    with torch.no_grad():
        a, b = task(x).flatten(), file(x).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95


@pytest.fixture(scope="module")
def seg_openvino(seg):
    import contextlib
    import io

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["quantize", "--config", SEG_CONF, "--ckpt", seg.ckpt, "--output", str(seg.root / "int8.xml"),
                     f"--data.root={seg.data}", "--calibration-batches=2"])  # fmt: skip
    assert code == 0
    return out.getvalue()


def test_quantize_to_openvino_and_predict_from_the_xml_file(seg, seg_openvino, seg_from_ckpt):
    from effbackbone.ov_runtime import read_ir_metadata

    xml = seg.root / "int8.xml"
    meta = read_ir_metadata(xml)
    assert meta["quantization"]["backend"] == "openvino-nncf" and meta["task"]["name"] == "segmentation"
    assert f"quantize: {xml} and int8.bin (" in seg_openvino
    float_miou, int8_miou = _table(seg_openvino)["mIoU"]
    assert float_miou == pytest.approx(_best_score(seg.ckpt), abs=1e-4) and abs(int8_miou - float_miou) < 0.1
    from_xml = _masks(_seg_predict(seg, xml, "pred_openvino"))
    from_ckpt = _masks(seg_from_ckpt)
    assert sorted(from_xml) == sorted(from_ckpt)
    assert np.mean([(from_xml[n] == m).mean() for n, m in from_ckpt.items()]) > 0.9
    assert sorted(p.name for p in (seg.root / "pred_openvino" / "predictions").iterdir()) == sorted(
        p.name for p in seg_from_ckpt.iterdir()
    )  # the same files: masks, overlays, panels


# -- detection ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """An EfficientDet-D0 trained for one epoch on generated COCO data (category ids 3, 17, 90), exported."""
    pytest.importorskip("effdet")
    root = tmp_path_factory.mktemp("det")
    run_cli(
        ["fit", "--config", DET_CONF, f"--data.init_args.root={root / 'data'}", f"--trainer.default_root_dir={root}"]
    )
    ckpt = root / "checkpoints" / "best.ckpt"
    assert main(["export", "--ckpt", str(ckpt), "--output", str(root / "fp32.onnx")]) == 0
    return SimpleNamespace(root=root, data=root / "data", ckpt=ckpt, fp32=root / "fp32.onnx", int8=root / "int8.onnx")


def _det_predict(det, model: str | Path, name: str) -> list[dict]:
    out = det.root / name
    assert main(["predict", "--config", DET_CONF, f"--data.init_args.root={det.data}", f"--ckpt_path={model}",
                 f"--trainer.default_root_dir={out}",
                 f"--data.init_args.predict_dir={det.data / 'val' / 'images'}"]) == 0  # fmt: skip
    return json.loads((out / "predictions" / "results.json").read_text())


def _unmatched(expected: list[dict], got: list[dict], top: int, score_tol: float, box_tol: float) -> list[dict]:
    """The ``top`` best detections per image of ``expected`` that have no counterpart in ``got``.

    Near-equal scores of a barely trained detector may come in either order, so detections are matched by
    image, category, score and box rather than by position.
    """
    missing = []
    for image_id in {r["image_id"] for r in expected}:
        best = sorted((r for r in expected if r["image_id"] == image_id), key=lambda r: -r["score"])[:top]
        pool = [r for r in got if r["image_id"] == image_id]
        for r in best:
            if not any(g["category_id"] == r["category_id"] and abs(g["score"] - r["score"]) <= score_tol
                       and np.abs(np.subtract(g["bbox"], r["bbox"])).max() <= box_tol for g in pool):  # fmt: skip
                missing.append(r)
    return missing


def test_detection_export_writes_the_metadata_predict_needs(det):
    from tasks.common.deploy import TaskModel

    task = TaskModel(det.fp32).task
    assert task["name"] == "detection" and task["category_ids"] == [3, 17, 90] and task["image_size"] == 128
    assert task["class_names"] == ["rectangle", "ellipse", "triangle"]
    assert task["detector"]["max_det_per_image"] == 100 and len(task["detector"]["aspect_ratios"]) == 3
    sidecar = json.loads(Path(f"{det.fp32}.json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 3, 128, 128] and sidecar["max_abs_diff"] < 1e-3


def test_detection_predict_from_the_exported_file_gives_the_checkpoint_boxes(det):
    from_ckpt = _det_predict(det, det.ckpt, "pred_ckpt")
    from_file = _det_predict(det, det.fp32, "pred_fp32")
    val = json.loads((det.data / "annotations" / "instances_val.json").read_text())
    assert {r["image_id"] for r in from_file} == {im["id"] for im in val["images"]}  # the annotation's image ids
    assert {r["category_id"] for r in from_file} <= {3, 17, 90}  # original category ids
    assert len(from_file) == len(from_ckpt)
    assert _unmatched(from_ckpt, from_file, top=20, score_tol=1e-4, box_tol=0.5) == []
    drawn = sorted(p.name for p in (det.root / "pred_fp32" / "predictions").glob("*_det.png"))
    assert len(drawn) == len(val["images"])


def test_export_refuses_another_size_for_a_detector(det, tmp_path):
    with pytest.raises(ValueError, match="runs at its image_size only"):
        main(["export", "--ckpt", str(det.ckpt), "--output", str(tmp_path / "d.onnx"), "--height", "256"])


@pytest.mark.slow
def test_quantize_detection_prints_ap_and_predict_runs_from_the_int8_file(det, capsys):
    # ONNX Runtime's quantizer needs about a minute for an EfficientDet-D0 on a busy 2-core CPU.
    assert main(["quantize", "--config", DET_CONF, "--ckpt", str(det.ckpt), "--output", str(det.int8),
                 f"--data.init_args.root={det.data}", "--calibration-batches=2"]) == 0  # fmt: skip
    table = _table(capsys.readouterr().out)
    assert {"AP", "AP50", "AP rectangle", "AP ellipse", "AP triangle"} <= set(table)
    assert table["AP"][0] == pytest.approx(_best_score(det.ckpt), abs=1e-3)  # fit's val/AP of that epoch
    from_int8 = _det_predict(det, det.int8, "pred_int8")
    assert from_int8 and {r["category_id"] for r in from_int8} <= {3, 17, 90}
    from tasks.common.deploy import TaskModel
    from tasks.detection.deploy import network
    from tasks.export import load_task

    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = torch.cat([t.flatten() for level in network(load_task(det.ckpt))(x) for t in level])
    got = torch.cat([t.flatten() for level in TaskModel(det.int8)(x) for t in level])
    assert torch.nn.functional.cosine_similarity(expected, got, dim=0) > 0.9


def test_quantize_detection_to_openvino_prints_ap_and_predict_runs_from_the_xml_file(det, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    xml = det.root / "int8.xml"
    assert main(["quantize", "--config", DET_CONF, "--ckpt", str(det.ckpt), "--output", str(xml),
                 f"--data.init_args.root={det.data}", "--calibration-batches=2"]) == 0  # fmt: skip
    table = _table(capsys.readouterr().out)
    assert {"AP", "AP50", "AP rectangle", "AP ellipse", "AP triangle"} <= set(table)
    assert table["AP"][0] == pytest.approx(_best_score(det.ckpt), abs=1e-3)
    from_xml = _det_predict(det, xml, "pred_openvino")
    assert from_xml and {r["category_id"] for r in from_xml} <= {3, 17, 90}
    from tasks.detection.predict import predict_folder  # the Python entry point takes the file too

    from_python = json.loads(predict_folder(xml, det.data / "val" / "images", det.root / "pf_openvino").read_text())
    assert from_python and {r["category_id"] for r in from_python} <= {3, 17, 90}
    from tasks.common.deploy import TaskModel
    from tasks.detection.deploy import network
    from tasks.export import load_task

    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = torch.cat([t.flatten() for level in network(load_task(det.ckpt))(x) for t in level])
    got = torch.cat([t.flatten() for level in TaskModel(xml)(x) for t in level])
    assert torch.nn.functional.cosine_similarity(expected, got, dim=0) > 0.9


# -- bad inputs -----------------------------------------------------------------------------------------------


def test_quantize_names_a_missing_checkpoint(seg, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--config", SEG_CONF, "--ckpt", str(tmp_path / "nope.ckpt"), "--output", "x.onnx"])
    err = capsys.readouterr().err
    assert f"checkpoint not found: {tmp_path / 'nope.ckpt'}" in err and "effbackbone fit" in err


@pytest.mark.parametrize(
    ("output", "extra", "message"),
    [
        ("x.pt", [], r"--output x\.pt: name the int8 file <something>\.onnx .* or <something>\.xml"),
        ("x.xml", ["--method=entropy"], "--method entropy is an ONNX Runtime option; OpenVINO"),
    ],
)
def test_quantize_names_an_output_or_option_that_does_not_fit(seg, capsys, output, extra, message):
    with pytest.raises(SystemExit):
        main(["quantize", "--config", SEG_CONF, "--ckpt", seg.ckpt, "--output", output, *extra])
    assert re.search(message, capsys.readouterr().err)


def test_quantize_refuses_a_config_of_another_task(seg, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--config", DET_CONF, "--ckpt", seg.ckpt, "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert "configures a tasks.detection.DetectionTask" in err and "holds a SegmentationTask" in err


def test_quantize_refuses_data_the_model_was_not_trained_with(seg, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--config", SEG_CONF, "--ckpt", seg.ckpt, "--output", str(tmp_path / "x.onnx"),
              f"--data.root={seg.data}", "--data.init_args.mean=[0.5,0.5,0.5]"])  # fmt: skip
    err = capsys.readouterr().err
    assert "disagree: mean [0.5, 0.5, 0.5] (data) vs [0.485, 0.456, 0.406] (model)" in err
    assert "config the model was trained with" in err and not (tmp_path / "x.onnx").exists()


def test_quantize_names_an_empty_training_split(seg, tmp_path, capsys):
    data = generate_masks(tmp_path / "data", SyntheticMaskSpec(num_train=2, num_val=2, size=64))
    for folder in ("images", "masks"):
        for f in (data / "train" / folder).iterdir():
            f.unlink()
    with pytest.raises(SystemExit):
        main(["quantize", "--config", SEG_CONF, "--ckpt", seg.ckpt, "--output", str(tmp_path / "x.onnx"),
              f"--data.root={data}"])  # fmt: skip
    err = capsys.readouterr().err
    assert f"calibrates on the training images, and {data / 'train'} has none" in err and "data.init_args.root" in err


def test_predict_names_a_missing_model_file(seg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model file at .*nope.onnx; pass the .onnx \(or OpenVINO .xml\)"):
        _seg_predict(seg, tmp_path / "nope.onnx", "pred_missing")


def test_predict_names_an_xml_file_that_is_not_an_openvino_model(seg, tmp_path):
    path = tmp_path / "labels.xml"
    path.write_text("<annotation><object/></annotation>")  # e.g. a Pascal VOC file passed by mistake
    with pytest.raises(ValueError, match=r"labels\.xml is not an OpenVINO model \(\.xml\).*<annotation>"):
        _seg_predict(seg, path, "pred_voc")


def test_predict_refuses_an_onnx_file_without_task_metadata(seg, tmp_path):
    import effbackbone
    from effbackbone.export import export_onnx

    path = export_onnx(effbackbone.create_model("b0"), tmp_path / "encoder.onnx", input_size=(1, 3, 64, 64),
                       dynamo=False)  # fmt: skip
    with pytest.raises(ValueError, match="has no effbackbone task metadata .*effbackbone export --ckpt"):
        _seg_predict(seg, path, "pred_encoder")


def test_predict_refuses_a_file_of_another_task(seg, det):
    with pytest.raises(ValueError, match="is a detection model but the config's model is a .*SegmentationTask"):
        _seg_predict(seg, det.fp32, "pred_other")


def test_validate_explains_that_it_needs_a_checkpoint(seg):
    with pytest.raises(ValueError, match="validate needs a Lightning checkpoint; .* is a model file"):
        main(["validate", "--config", SEG_CONF, f"--data.root={seg.data}", f"--ckpt_path={seg.fp32}"])
