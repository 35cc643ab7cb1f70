"""Unreadable image files: found before training (all at once), or left out with ``skip_unreadable``.

Each error's advice is followed in the test and must lead to a working state.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("albumentations")
pytest.importorskip("pycocotools")

from tasks.common.preflight import find_unreadable  # noqa: E402
from tasks.detection.coco_eval import coco_map  # noqa: E402
from tasks.detection.data import CocoDataModule, CocoDetection  # noqa: E402
from tasks.detection.transforms import build_det_transforms  # noqa: E402
from tasks.segmentation.data import MaskDataModule  # noqa: E402


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_header_check_is_fast_but_only_the_full_decode_finds_truncation(tmp_path):
    truncated = _truncated_jpeg(tmp_path / "t.jpg")
    (tmp_path / "fake.png").write_text("not an image")
    assert set(find_unreadable([truncated, tmp_path / "fake.png"], "header")) == {tmp_path / "fake.png"}
    bad = find_unreadable([truncated, tmp_path / "fake.png"], "full")
    assert set(bad) == {truncated, tmp_path / "fake.png"} and "truncated" in bad[truncated]
    assert find_unreadable([truncated], "off") == {}


# -- segmentation --------------------------------------------------------------------------------


@pytest.fixture
def seg_root(tmp_path: Path) -> Path:
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            for kind in ("images", "masks"):
                (tmp_path / split / kind).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (100, 50, 0)).save(tmp_path / split / "images" / f"{name}.png")
            Image.fromarray(np.eye(32, dtype=np.uint8)).save(tmp_path / split / "masks" / f"{name}.png")
    data = (tmp_path / "train" / "images" / "b.png").read_bytes()
    (tmp_path / "train" / "images" / "b.png").write_bytes(data[: len(data) // 2])  # truncated image
    (tmp_path / "val" / "masks" / "c.png").write_bytes(b"garbage")  # unreadable mask
    return tmp_path


def test_segmentation_lists_every_unreadable_file_before_training(seg_root):
    dm = MaskDataModule(str(seg_root), num_classes=2, image_size=32, batch_size=2)
    with pytest.raises(ValueError, match=r"(?s)2 of 12 image file\(s\) in .*cannot be read.*train/images/b\.png: .*"
                                         r"val/masks/c\.png: .*skip_unreadable: true"):  # fmt: skip
        dm.setup("fit")
    # The advice: skip them. One warning counts them, and training data loads.
    dm = MaskDataModule(str(seg_root), num_classes=2, image_size=32, batch_size=2, skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"left out 2 unreadable image file\(s\) of 12 .*2 sample\(s\) dropped"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 2
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 32, 32)
    # The other advice: delete each bad image together with its mask.
    for split, name in (("train", "b"), ("val", "c")):
        for kind in ("images", "masks"):
            (seg_root / split / kind / f"{name}.png").unlink()
    dm = MaskDataModule(str(seg_root), num_classes=2, image_size=32, batch_size=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2


def test_segmentation_check_off_defers_the_error_to_reading(seg_root):
    dm = MaskDataModule(str(seg_root), num_classes=2, image_size=32, batch_size=2, check_images="off")
    dm.setup("fit")  # no check
    with pytest.raises(ValueError, match=r"image .*b\.png cannot be read: .*skip_unreadable: true"):
        [dm.datasets["train"][i] for i in range(3)]


# -- COCO ----------------------------------------------------------------------------------------

CATS = [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}]


def _coco_split(root: Path, split: str = "train") -> Path:
    images = [{"id": 10 * i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    anns = [{"id": i, "image_id": 10 * i, "category_id": 3, "bbox": [4, 4, 20, 10], "iscrowd": 0, "area": 200}
            for i in (1, 2, 3)] + [{"id": 4, "image_id": 20, "category_id": 17, "bbox": [30, 20, 20, 20],
                                    "iscrowd": 0, "area": 400}]  # fmt: skip
    folder = root / split / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.new("RGB", (64, 48), (90, 120, 150)).save(folder / im["file_name"])
    _truncated_jpeg(folder / "2.jpg")
    (folder / "3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path


def _ds(path: Path, **kw) -> CocoDetection:
    return CocoDetection(path, path.parents[1] / "train" / "images", build_det_transforms("val", 128), 128, **kw)


def test_coco_lists_every_unreadable_image_and_names_the_json(tmp_path):
    path = _coco_split(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)2 of 3 image file\(s\) .*2\.jpg: OSError.*truncated.*3\.jpg: .*"
                                         r"skip_unreadable: true.*AND its image entry and annotations from "
                                         r".*instances_train\.json"):  # fmt: skip
        _ds(path, check_images="full")
    # Through the data module: the check runs by default, before training.
    with pytest.raises(ValueError, match=r"2 of 3 image file\(s\)"):
        CocoDataModule(root=str(tmp_path), image_size=128, val_split="train").setup("fit")


def test_coco_skip_unreadable_drops_images_and_their_annotations(tmp_path):
    path = _coco_split(tmp_path)
    with pytest.warns(UserWarning, match=r"left out 2 unreadable image file\(s\) of 3 .* and their 3 annotation"):
        ds = _ds(path, check_images="full", skip_unreadable=True)
    assert ds.image_ids == [10] and len(ds.coco.dataset["annotations"]) == 1 and ds[0]["labels"].tolist() == [0]
    gt = [{"image_id": 10, "category_id": 3, "bbox": [4, 4, 20, 10], "score": 1.0}]
    assert coco_map(ds.coco, gt)["AP"] == pytest.approx(1.0)  # the ground truth no longer holds the left-out boxes


def test_coco_missing_file_advice_leads_to_a_working_state(tmp_path):
    path = _coco_split(tmp_path)
    for name in ("2.jpg", "3.jpg"):  # the user deleted the bad files, as an earlier message advised
        (tmp_path / "train" / "images" / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"2 image file\(s\) listed in .* are missing .*skip_unreadable: true"):
        _ds(path)
    with pytest.warns(UserWarning, match="left out 2"):
        assert len(_ds(path, skip_unreadable=True)) == 1
    data = json.loads(path.read_text())  # or remove their entries and annotations from the json
    data["images"] = data["images"][:1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 10]
    path.write_text(json.dumps(data))
    assert len(_ds(path, check_images="full")) == 1


def test_coco_lazy_read_error_names_the_json(tmp_path):
    path = _coco_split(tmp_path)
    ds = _ds(path)  # check_images off: only existence is checked
    with pytest.raises(ValueError, match=r"2\.jpg cannot be read.*deleting the file alone is not enough: "
                                         r"instances_train\.json still lists it"):  # fmt: skip
        ds[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log"])
def test_preflight_shows_a_progress_bar_in_a_terminal_only(tmp_path: Path, monkeypatch, terminal: bool) -> None:
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert find_unreadable(tmp_path.glob("*.png"), "full", desc="checking images") == {}
    shown = err.getvalue()
    assert ("checking images" in shown and "/5 [" in shown) == terminal, shown  # the bar of 5 images
