"""``effbackbone info``: the per-variant table, JSON output and a custom-phi row."""

import json

import pytest

from effbackbone import VARIANTS
from effbackbone.arch import PAPER_COST
from effbackbone.info import main
from tasks.cli import main as cli_main


def test_table_lists_every_variant(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(VARIANTS) <= set(rows)
    assert "| b0 | 1 | 1 | 224 | 5.29 | 3.60 | 0.39 | 5.3 | 0.39 | 16, 24, 40, 112, 320 |" in out
    assert "| b7 | 2 | 3.1 | 600 | 66.35 | 62.14 | 37.75 | 66 | 37 | 32, 48, 80, 224, 640 |" in out
    assert "| lite0 |" in out and rows["lite0"].count(" - ") == 2  # the paper gives no Lite numbers


def test_json_output_parses_and_has_the_custom_phi_model(capsys):
    assert main(["--json", "--variants", "b0,v2_s", "--phi", "1.5", "--base", "lite0"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in data["models"]]
    assert names == ["b0", "v2_s", "lite0@phi=1.5"]
    b0, v2s, custom = data["models"]
    assert (b0["params"], b0["encoder_params"], b0["macs"]) == (5288548, 3595388, 385814752)
    assert (b0["paper_params_m"], b0["paper_flops_b"]) == PAPER_COST["b0"]
    assert v2s["strides"] == [2, 4, 8, 16, 32] and v2s["channels"] == [24, 48, 64, 160, 256]
    assert custom["family"] == "lite" and custom["width"] == pytest.approx(1.1**1.5, abs=1e-4)
    assert custom["paper_params_m"] is None
    assert data["custom"]["flops_base"] == pytest.approx(1.2 * 1.1**2 * 1.15**2)


def test_custom_phi_row_and_constraint_line(capsys):
    assert main(["--variants", "b0", "--phi", "-1", "--alpha", "1.25", "--beta", "1.1", "--gamma", "1.1"]) == 0
    out = capsys.readouterr().out
    assert "| b0@phi=-1 | 0.9091 | 0.8 | 200 |" in out  # 224 / 1.1 = 203.6 -> 200
    assert "alpha*beta^2*gamma^2 = 1.830" in out


def test_custom_phi_far_from_constraint_warns(capsys):
    with pytest.warns(UserWarning, match="constrains it to ~2"):
        assert main(["--variants", "b0", "--phi", "1", "--alpha", "2.0"]) == 0
    assert "alpha*beta^2*gamma^2 = 3.200" in capsys.readouterr().out


def test_bad_arguments_give_exit_status_2(capsys):
    assert main(["--variants", "b0,b9"]) == 2
    assert "valid names: b0, b1" in capsys.readouterr().err
    assert main(["--phi", "1", "--base", "resnet"]) == 2
    assert main(["--phi", "not-a-number"]) == 2
    assert main(["--help"]) == 0
