"""Config mistakes stop before anything runs, with a message that names the key or lists the valid values."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("segmentation_models_pytorch")

from tasks.cli import run_cli  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def _error(capsys, args: list[str]) -> str:
    """Run the CLI (not the training) on ``args``; return what it printed and raised."""
    with pytest.raises((SystemExit, ValueError)) as info:
        run_cli(args, run=False)
    captured = capsys.readouterr()
    return f"{captured.out}\n{captured.err}\n{info.value}"


@pytest.fixture
def seg_args(tmp_path):
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    root = generate_masks(tmp_path / "d", SyntheticMaskSpec(num_train=2, num_val=1, size=32))
    return ["--config", str(CONF / "seg_unet_b0.yaml"), f"--data.root={root}"]  # run=False: no subcommand


def test_unknown_key_in_a_config_file(capsys, seg_args, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 2\n")
    # `effbackbone fit` says "Subcommand 'fit' does not accept option 'trainer.max_epoch'".
    assert "'trainer' does not accept option 'max_epoch'" in _error(capsys, [*seg_args, "--config", str(typo)])


def test_unknown_model_and_data_options(capsys, seg_args):
    assert "Option 'varient' is not accepted" in _error(capsys, [*seg_args, "--model.init_args.varient=b1"])
    assert "Option 'batchsize' is not accepted" in _error(capsys, [*seg_args, "--data.init_args.batchsize=2"])


def test_unknown_encoder_variant_lists_the_valid_ones(capsys, seg_args):
    text = _error(capsys, [*seg_args, "--model.init_args.variant=b9"])
    assert "Got value: b9" in text and "'b0', 'b1'" in text and "'v2_l'" in text


def test_unknown_detector_lists_the_valid_ones(capsys, tmp_path):
    pytest.importorskip("effdet")
    args = ["--config", str(CONF / "det_d0.yaml"), f"--data.root={tmp_path}", "--model.init_args.model=d11"]
    assert "unknown EfficientDet 'd11'; valid names: d0, d1" in _error(capsys, args)


def test_unknown_backbone_name_lists_the_valid_ones():
    from effbackbone.factory import create_model

    with pytest.raises(ValueError, match=r"unknown model 'b9'; valid names: b0, b1, .*v2_l"):
        create_model("b9")
