"""What a run costs, per phase: wall time, process time, device-hours, peak memory, tokens and estimated FLOPs.

A phase is a stretch of a run measured as one: ``setup`` (config, model, data, trainer), ``training``, each
``evaluation`` (per benchmark; those during training carry ``@step<N>``) and each ``attack``. ``Phase`` is a
context manager::

    with Phase("evaluation:TOFU", "evaluation") as measured:
        result = evaluator.evaluate(model, save=False)
    measured.record  # a PhaseCost, the same on every process

Phases nest, and a phase's numbers include those of the phases inside it (``parent`` names the enclosing
one): the evaluations during training are inside ``training``, an attack's evaluations inside the attack.
``CostRecorder`` measures a whole run (its ``total``) and keeps every phase closed while it is active, in
start order; ``finish`` returns the ``RunCost`` that ``run_complete.json`` records.

What is measured, per process, and how several processes (torchrun, accelerate, DeepSpeed) are combined at
the end of each phase (one ``all_gather_object``, so a phase must end on every process, as every phase of
our runs does; a phase that ends in an exception records nothing):

- ``wall_s``: elapsed time (``time.perf_counter``); the longest of the processes;
- ``process_s``: CPU time of the process (``time.process_time``: user + system, every thread, not child
  processes such as data-loader workers); summed over the processes;
- ``devices`` and ``device_hours``: the CUDA devices the processes allocated memory on (one per process on a
  CPU), and ``devices * wall_s / 3600``;
- ``peak_memory_bytes`` per device, ``memory_kind`` saying which measure: ``cuda_max_allocated``
  (``torch.cuda.max_memory_allocated`` of each device, the peak statistics reset when a phase starts), or
  ``host_max_rss`` on a CPU: the peak resident memory of the process since it started (``getrusage``
  ``ru_maxrss``; it cannot be reset, so a phase's value is the high-water mark up to its end);
- ``tokens``: tokens fed to a model, counted where the batches are made (``add_tokens``): the
  attention-mask sum of every training batch, the prompt and answer tokens of the evaluation passes and the
  generated tokens; summed over the processes. None, with ``tokens_note`` saying why, where an exact count
  is out of reach (``tokens_unknown``);
- ``flops``: the estimate of ``training_flops`` / ``forward_flops`` for the tokens of each pass and the
  model it ran through (``flop_params``).

The numbers describe the work, not the results: nothing here changes what a run computes, and the token
counts stay on the device until a phase ends (no host synchronisation inside a training step).
"""

from __future__ import annotations

import itertools
import math
import resource
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

#: ``memory_kind`` of a phase: the peak CUDA memory allocated per device, or the process's peak resident memory.
MEMORY_CUDA = "cuda_max_allocated"
MEMORY_HOST = "host_max_rss"
#: FLOPs per parameter per token: forward + backward (training), forward only (evaluation, generation).
TRAINING_FLOPS_PER_PARAM = 6
FORWARD_FLOPS_PER_PARAM = 2


# ----- the estimate ------------------------------------------------------------------------------------
def training_flops(params: int, tokens: int) -> float:
    """FLOPs of training ``params`` parameters on ``tokens`` tokens: ``6 * N * T``.

    The standard estimate of Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361,
    section 2.1): a forward pass costs about ``2 N`` FLOPs per token (a multiply and an add per weight), the
    backward pass twice that. Attention's term that grows with the context (``2 * n_layer * n_ctx * d``
    per token) is left out, as is the recomputation of gradient checkpointing; with frozen weights (LoRA)
    the backward pass costs less than ``4 N`` (no weight gradients for them), so ``6 N`` is then an upper
    bound. ``N`` is ``flop_params`` of the model."""
    return float(TRAINING_FLOPS_PER_PARAM * params * tokens)


def forward_flops(params: int, tokens: int) -> float:
    """FLOPs of forward passes (evaluation, generation) of ``params`` parameters over ``tokens`` tokens:
    ``2 * N * T`` (Kaplan et al. 2020, section 2.1; the same omissions as ``training_flops``)."""
    return float(FORWARD_FLOPS_PER_PARAM * params * tokens)


_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _numel(param: Any) -> int:
    # a DeepSpeed ZeRO-3 parameter holds a shard (numel 0 outside a gather); ds_numel is its full size
    full = getattr(param, "ds_numel", None)
    return int(full) if isinstance(full, int) else int(param.numel())


