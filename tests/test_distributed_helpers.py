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


def _cost_worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from core.compute import CostRecorder, Phase, add_tokens

        model = torch.nn.Linear(4, 3)  # N = 15
        with CostRecorder() as cost:
            with Phase("training", "training"):
                add_tokens(model, torch.tensor(10 * (rank + 1)), backward=True)  # 10 on rank 0, 20 on rank 1
            run = cost.finish(params=15)
        results[rank] = run.as_json()
    finally:
        torch.distributed.destroy_process_group()


def test_the_cost_of_each_phase_is_combined_over_the_processes():
    """Tokens and FLOPs summed over the processes, one device per process (CPU), the same record on each."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_cost_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1]
    (training,) = results[0]["phases"]
    assert (training["tokens"], training["flops"]) == (30, 6 * 15 * 30)
    assert training["processes"] == training["devices"] == 2
    assert set(training["peak_memory_bytes"]) == {"rank0:cpu", "rank1:cpu"}
    assert results[0]["total"]["tokens"] == 30
