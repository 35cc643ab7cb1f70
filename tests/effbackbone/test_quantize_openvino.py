"""int8 with OpenVINO + NNCF (``quantize_int8(..., backend="openvino")``): outputs close to fp32, IR files, errors.

The encoder is ``conftest.py``'s (random weights with BatchNorm statistics from one random batch, cut after C3);
``test_quantize.py`` runs its closeness tests (encoder at three sizes, U-Net, EfficientDet) with this backend
too. Here: the IR files, their metadata and the errors. NNCF quantizes a cut B0 in about 2 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import effbackbone

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from effbackbone.ov_runtime import OpenVinoModel, load_openvino_model, read_ir_metadata  # noqa: E402
from effbackbone.quantize import load_int8, quantize_int8  # noqa: E402
from effbackbone.runtime import load_runtime_file  # noqa: E402
from tests.effbackbone.conftest import MEAN  # noqa: E402
from tests.effbackbone.test_quantize import _calibration, _cos  # noqa: E402


def test_ir_file_carries_metadata_and_round_trips(tf_encoder_ov: OpenVinoModel, tmp_path: Path) -> None:
    path = tf_encoder_ov.save(tmp_path / "enc_int8.xml")
    assert path.with_suffix(".bin").is_file()
    meta = read_ir_metadata(path)  # read without OpenVINO, as predict does first
    assert (meta["kind"], meta["variant"], meta["padding"]) == ("encoder", "b0", "same")
    assert meta["input"]["mean"] == list(MEAN) and meta["outputs"] == {"dict": {"C1": "C1", "C2": "C2", "C3": "C3"}}
    assert meta["quantization"]["backend"] == "openvino-nncf" and meta["quantization"]["calibration_images"] == 4
    x = torch.randn(2, 3, 64, 96)
    expected = tf_encoder_ov(x)
    for loaded in (load_int8(path), load_runtime_file(path, num_threads=1), load_openvino_model(path)):
        assert isinstance(loaded, OpenVinoModel) and loaded.rules == tf_encoder_ov.rules
        for name, value in loaded(x).items():
            torch.testing.assert_close(value, expected[name])


def test_ir_files_are_int8_sized(tf_encoder: nn.Module, tf_encoder_ov: OpenVinoModel) -> None:
    fp32_bytes = sum(p.numel() * 4 for p in tf_encoder.parameters())
    assert tf_encoder_ov.size_bytes < fp32_bytes / 2.5


def test_first_shapes_get_static_copies_and_later_ones_the_dynamic_model(tf_encoder_ov: OpenVinoModel) -> None:
    model = OpenVinoModel(tf_encoder_ov.model, metadata=tf_encoder_ov.metadata, num_threads=1, static_shapes=2)
    dynamic = OpenVinoModel(tf_encoder_ov.model, metadata=tf_encoder_ov.metadata, num_threads=1, static_shapes=0)
    shapes = [(1, 3, 64, 64), (2, 3, 64, 96), (1, 3, 96, 64), (1, 3, 64, 64)]
    for shape in shapes:
        x = torch.randn(*shape)
        got, ref = model(x), dynamic(x)
        for name in ref:  # the same int8 network; other kernels round a few values the other way (cosine 0.998)
            assert _cos(got[name], ref[name]) > 0.99, (shape, name)
    assert model.static_compiled == shapes[:2] and dynamic.static_compiled == []


def test_input_rules_are_checked(tf_encoder_ov: OpenVinoModel) -> None:
    with pytest.raises(ValueError, match=r"has 1 channels.*\(N, 3, H, W\)"):
        tf_encoder_ov(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tensorrt"}, "backend must be one of onnxruntime, openvino, got 'tensorrt'"),
        ({"backend": "openvino", "method": "entropy"}, "method='entropy' is an ONNX Runtime option"),
        ({"backend": "openvino", "per_channel": False}, "per_channel=False is an ONNX Runtime option"),
        ({"backend": "openvino", "output_path": "model.onnx"}, r"writes a \.xml file; name it <something>\.xml"),
        ({"output_path": "model.xml"}, r"backend='onnxruntime' writes a \.onnx file"),
    ],
)
def test_options_that_do_not_go_with_the_backend_are_refused(kwargs: dict, message: str) -> None:
    model = effbackbone.create_model("b0", out_indices=(0,))
    with pytest.raises(ValueError, match=message):
        quantize_int8(model, _calibration(1), **kwargs)


def test_missing_weights_file_and_foreign_xml_are_named(tf_encoder_ov: OpenVinoModel, tmp_path: Path) -> None:
    path = tf_encoder_ov.save(tmp_path / "m.xml")
    path.with_suffix(".bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"m\.xml has no weights file next to it \(m\.bin\)"):
        load_int8(path)
    other = tmp_path / "other.xml"
    other.write_text("<config><a/></config>")
    with pytest.raises(ValueError, match=r"other\.xml is not an OpenVINO model.*<config>"):
        read_ir_metadata(other)


def test_missing_openvino_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from effbackbone import ov_runtime

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(ImportError, match=r"nncf is required .*pip install effbackbone\[openvino\]"):
        ov_runtime.require("nncf")
    with pytest.raises(ImportError, match=r"nncf is required"):
        ov_runtime.check_installed()


def test_quantizing_sends_no_usage_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    telemetry = pytest.importorskip("openvino_telemetry")
    import openvino as ov

    monkeypatch.setenv("HOME", str(tmp_path))  # OpenVINO keeps its consent and counter files there
    calls: list[str] = []
    recorders = {}
    for name in ("start_session", "send_event", "send_error", "send_stack_trace", "end_session"):
        recorders[name] = lambda self, *a, _name=name, **k: calls.append(_name)
        monkeypatch.setattr(telemetry.Telemetry, name, recorders[name])
    model = effbackbone.create_model("b0", out_indices=(0,)).eval()
    ov.convert_model(model, example_input=torch.randn(1, 3, 32, 32))  # OpenVINO's own entry point reports
    assert "send_event" in calls
    calls.clear()
    quantize_int8(model, _calibration(1), backend="openvino")
    assert calls == []
    for name, recorder in recorders.items():  # put back after the call: OpenVINO's own use is left as it was
        assert telemetry.Telemetry.__dict__[name] is recorder
