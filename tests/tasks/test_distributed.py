"""Each image counted once under DDP: every rank's per-image records gathered, repeats dropped, empty ranks fine."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tasks.common import distributed  # noqa: E402
from tasks.common.distributed import all_gather_objects, gather_per_image  # noqa: E402


def _result(image_id: int, score: float) -> dict:
    return {"image_id": image_id, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": score}


def test_merge_drops_sampler_repeats_and_accepts_empty_ranks(monkeypatch):
    rank0 = {1: [_result(1, 0.9)], 3: [_result(3, 0.8)]}
    rank1 = {2: [_result(2, 0.7)], 1: [_result(1, 0.1)]}  # image 1 repeated by the sampler's padding
    rank2: dict = {}  # a rank that had no images
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [rank0, rank1, rank2])
    merged = gather_per_image({})
    assert sorted(merged) == [1, 2, 3]
    assert sorted((r["image_id"], r["score"]) for rs in merged.values() for r in rs) == [(1, 0.9), (2, 0.7), (3, 0.8)]
    # An image with no detections still counts as evaluated (its boxes are misses).
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [{4: []}, {5: [_result(5, 0.5)]}])
    merged = gather_per_image({})
    assert sorted(merged) == [4, 5] and sum(map(len, merged.values())) == 1


def _worker(rank: int, world: int, port: int, queue: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = {rank + 1: [_result(rank + 1, 0.5)]} if rank == 0 else {}  # rank 1 has nothing
        queue.put((rank, gather_per_image(mine)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_gather_over_two_gloo_ranks_without_hang():
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(queue.get() for _ in range(2))
    assert got[0] == got[1] == {1: [_result(1, 0.5)]}  # both ranks evaluate the same, complete set


def test_gather_outside_ddp_is_identity():
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert torch.distributed.is_available()