def flop_params(model: Any) -> int:
    """``N`` of the FLOPs estimate: the parameters of ``model``, each counted once, without those only an
    embedding table uses (``torch.nn.Embedding``: a lookup, no multiplication).

    Kaplan et al. leave out the input embedding and the output projection alike; here the output projection
    counts, tied to the input embedding or not, because it is a matrix product over the whole vocabulary per
    token (a large share of a small model's compute). Sharded parameters count whole (FSDP2's DTensors give
    their global size, ZeRO-3's their ``ds_numel``); a bitsandbytes 4-/8-bit copy counts its packed storage.
    Computed once per model object."""
    try:
        return _PARAMS[model]
    except (KeyError, TypeError):
        pass
    import torch

    used: dict[int, tuple[Any, bool]] = {}
    for module in model.modules():
        lookup = isinstance(module, torch.nn.Embedding)
        for param in module.parameters(recurse=False):
            _, before = used.get(id(param), (param, False))
            used[id(param)] = (param, before or not lookup)
    count = sum(_numel(p) for p, by_matmul in used.values() if by_matmul)
    try:
        _PARAMS[model] = count
    except TypeError:
        pass
    return count


# ----- records ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseCost:
    """What one phase cost (see the module docstring for each field; times in seconds, memory in bytes).

    ``peak_memory_bytes`` is keyed ``rank<r>:<device>`` (``rank0:cuda:0``, or ``rank0:cpu`` for a process's
    resident memory); ``processes``: how many processes' measures are combined (1 where only the main
    process could measure, e.g. after an attack failed)."""

    name: str
    kind: str
    parent: str | None
    wall_s: float
    process_s: float
    processes: int
    devices: int
    device_hours: float
    memory_kind: str
    peak_memory_bytes: dict[str, int]
    tokens: int | None
    flops: float | None
    tokens_note: str | None

    @property
    def peak_bytes(self) -> int | None:
        """The largest per-device peak (None where nothing was measured)."""
        return max(self.peak_memory_bytes.values()) if self.peak_memory_bytes else None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PhaseCost:
        """A record as ``as_json`` wrote it (every field present)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class RunCost:
    """A run's cost: ``total`` (the whole run, named ``run``), its ``phases`` in start order, ``params`` (``N``
    of the run's model, ``flop_params``), ``resumed_from`` (the checkpoint a resumed training run continued:
    the numbers then cover only the part after it) and ``note`` (what the numbers leave out)."""

    total: PhaseCost
    phases: tuple[PhaseCost, ...]
    params: int | None
    resumed_from: str | None
    note: str | None

    def as_json(self) -> dict[str, Any]:
        return {"total": self.total.as_json(), "phases": [p.as_json() for p in self.phases],
                "params": self.params, "resumed_from": self.resumed_from, "note": self.note}


@dataclass(frozen=True)
class _Local:
    """One process's measure of a phase (what the processes exchange at its end)."""

    rank: int
    wall_s: float
    process_s: float
    memory_kind: str
    peaks: dict[str, int]
    tokens: int | None
    flops: float | None
    tokens_note: str | None


def combine(name: str, kind: str, parent: str | None, parts: Sequence[_Local]) -> PhaseCost:
    """The processes' measures of one phase as one record: the longest wall time; process time, tokens and
    FLOPs summed (tokens None when any process could not count them); every process's devices."""
    wall = max(p.wall_s for p in parts)
    kinds = {p.memory_kind for p in parts}
    memory_kind = MEMORY_CUDA if kinds == {MEMORY_CUDA} else MEMORY_HOST
    peaks = {f"rank{p.rank}:{device}": value for p in parts for device, value in p.peaks.items()
             if p.memory_kind == memory_kind}
    devices = len(peaks) if memory_kind == MEMORY_CUDA else len(parts)
    notes = [p.tokens_note for p in parts if p.tokens_note]
    counted = not notes and all(p.tokens is not None for p in parts)
    return PhaseCost(
        name=name, kind=kind, parent=parent, wall_s=wall, process_s=sum(p.process_s for p in parts),
        processes=len(parts), devices=devices, device_hours=devices * wall / 3600.0, memory_kind=memory_kind,
        peak_memory_bytes=peaks, tokens=sum(p.tokens for p in parts) if counted else None,
        flops=sum(p.flops for p in parts) if counted else None, tokens_note=notes[0] if notes else None)


# ----- measuring ----------------------------------------------------------------------------------------
#: The phases open in this process, outermost first; every token counted goes to each of them.
_OPEN: list[Phase] = []
#: The recorders active in this process (one per run); every phase closed goes to each of them.
_RECORDERS: list[CostRecorder] = []
_ORDER = itertools.count()


