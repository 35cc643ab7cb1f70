"""benchmarks/bench_deploy.py: the quick run end to end (slow), and the docs tables written between markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _deploy_docs():  # noqa: ANN202 - the benchmark module, imported from its folder
    sys.path.insert(0, str(BENCH))
    try:
        import deploy_docs
    finally:
        sys.path.remove(str(BENCH))
    return deploy_docs


def _run(group: str, names: list[str]) -> dict:
    accuracy = {"top1_agreement": 0.9, "top5_hit": 1.0, "cosine": 0.99}
    timing = {"median_s": 0.1, "speedup_vs_ref": 1.0, "speedup_q1": 0.9, "speedup_q3": 1.1, "speedup_vs_eager": 1.0}
    rows = [{"name": n, **timing, "size_mb": 5.0, "accuracy": accuracy, "note": ""} for n in names]
    machine = {"cpu": "Test CPU", "cpu_count": 2, "torch": "2.x", "time": "now", "git_commit": "abc"}
    return {
        "machine": {**machine, "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 1.0, 1.0]},
        "args": {"threads": 1, "device": "cpu", "rounds": 3},
        "cpu_flags": {"avx2": True, "avx512_vnni": False},
        "groups": {group: {"title": f"{group} title", "accuracy_note": "note", "rows": rows, "failed": []}},
    }


def test_docs_tables_replace_only_the_measured_groups(tmp_path: Path) -> None:
    docs = _deploy_docs()
    page = tmp_path / "deploy.md"
    page.write_text("# Deploy\n\nText that stays.\n")
    docs.write(page, _run("lite0", ["ours eager fp32", "ONNX Runtime int8"]))
    docs.write(page, _run("unet", ["ours eager fp32"]))
    first = page.read_text()
    assert first.startswith("# Deploy\n\nText that stays.\n") and first.count(docs.HEADING) == 1
    assert "| ONNX Runtime int8 | 100 | 1.00 (0.90-1.10) | 1.00 | 5.0 | 0.900 / 1.000 (cos 0.9900) |" in first
    assert "reports avx2; lacks avx512_vnni" in first and "load average 1.0/2.0" in first
    docs.write(page, _run("lite0", ["ours eager fp32", "pruned 0.5, fast"]))  # a new lite0 run
    second = page.read_text()
    assert "pruned 0.5, fast" in second and "ONNX Runtime int8" not in second
    assert second.count("<!-- bench_deploy:cpu:unet -->") == 1 and "unet title" in second


@pytest.mark.slow
def test_quick_run_measures_every_cpu_row(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("timm")
    out = tmp_path / "deploy.json"
    cmd = [sys.executable, str(BENCH / "bench_deploy.py"), "--quick", "--groups", "b0", "--no-bf16", "--rounds", "1",
           "--warmup", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    subprocess.run(cmd, check=True, env=env, timeout=1800, capture_output=True)
    rows = {r["name"]: r for r in json.loads(out.read_text())["groups"]["b0"]["rows"]}
    assert {"ours eager fp32", "ours fast (BN folded, channels_last)", "ONNX Runtime fp32", "ONNX Runtime int8",
            "pruned 0.5, fast", "pruned 0.5, ONNX Runtime int8"} <= set(rows)  # fmt: skip
    assert rows["ONNX Runtime fp32"]["accuracy"]["cosine"] > 0.999
    assert rows["ONNX Runtime int8"]["accuracy"]["cosine"] > 0.95
    assert rows["ONNX Runtime int8"]["size_mb"] < rows["ONNX Runtime fp32"]["size_mb"] / 3
    assert all(r["median_s"] > 0 for r in rows.values())
