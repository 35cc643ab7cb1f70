"""Counting each image once under DDP: the one place where ranks' per-image work is merged.

Lightning's ``DistributedSampler`` pads the ranks to equal length by repeating images, so anything
computed per image (COCO results, written predictions, metric states) would count those twice.
Two tools cover every case: :func:`unrepeated_eval_sampler` for metrics accumulated inside each rank
(torchmetrics states), and :func:`gather_per_image` for per-image records gathered to every rank.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj: Any) -> list[Any]:  # noqa: ANN401 - any picklable object
    """``obj`` from every rank (a one-element list outside DDP); every rank must call it."""
    if _world_size() == 1:
        return [obj]
    out: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_per_image(records: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
    """Every rank's ``{image key: record}`` merged, each image once (from the first rank that has it).

    Every rank must call it (also one without records); each gets the same merged dict, in key order of
    rank 0, then rank 1, ...
    """
    merged: dict[Hashable, Any] = {}
    for rank_records in all_gather_objects(dict(records)):
        for key, record in rank_records.items():
            merged.setdefault(key, record)
    return merged


def unrepeated_eval_sampler(dataset: Dataset[Any]) -> Sampler[int] | None:
    """Under DDP with at least one image per rank: a sampler that gives each image to one rank only.

    Returns ``None`` outside DDP, and when there are fewer images than ranks (a rank without any
    batch would skip the epoch-end metric sync that the others wait in); Lightning's padding
    sampler is used then, and the repeated images count twice in the metrics.
    """
    world = _world_size()
    if world == 1 or len(dataset) < world:  # type: ignore[arg-type]
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=torch.distributed.get_rank(), shuffle=False)