def _cuda() -> Any:
    """``torch.cuda`` once CUDA is in use in this process, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _host_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def _fold_cuda_peaks() -> None:
    """Every open phase takes the CUDA peaks since the last reset (called when a phase starts or ends)."""
    cuda = _cuda()
    if cuda is None:
        return
    peaks = {f"cuda:{i}": int(cuda.max_memory_allocated(i)) for i in range(cuda.device_count())}
    for phase in _OPEN:
        for device, value in peaks.items():
            phase._peaks[device] = max(phase._peaks.get(device, 0), value)


def _reset_cuda_peaks() -> None:
    cuda = _cuda()
    if cuda is not None:
        for i in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(i)


def _rank() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _gather(local: _Local) -> list[_Local]:
    from core.distributed import gather_objects

    return gather_objects(local)


class Phase:
    """A measured stretch of a run (see the module docstring). ``with Phase(name, kind) as measured:``, or
    ``start()`` / ``stop()``; after ``stop`` (or a ``with`` block that ended without an exception) ``record``
    holds the ``PhaseCost``. Phases must end in the reverse order of their start."""

    def __init__(self, name: str, kind: str, *, root: bool = False) -> None:
        self.name, self.kind, self.root = name, kind, root
        self.parent: str | None = None
        self.record: PhaseCost | None = None
        self._order = next(_ORDER)
        self._started: tuple[float, float] | None = None
        self._counts: dict[int, int] = {}  # FLOPs per token -> tokens counted on the host
        self._pending: dict[tuple[int, str], Any] = {}  # (FLOPs per token, device) -> token count on that device
        self._note: str | None = None
        self._peaks: dict[str, int] = {}

    def __enter__(self) -> Phase:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.stop()
        else:
            self.abandon()
        return False

    def start(self) -> Phase:
        if self._started is not None:
            raise RuntimeError(f"phase {self.name} started twice")
        _fold_cuda_peaks()
        _reset_cuda_peaks()
        self.parent = next((p.name for p in reversed(_OPEN) if not p.root), None)
        _OPEN.append(self)
        self._started = (time.perf_counter(), time.process_time())
        return self

    def add(self, per_token: int, tokens: Any) -> None:
        """``tokens`` (an int, or a tensor whose value stays on its device until the phase ends) at
        ``per_token`` FLOPs each."""
        if isinstance(tokens, int):
            self._counts[per_token] = self._counts.get(per_token, 0) + tokens
            return
        key = (per_token, str(tokens.device))
        before = self._pending.get(key)
        self._pending[key] = tokens.detach() if before is None else before + tokens.detach()

    def _local(self, wall: float, cpu: float) -> _Local:
        counts = dict(self._counts)
        for (per_token, _), value in self._pending.items():
            counts[per_token] = counts.get(per_token, 0) + int(value)
        if _cuda() is not None:
            cuda = _cuda()
            peaks = {d: v for d, v in self._peaks.items() if v > 0} or {f"cuda:{cuda.current_device()}": 0}
            kind = MEMORY_CUDA
        else:
            peaks, kind = {"cpu": _host_peak_bytes()}, MEMORY_HOST
        tokens = None if self._note else sum(counts.values())
        flops = None if self._note else float(sum(per_token * n for per_token, n in counts.items()))
        return _Local(_rank(), wall, cpu, kind, peaks, tokens, flops, self._note)

    def stop(self, gather: bool = True) -> PhaseCost:
        """End the phase and return its record: the processes' measures combined (``gather``; every process
        must then end it), or this process's alone."""
        if self._started is None or self not in _OPEN:
            raise RuntimeError(f"phase {self.name} is not running")
        if _OPEN[-1] is not self:
            raise RuntimeError(f"phase {self.name} ended before the phase {_OPEN[-1].name} inside it")
        wall, cpu = time.perf_counter() - self._started[0], time.process_time() - self._started[1]
        _fold_cuda_peaks()
        _OPEN.pop()
        local = self._local(wall, cpu)
        self.record = combine(self.name, self.kind, self.parent, _gather(local) if gather else [local])
        for recorder in _RECORDERS:
            if not self.root:
                recorder._closed.append(self)
        return self.record

    def abandon(self) -> None:
        """Leave the phase without a record (after a failure), with any phase still open inside it."""
        if self in _OPEN:
            del _OPEN[_OPEN.index(self):]


