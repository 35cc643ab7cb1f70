"""Pictures that read at a glance: validation samples, legends, overlay tints, detection drawings."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightning")

from tasks.segmentation.callbacks import SegmentationOverlays, spread_sample  # noqa: E402
from tasks.segmentation.viz import PALETTE, class_palette, legend_entries, overlay, render_panel  # noqa: E402

NAMES = ["background", "road", "car"]


def test_spread_sample_covers_the_split_first_to_last():
    assert spread_sample(32, 4) == [0, 10, 21, 31]
    assert spread_sample(3, 4) == [0, 1, 2] and spread_sample(1, 4) == [0] and spread_sample(0, 4) == []


def test_validation_overlays_draw_a_fixed_spread_sample_not_the_first_images():
    """40 val images in batches of 8 (think video frames): rows come from across the split, every epoch the same."""
    loader = SimpleNamespace(sampler=range(40), dataset=range(40), batch_size=8)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, val_dataloaders=loader, num_val_batches=[5],
                              datamodule=None)  # fmt: skip
    callback = SegmentationOverlays(num_samples=4)
    for epoch in range(2):
        trainer.current_epoch = epoch
        callback.on_validation_epoch_start(trainer, None)
        for b in range(5):
            # Each image's pixels hold its index in the split, so the rows say which images were kept.
            index = torch.arange(8 * b, 8 * b + 8, dtype=torch.float32)[:, None, None, None].expand(8, 3, 4, 4)
            batch = {"image": index, "mask": torch.zeros(8, 4, 4, dtype=torch.long)}
            callback.on_validation_batch_end(trainer, None, {"preds": batch["mask"]}, batch, b)
        kept = [int(np.unique(row[0])[0]) for row in callback._rows]  # stretched per image: all equal
        assert len(kept) == 4
    assert callback._wanted == {0, 13, 26, 39}


def test_legend_lists_the_classes_shown_and_ignored_pixels_not_as_a_class():
    truth = np.array([[0, 1], [-1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    texts = [text for _, text in legend_entries(NAMES, class_palette(NAMES), truth, pred)]
    assert texts == ["0 background", "1 road", "ignored (not scored)"]  # no "car": not in the picture


def test_overlay_tints_stand_apart_from_an_object_of_the_class_colour():
    """A red object predicted as the red class: the tint must not vanish into the object."""
    rgb = np.full((8, 8, 3), 120, np.uint8)
    rgb[2:6, 2:6] = PALETTE[1]  # the object has exactly its class's palette colour
    labels = np.zeros((8, 8), np.int64)
    labels[2:6, 2:6] = 1
    out = overlay(rgb, labels, class_palette(NAMES)).astype(int)
    inside, outside = out[3, 3], out[0, 0]
    assert outside[0] == outside[1] == outside[2]  # the image is shown in grey
    assert np.abs(inside - rgb[3, 3].astype(int)).sum() > 60 and inside[0] > inside[1] + 40  # tinted, still reddish
    assert (out[2, 2:6] == 255).all() or (out[5, 2:6] == 255).all()  # white region border


def test_panel_has_rows_of_different_sizes_and_a_legend():
    rows = [(np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.int64), np.ones((20, 30), np.int64)),
            (np.zeros((30, 20, 3), np.uint8), None, np.full((30, 20), 2, np.int64))]  # fmt: skip
    panel = render_panel(rows, NAMES, title="epoch 0", min_side=60)
    assert panel.width == 4 * 60 + 5 * 4 and panel.height > 2 * 64  # cells of 30 x 30 pixels, enlarged 2x


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes_xyxy": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_drawing_keeps_one_box_per_object_above_the_threshold():
    pytest.importorskip("effdet")
    from tasks.detection.predict import boxes_to_draw

    copies = [[10.0 + i, 10.0, 50.0 + i, 50.0] for i in range(10)]  # ten near-copies of one object
    det = _detections([*copies, [60, 60, 90, 90], [12, 10, 52, 50]], [0.9 - 0.05 * i for i in range(10)] + [0.2, 0.8],
                      [0] * 11 + [1])  # fmt: skip
    kept = boxes_to_draw(det, score_threshold=0.3).tolist()
    assert kept == [0, 11]  # the best copy; the other class's box on the same object stays; 0.2 is below 0.3


def test_detection_drawing_is_quiet_without_boxes_and_carries_a_legend(tmp_path):
    pytest.importorskip("effdet")
    from tasks.detection.predict import draw_detections

    path = tmp_path / "small.png"
    Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = draw_detections(path, _detections([[0, 0, 1, 1]], [0.1], [0]), ["cat"], score_threshold=0.3)
    assert empty.width == 80 * 4  # a small image is enlarged (longer side >= 320) so labels stay readable
    assert empty.height > 60 * 4  # legend strip below: threshold and "0 of 1 detections"
    drawn = np.asarray(draw_detections(path, _detections([[10, 10, 40, 40]], [0.9], [0]), ["cat"]))
    assert (drawn[: 60 * 4] == 0).all(axis=2).any()  # the black outer line of the box


def test_results_json_keeps_every_detection_while_the_picture_shows_fewer(tmp_path):
    pytest.importorskip("effdet")
    from tasks.detection.predict import write_predictions

    path = tmp_path / "a.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path)
    det = _detections([[10.0 + i, 10, 40 + i, 40] for i in range(20)], [0.9 - 0.01 * i for i in range(20)], [0] * 20)
    results = write_predictions([{**det, "image_id": 1, "file_name": str(path)}], tmp_path / "out", [7], ["cat"])
    assert len(json.loads(results.read_text())) == 20 and (tmp_path / "out" / "a_det.png").is_file()
