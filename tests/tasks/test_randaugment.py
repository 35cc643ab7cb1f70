"""RandAugment for dense targets (tasks/common/randaugment.py): masks and boxes stay aligned with the image."""

import albumentations as A
import numpy as np
import pytest

from tasks.common.randaugment import GEOMETRIC, OPS, RandAugmentSpec, rand_augment
from tasks.detection.transforms import build_det_transforms
from tasks.segmentation.data import IGNORE_LABEL

PHOTOMETRIC = tuple(op for op in OPS if op not in GEOMETRIC)


def _scene(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A float image with a bright square (1.0) and a grey disk (0.5) on black, and their mask (1 and 2)."""
    yy, xx = np.mgrid[:size, :size]
    square = (yy >= 20) & (yy < 50) & (xx >= 30) & (xx < 60)
    disk = (yy - 70) ** 2 + (xx - 25) ** 2 < 12**2
    image = np.zeros((size, size, 3), np.float32)
    image[square], image[disk] = 1.0, 0.5
    mask = np.zeros((size, size), np.uint8)
    mask[square], mask[disk] = 1, 2
    return image, mask


def _one_op(op: str, magnitude: float, **kwargs: object) -> A.Compose:
    return A.Compose([rand_augment(RandAugmentSpec(num_ops=1, magnitude=magnitude, ops=(op,)), **kwargs)])


@pytest.mark.parametrize("op", GEOMETRIC)
def test_geometric_ops_move_the_mask_with_the_image(op):
    image, mask = _scene()
    pipeline = _one_op(op, 10, fill=0.0, fill_mask=IGNORE_LABEL)
    moved = 0
    for seed in range(6):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=mask)
        img, target = out["image"][..., 0], out["mask"]
        assert target.dtype == np.int32 and set(np.unique(target)) <= {IGNORE_LABEL, 0, 1, 2}
        moved += not np.array_equal(target, mask)
        for cls, value in ((1, 1.0), (2, 0.5)):
            shape = np.abs(img - value) < 0.05  # the shape's pixels in the augmented image (edges blend)
            labelled = target == cls
            assert (shape & labelled).sum() >= 0.9 * shape.sum(), (op, seed, cls)  # the mask still covers it
            assert (shape & labelled).sum() >= 0.8 * labelled.sum(), (op, seed, cls)  # and not much more
        # Pixels shifted in from outside are ignored, and only those: they hold the fill (0) in the image.
        assert np.all(img[target == IGNORE_LABEL] == 0.0)
    assert moved == 6  # magnitude 10 always moves something


@pytest.mark.parametrize("op", PHOTOMETRIC)
def test_photometric_ops_change_the_image_only(op):
    image, mask = _scene()
    image = image * np.array([0.9, 0.6, 0.3], np.float32) + 0.05  # coloured, so that saturation has an effect
    boxes = np.array([[30, 20, 60, 50], [13, 58, 38, 83]], np.float32)
    params = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True)
    spec = RandAugmentSpec(num_ops=1, magnitude=10, ops=(op,))
    pipeline = A.Compose([rand_augment(spec, fill=0.0, fill_mask=IGNORE_LABEL)], bbox_params=params)
    changed = 0
    for seed in range(4):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=mask, bboxes=boxes, labels=np.array([1, 2]))
        np.testing.assert_array_equal(out["mask"], mask)
        np.testing.assert_allclose(out["bboxes"], boxes)
        assert list(out["labels"]) == [1, 2]
        changed += not np.allclose(out["image"], image)
    assert changed > 0 or op == "identity"


def _colour_pixels(image: np.ndarray, channel: int) -> np.ndarray:
    """Pixels clearly of the pure colour ``channel`` in a normalised image (ImageNet mean/std)."""
    others = [c for c in range(3) if c != channel]
    return (image[..., channel] > 1.5) & np.all(image[..., others] < -1.5, axis=-1)


def _box_of(pixels: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(pixels)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_boxes_follow_the_geometric_ops_in_the_detection_pipeline():
    """A red and a green square: after each augmentation, each kept box still covers its own square.

    With one op, the box is that square's box; two ops can only enlarge it (an axis-aligned box of a rotated or
    sheared box is larger than the shape, and a second op cannot shrink it back).
    """
    image = np.zeros((128, 128, 3), np.uint8)
    image[20:50, 30:60] = (255, 0, 0)
    image[70:110, 80:104] = (0, 255, 0)
    boxes = np.array([[30, 20, 60, 50], [80, 70, 104, 110]], np.float32)
    kept = 0
    for seed in range(16):
        spec = RandAugmentSpec(num_ops=1 + seed % 2, magnitude=10, ops=GEOMETRIC)
        pipeline = build_det_transforms("train", 128, augment=False, randaugment=spec)
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, bboxes=boxes, labels=np.array([0, 1]))
        assert len(out["bboxes"]) == len(out["labels"])
        for box, label in zip(np.asarray(out["bboxes"]), out["labels"], strict=True):
            assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= 128  # clipped, not degenerate
            pixels = _colour_pixels(out["image"], int(label))  # red is label 0, green label 1
            ys, xs = np.nonzero(pixels)
            inside = (xs >= box[0] - 1) & (xs < box[2] + 1) & (ys >= box[1] - 1) & (ys < box[3] + 1)
            assert inside.all(), (seed, label)  # the box covers its square
            if spec.num_ops == 1:
                assert _iou(_box_of(pixels), box) > 0.8, (seed, label)  # and is that square's box
            kept += 1
    assert kept >= 16


def _edge_squares(augment: bool) -> tuple[np.ndarray, np.ndarray, A.Compose]:
    """A red square near the right edge (label 0), a green one near the left edge (label 1), their boxes, and a
    pipeline whose one op, translate_x at magnitude 10, shifts by 45% of the side (58 px): one square leaves."""
    image = np.zeros((128, 128, 3), np.uint8)
    image[20:40, 100:120] = (255, 0, 0)
    image[60:80, 10:30] = (0, 255, 0)
    boxes = np.array([[100, 20, 120, 40], [10, 60, 30, 80]], np.float32)
    pipeline = build_det_transforms("train", 128, augment=augment,
                                    randaugment=RandAugmentSpec(1, 10, ("translate_x",)))  # fmt: skip
    return image, boxes, pipeline


def test_a_box_shifted_out_of_the_image_is_dropped_with_its_label():
    image, boxes, pipeline = _edge_squares(augment=False)
    for seed in range(6):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, bboxes=boxes, labels=np.array([0, 1]))
        assert len(out["bboxes"]) == len(out["labels"]) == 1
        label = int(out["labels"][0])
        assert not _colour_pixels(out["image"], 1 - label).any()  # the dropped one is gone from the image
        assert _iou(_box_of(_colour_pixels(out["image"], label)), np.asarray(out["bboxes"][0])) > 0.9


def test_randaugment_runs_together_with_the_detection_jitter():
    """``augment`` (the default) adds its flip/scale/colour jitter after RandAugment instead of replacing it."""
    image, boxes, pipeline = _edge_squares(augment=True)
    for seed in range(6):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, bboxes=boxes, labels=np.array([0, 1]))
        assert len(out["bboxes"]) == len(out["labels"]) == 1, seed  # the 58 px shift always pushes one out


def test_any_channel_count_works():
    for channels in (1, 4):
        image = np.random.default_rng(0).random((32, 32, channels), dtype=np.float32)
        pipeline = A.Compose([rand_augment(RandAugmentSpec(num_ops=3, magnitude=15), channels=channels,
                                           fill=0.0, fill_mask=IGNORE_LABEL)])  # fmt: skip
        for seed in range(20):
            pipeline.set_random_seed(seed)
            assert pipeline(image=image, mask=np.zeros((32, 32), np.uint8))["image"].shape == image.shape


def test_bad_options_are_refused_with_their_names():
    assert RandAugmentSpec.parse(None) is None
    parsed = RandAugmentSpec.parse({"num_ops": 3, "magnitude": 5, "ops": ["rotate"]})
    assert parsed == RandAugmentSpec(3, 5, ("rotate",))
    with pytest.raises(ValueError, match="unknown randaugment key.*'n'"):
        RandAugmentSpec.parse({"n": 2})
    with pytest.raises(ValueError, match="magnitude must be in \\[0, 30\\]"):
        RandAugmentSpec(2, 31)
    with pytest.raises(ValueError, match="num_ops must be an integer >= 1"):
        RandAugmentSpec(0, 5)
    with pytest.raises(ValueError, match="randaugment ops \\['blur'\\] unknown"):
        RandAugmentSpec(2, 5, ("blur",))