def add_tokens(model: Any, tokens: Any, *, backward: bool = False) -> None:
    """Count ``tokens`` fed to ``model`` in every open phase, at ``training_flops`` (``backward``: a training
    pass) or ``forward_flops`` per token for its ``flop_params``. ``tokens``: an int, or a tensor (an
    attention-mask sum) that stays on its device until the phase ends; None (a batch without an attention
    mask, ``mask_tokens``) makes the count unknown. Nothing happens outside a phase."""
    if not _OPEN:
        return
    if tokens is None:
        tokens_unknown("a batch without an attention mask: its padding cannot be told from its tokens")
        return
    per_token = (TRAINING_FLOPS_PER_PARAM if backward else FORWARD_FLOPS_PER_PARAM) * flop_params(model)
    for phase in _OPEN:
        phase.add(per_token, tokens)


def tokens_unknown(reason: str) -> None:
    """The open phases cannot count their tokens exactly: their ``tokens`` and ``flops`` are recorded as None
    with ``reason`` as ``tokens_note``."""
    for phase in _OPEN:
        phase._note = phase._note or reason


def mask_tokens(batch: Any) -> Any:
    """The non-padding tokens of a collated batch: the sum of every ``attention_mask`` tensor in it (nested
    batches such as ``{"forget": ..., "retain": ...}`` included), as a tensor on the masks' device; None when
    the batch carries no attention mask."""
    masks: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "attention_mask" and value is not None and not isinstance(value, Mapping):
                    masks.append(value)
                else:
                    visit(value)

    visit(batch)
    if not masks:
        return None
    total = masks[0].sum()
    for mask in masks[1:]:
        total = total + mask.sum().to(total.device)
    return total


class CostRecorder:
    """The cost of one run: ``with CostRecorder() as cost:`` around all of it; the phases that close inside
    (anywhere: the trainer, the evaluations, the attacks) are kept, and ``finish`` ends the run's ``total``."""

    def __init__(self) -> None:
        self._root = Phase("run", "run", root=True)
        self._closed: list[Phase] = []

    def __enter__(self) -> CostRecorder:
        _RECORDERS.append(self)
        self._root.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._root.abandon()
        if self in _RECORDERS:
            _RECORDERS.remove(self)
        return False

    def records(self) -> list[PhaseCost]:
        """The phases closed so far, in start order."""
        return [p.record for p in sorted(self._closed, key=lambda p: p._order) if p.record is not None]

    def finish(self, params: int | None, resumed_from: str | None = None, gather: bool = True) -> RunCost:
        """End the run's total (every process, when ``gather``) and return the whole record."""
        total = self._root.stop(gather)
        note = None if resumed_from is None else (
            f"resumed from {resumed_from}: the numbers cover this run only, not the work before that checkpoint")
        return RunCost(total, tuple(self.records()), params, resumed_from, note)


# ----- sums (a sweep) -----------------------------------------------------------------------------------
def sum_totals(totals: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Several runs' ``total`` records (``PhaseCost.as_json``; None for a run without one) added up: wall
    time, process time, device-hours, tokens and FLOPs summed (tokens and FLOPs None when any counted run
    lacks them), the largest peak memory of each kind, and how many runs were counted and left out. The
    wall times add up to the time the runs took one after another, not to a parallel sweep's elapsed time."""
    counted = [PhaseCost.from_json(t) for t in totals if t is not None]
    known = all(c.tokens is not None for c in counted)
    peaks: dict[str, int | None] = {MEMORY_CUDA: None, MEMORY_HOST: None}
    for cost in counted:
        value = cost.peak_bytes
        if value is not None:
            before = peaks[cost.memory_kind]
            peaks[cost.memory_kind] = value if before is None else max(before, value)
    return {
        "runs_counted": len(counted), "runs_without_record": len(totals) - len(counted),
        "wall_s": math.fsum(c.wall_s for c in counted), "process_s": math.fsum(c.process_s for c in counted),
        "device_hours": math.fsum(c.device_hours for c in counted),
        "tokens": sum(c.tokens for c in counted) if known else None,
        "flops": math.fsum(c.flops for c in counted) if known else None,
        "peak_memory_bytes": peaks,
    }


__all__ = ["MEMORY_CUDA", "MEMORY_HOST", "CostRecorder", "Phase", "PhaseCost", "RunCost", "add_tokens", "combine",
           "flop_params", "forward_flops", "mask_tokens", "sum_totals", "tokens_unknown", "training_flops"]
