"""A generated COCO set of the shape real subsets have: COCO's 80 sparse category ids, crowd, empty and gray images."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tasks.detection.synthetic import SyntheticCocoSpec, generate_synthetic_coco

#: COCO's 80 category ids (1..90 with ten gaps).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def many_class_coco(
    root: Path,
    num_train: int = 16,
    num_val: int = 6,
    size: tuple[int, int] = (64, 128),
    crowd_every: int = 0,
    gray_every: int = 0,
) -> Path:
    """Generated shapes under 80 sparse COCO ids, of which six are used (ids spread over the range).

    Args:
        root: Dataset folder (``annotations/instances_{train,val}.json``, ``{train,val}/images``).
        num_train: Training images (20 % of all images are empty).
        num_val: Validation images.
        size: Smallest and largest image side.
        crowd_every: Mark every n-th annotation ``iscrowd`` (0: only the first one).
        gray_every: Save every n-th image (from the second) as 1-channel grayscale (0: none).
    """
    spec = SyntheticCocoSpec(num_train=num_train, num_val=num_val, num_classes=6, min_size=size[0],
                             max_size=size[1], empty_fraction=0.2, seed=1)  # fmt: skip
    generate_synthetic_coco(root, spec)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        old = {c["id"]: k for k, c in enumerate(data["categories"])}
        data["categories"] = [{"id": i, "name": f"c{i}"} for i in COCO_IDS]
        for k, a in enumerate(data["annotations"]):
            a["category_id"] = COCO_IDS[old[a["category_id"]] * 13]
            a["iscrowd"] = int(k % crowd_every == 0) if crowd_every else int(k == 0)
        for k, image in enumerate(data["images"]):
            if gray_every and k % gray_every == 1:
                file = root / split / "images" / image["file_name"]
                Image.open(file).convert("L").save(file)
        path.write_text(json.dumps(data))
    return root
