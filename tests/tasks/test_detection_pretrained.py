"""``DetectionTask(pretrained="coco")``: effdet's COCO checkpoint through the task; checkpoints load without it.

The checkpoint is served from 127.0.0.1 (:mod:`hub_server`); every other connection is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

effdet = pytest.importorskip("effdet")
pytest.importorskip("lightning")

from hub_server import hashed_name, loopback_only, randomize_norms, serving, torch_bytes  # noqa: E402

from tasks.detection import DetectionTask  # noqa: E402
from tasks.export import load_task  # noqa: E402

SIZE = 128


def test_task_starts_from_coco_and_its_checkpoint_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from effdet.config.model_config import efficientdet_model_param_dict

    loopback_only(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    size = (SIZE, SIZE)
    ref = effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False, image_size=size)
    randomize_norms(ref)
    data = torch_bytes(ref.state_dict())
    name = hashed_name("tf_efficientdet_d0_task", data)
    monkeypatch.setitem(efficientdet_model_param_dict["tf_efficientdet_d0"], "url", "https://example.invalid/" + name)
    with serving() as server:
        monkeypatch.setenv("EFFBACKBONE_EFFDET_BASE_URL", server.url + "/effdet/")
        server.add("/effdet/" + name, data, "ok")
        with pytest.warns(UserWarning, match="re-initialised it for num_classes=2"):
            task = DetectionTask(num_classes=2, image_size=SIZE, pretrained="coco")  # offline-ok: local server
    model = task.detector.model
    torch.testing.assert_close(model.box_net.state_dict(), ref.box_net.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(model.fpn.state_dict(), ref.fpn.state_dict(), rtol=0, atol=0)
    assert task.hparams.pretrained == "coco"

    # A checkpoint of the fine-tuned task holds every weight: loading it fetches nothing (server gone, cache empty).
    ckpt = tmp_path / "task.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {**task.hparams,
                "_class_path": "tasks.detection.DetectionTask"}, "pytorch-lightning_version": "2.5.0"}, ckpt)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    loaded = load_task(ckpt)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0]["scores"], task.eval()(x)[0]["scores"])
