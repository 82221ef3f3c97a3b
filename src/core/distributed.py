"""Helpers for a model spread over processes (``torch.distributed``): which process decides, which rows each
takes, how results are gathered, and whether a model's weights are sharded. Torch only; every layer uses them.

Without a process group every helper is the one-process identity (all rows, process 0, nothing to gather).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside distributed / compiled wrappers (``.module``, ``._orig_mod``) only."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_fsdp2_module(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``fully_shard`` changes the module's class in place, no wrapper)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return isinstance(unwrap_parallel(model), FSDPModule) or isinstance(model, FSDPModule)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are split over the processes (FSDP2, or DeepSpeed ZeRO-3 partitioned
    parameters), so that every forward pass is a collective call that all processes must make together."""
    if not isinstance(model, torch.nn.Module):
        return False
    if is_fsdp2_module(model):
        return True
    return any(hasattr(p, "ds_id") for p in unwrap_parallel(model).parameters())


def lockstep_total(count: int) -> int:
    """The largest ``count`` over the processes (``count`` itself without a process group): how many
    collective steps every process runs so that none waits for a call the others never make."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    total = torch.tensor(count, dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total)


def rank_shard(indices: Sequence[int]) -> list[int]:
    """This process's strided share of ``indices`` (all of them without ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return list(indices[rank::world])
    return list(indices)


def is_main_process() -> bool:
    """Whether this is process 0 (or the only process)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def on_main_process(compute: Callable[[], Any]) -> Any:
    """``compute()`` run by process 0 only, its result (or its exception, re-raised) on every process.

    For decisions that read the file system and steer collective calls (reuse an EVAL file, start the
    output folder): each process deciding for itself can see a file another process is writing, and
    the processes would then run different numbers of collectives and wait for each other forever.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute()
    shared: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            shared[0] = (True, compute())
        except Exception as e:  # handed to every process, so that all fail together
            shared[0] = (False, e)
    torch.distributed.broadcast_object_list(shared, src=0)
    ok, value = shared[0]
    if not ok:
        raise value
    return value


def gather_dicts(part: dict) -> dict:
    """The union of every process's ``part`` (``all_gather_object``), on every process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, part)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged
    return part


def gather_objects(part: Any) -> list:
    """Every process's ``part`` in rank order (``all_gather_object``), on every process; ``[part]`` alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, part)
        return parts
    return [part]


__all__ = ["unwrap_parallel", "is_fsdp2_module", "is_sharded", "lockstep_total", "rank_shard", "is_main_process",
           "on_main_process", "gather_dicts", "gather_objects"]


def _launcher_command() -> list[str]:
    """The command line of the process that started this one (its parent), or ``[]`` where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def requested_processes(command: Sequence[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asks for (``--num_processes N``, or
    ``num_processes`` of its ``--config_file``); None when it names none or is not accelerate's."""
    if not any(Path(part).name == "accelerate" for part in command[:2]) or "launch" not in command:
        return None
    args = list(command)
    for i, part in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if part == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if part.startswith(flag + "=") and part.split("=", 1)[1].isdigit():
                return int(part.split("=", 1)[1])
    for i, part in enumerate(args):
        if part in ("--config_file", "--config-file") and i + 1 < len(args):
            try:
                import yaml

                value = (yaml.safe_load(Path(args[i + 1]).read_text(encoding="utf-8")) or {}).get("num_processes")
            except (OSError, ValueError, AttributeError):
                return None
            return int(value) if isinstance(value, int) else None
    return None


def check_process_count() -> None:
    """Refuse to start a run that got fewer processes than its launcher asked for.

    ``accelerate launch --cpu --num_processes 2`` runs accelerate's simple launcher, which starts ONE process
    on a CPU: the run would silently train alone, with another effective batch. Detected here from the
    launcher's command line (accelerate sets ``ACCELERATE_USE_CPU`` for the process it starts); torchrun
    starts the processes it is asked for."""
    if "ACCELERATE_USE_CPU" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    command = _launcher_command()
    wanted = requested_processes(command)
    if wanted is not None and wanted > 1:
        raise RuntimeError(f"the launcher asked for {wanted} processes ({shlex.join(command[:6])} ...) but this run is "
                           "the only one: accelerate's launcher starts a single process on a CPU. Start several with "
                           f"torchrun --nproc_per_node {wanted} src/<script>.py ... (docs/distributed.md)")
