"""Class sets of real datasets: a void label listed among the names, num_classes overrides, class weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightning")
pytest.importorskip("albumentations")

from tasks.segmentation.data import IGNORE_LABEL, MaskDataModule  # noqa: E402

# CamVid-style: 11 classes, then the void label "unlabelled" (id 11) that is ignored.
NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "cyclist"]
NAMES_WITH_VOID = [*NAMES, "unlabelled"]


def _frames(root: Path, meta: dict, size: tuple[int, int] = (24, 40), n: int = 3) -> Path:
    """A video-like folder: non-square frames whose masks use ids 0..10 and the void id 11."""
    for split in ("train", "val"):
        for i in range(n):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.png")
            mask = (np.arange(size[0] * size[1]).reshape(size) % 12).astype(np.uint8)  # 11 = the void label
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps(meta))
    return root


def test_void_name_listed_last_is_not_a_class(tmp_path):
    root = _frames(tmp_path, {"classes": NAMES_WITH_VOID, "ignore_index": 11, "class_weights": [1.0] * 11 + [0.0]})
    for num_classes in (None, 11):  # from the file, or overridden on the command line
        dm = MaskDataModule(str(root), num_classes=num_classes, image_size=16, batch_size=2)
        assert dm.num_classes == 11 and dm.class_names == NAMES and dm.ignore_index == 11
        assert dm.class_weights == [1.0] * 11  # the void entry of the weights goes with its name
    dm.setup("validate")
    mask = dm.datasets["val"][0]["mask"]
    assert int(mask.max()) == 10 and bool((mask == IGNORE_LABEL).any())


def test_num_classes_that_disagrees_with_the_names_fails_early_naming_both(tmp_path):
    root = _frames(tmp_path, {"classes": NAMES_WITH_VOID})  # no ignore_index: 12 names
    with pytest.raises(ValueError, match=r"num_classes=11 but .*classes\.json lists 12 class names; set "
                                         r"num_classes=12 .*or set ignore_index=11 if 'unlabelled'"):  # fmt: skip
        MaskDataModule(str(root), num_classes=11)
    root2 = _frames(tmp_path / "b", {"classes": NAMES_WITH_VOID, "ignore_index": 11})
    with pytest.raises(ValueError, match=r"num_classes=12 but .*11 class names \(after leaving out 'unlabelled', "
                                         r"the name of ignore_index 11"):  # fmt: skip
        MaskDataModule(str(root2), num_classes=12)


def test_class_weights_of_the_wrong_length_fail_when_built(tmp_path):
    from tasks.segmentation.task import SegmentationTask

    with pytest.raises(ValueError, match=r"class_weights has 2 values but num_classes=3"):
        SegmentationTask(num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"class_weights is not supported with mode='binary'"):
        SegmentationTask(num_classes=2, mode="binary", class_weights=[1.0, 2.0])
    root = _frames(tmp_path, {"classes": NAMES, "class_weights": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"class_weights \(from .*classes\.json\) has 2 values but num_classes=11"):
        MaskDataModule(str(root))


def test_cli_override_of_num_classes_and_weights_from_classes_json(tmp_path):
    pytest.importorskip("jsonargparse")
    from tasks.cli import run_cli

    weights = [float(i + 1) for i in range(11)] + [0.0]
    root = _frames(tmp_path / "d", {"classes": NAMES_WITH_VOID, "ignore_index": 11, "class_weights": weights})
    config = Path(__file__).resolve().parents[1] / "conf" / "seg_unet_b0.yaml"
    cli = run_cli([
        "fit", "--config", str(config), f"--data.root={root}", "--data.init_args.num_classes=11",
        "--data.image_size=32", f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])  # fmt: skip
    model = cli.model
    assert model.num_classes == 11 and model.class_names == NAMES
    torch.testing.assert_close(model.criterion.terms["ce"].weight, torch.tensor(weights[:11]))


def test_validation_keeps_the_aspect_ratio_by_default(tmp_path):
    root = _frames(tmp_path, {"classes": NAMES_WITH_VOID, "ignore_index": 11}, size=(24, 40))
    dm = MaskDataModule(str(root), image_size=16, batch_size=2)  # default eval_resize: pad
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[-2:] == (24, 40) and batch["mask"].shape[-2:] == (24, 40)
    squashed = MaskDataModule(str(root), image_size=16, batch_size=2, eval_resize="resize")
    squashed.setup("validate")
    assert next(iter(squashed.val_dataloader()))["image"].shape[-2:] == (16, 16)
