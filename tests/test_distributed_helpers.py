"""The helpers that keep several processes in lockstep (core.distributed), on a real 2-process gloo group."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_file(rank: int) -> None:
    raise FileNotFoundError(f"missing on rank {rank}")


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from core.distributed import gather_dicts, on_main_process, rank_shard

        # Each process would see something else (a file being written, say): all take process 0's view.
        seen = on_main_process(lambda: {"seen_by": rank})
        try:
            on_main_process(lambda: _missing_file(rank))
            failure = None
        except FileNotFoundError as e:
            failure = str(e)
        shard = rank_shard(range(5))
        merged = gather_dicts({i: rank for i in shard})
        results[rank] = {"seen": seen, "failure": failure, "shard": shard, "merged": merged}
    finally:
        torch.distributed.destroy_process_group()


def test_main_process_decides_for_all_and_shards_are_gathered():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["seen"] == {"seen_by": 0}
        assert r["failure"] == "missing on rank 0"  # process 0's exception, raised on every process
        assert r["merged"] == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}
    assert results[0]["shard"] == [0, 2, 4] and results[1]["shard"] == [1, 3]
