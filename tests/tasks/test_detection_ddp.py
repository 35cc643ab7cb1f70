"""Evaluation under DDP: every rank's predictions are gathered, duplicates dropped, empty ranks fine."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("effdet")
pytest.importorskip("pycocotools")

from tasks.detection import all_gather_objects, merge_rank_results  # noqa: E402


def _result(image_id: int, score: float) -> dict:
    return {"image_id": image_id, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": score}


def test_merge_drops_sampler_repeats_and_accepts_empty_ranks():
    rank0 = ([_result(1, 0.9), _result(3, 0.8)], [1, 3])
    rank1 = ([_result(2, 0.7), _result(1, 0.1)], [2, 1])  # image 1 repeated by the sampler's padding
    rank2: tuple[list, list] = ([], [])  # a rank that had no images
    results, ids = merge_rank_results([rank0, rank1, rank2])
    assert ids == [1, 2, 3]
    assert sorted((r["image_id"], r["score"]) for r in results) == [(1, 0.9), (2, 0.7), (3, 0.8)]
    # An image with no detections still counts as evaluated (its boxes are misses).
    results, ids = merge_rank_results([([], [4]), ([_result(5, 0.5)], [5])])
    assert ids == [4, 5] and len(results) == 1


def _worker(rank: int, world: int, port: int, queue: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = ([_result(rank + 1, 0.5)], [rank + 1]) if rank == 0 else ([], [])  # rank 1 has nothing
        queue.put((rank, merge_rank_results(all_gather_objects(mine))))
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
    assert got[0] == got[1] == ([_result(1, 0.5)], [1])  # both ranks evaluate the same, complete set


def test_gather_outside_ddp_is_identity():
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert torch.distributed.is_available()
