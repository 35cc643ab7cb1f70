"""Both tasks under ``strategy=ddp`` with 2 CPU processes (gloo): a real ``fit`` whose end-of-fit validation
(mIoU, COCO mAP) equals a single-process ``validate`` of the checkpoint it wrote.

The validation sets are odd-sized or uneven on purpose: Lightning's ``DistributedSampler`` pads the
ranks with repeated images. Segmentation gives each image to one rank only
(``tasks.common.sampling.unrepeated_eval_sampler``); detection drops the repeats when it gathers the
results. One detection rank sees an image without any box. Each run has a timeout, so a hang fails
the test instead of blocking CI; evaluation batches hold one image, so the per-image numbers are
computed identically in both settings and the comparison is exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not built", allow_module_level=True)

from tasks.cli import run_cli  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TIMEOUT_S = 240


def _ddp_fit(config: Path, tmp: Path, *extra: str) -> dict[str, float]:
    """``fit`` under DDP in a fresh process group; returns rank 0's final metrics. Kills everything on timeout."""
    conf = tmp / "ddp.yaml"
    conf.write_text(f"""
trainer:
  strategy: ddp
  devices: 2
  accelerator: cpu
  limit_train_batches: 1
  enable_checkpointing: true
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp / 'ckpt'}, save_last: true}}
    - class_path: reliability_callbacks.DumpMetrics
      init_args: {{path: {tmp / 'metrics.json'}}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    for key in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):  # let Lightning launch its own group
        env.pop(key, None)
    cmd = [sys.executable, "-m", "tasks.cli", "fit", "--config", str(config), "--config", str(conf),
           f"--trainer.default_root_dir={tmp}", *extra]  # fmt: skip
    log = tmp / "ddp.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # both ranks
            proc.wait()
            pytest.fail(f"DDP fit did not finish in {TIMEOUT_S} s (hang?): {log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-4000:]
    metrics = json.loads((tmp / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    return metrics


def _single_validate(config: Path, tmp: Path, *extra: str) -> dict[str, float]:
    cli = run_cli(["--config", str(config), f"--trainer.default_root_dir={tmp / 'single'}", *extra], run=False)
    return cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(tmp / "ckpt" / "last.ckpt"),
                                verbose=False)[0]  # fmt: skip


def test_segmentation_ddp_miou_equals_single_process(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    from tasks.segmentation.synthetic import SyntheticMaskSpec, generate_masks

    root = generate_masks(tmp_path / "data", SyntheticMaskSpec(num_train=4, num_val=5, size=32))  # 5: odd
    config = HERE / "conf" / "seg_tiny.yaml"
    data = [f"--data.root={root}", "--data.init_args.eval_batch_size=1"]
    ddp = _ddp_fit(config, tmp_path, *data)
    single = _single_validate(config, tmp_path, *data)
    assert 0 < single["val/miou"] < 1
    for key in ("val/miou", "val/mdice", "val/pixel_acc", "val/iou_background"):
        assert ddp[key] == single[key], (key, ddp[key], single[key])


def test_detection_ddp_map_equals_single_process_with_a_rank_without_boxes(tmp_path):
    pytest.importorskip("effdet")
    from tasks.detection.synthetic import SyntheticCocoSpec, ensure_synthetic_coco

    root = tmp_path / "data"
    spec = SyntheticCocoSpec(num_train=4, num_val=2, num_classes=2, category_ids=(3, 17), min_size=64, max_size=128,
                             empty_fraction=0.0)  # fmt: skip
    ensure_synthetic_coco(root, spec)
    val = root / "annotations" / "instances_val.json"
    coco = json.loads(val.read_text())
    second = sorted(im["id"] for im in coco["images"])[1]  # rank 1's only image: no boxes at all
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != second]
    assert coco["annotations"], "rank 0's image must keep its boxes"
    val.write_text(json.dumps(coco))
    config = HERE / "conf" / "det_tiny.yaml"
    data = [f"--data.root={root}", "--data.init_args.synthetic=null"]
    ddp = _ddp_fit(config, tmp_path, *data)
    single = _single_validate(config, tmp_path, *data, "--data.init_args.batch_size=1")
    assert single["val/AP50"] > 0  # not a vacuous 0 == 0: a dropped or double-counted image would change it
    for key in ("val/AP", "val/AP50", "val/AP75"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-9), (key, ddp[key], single[key])
