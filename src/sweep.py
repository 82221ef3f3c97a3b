"""Sweeps: many runs from one command (Hydra multirun), each into a folder named by its swept values.

    python src/train.py --config-name=unlearn.yaml experiment=unlearn/tofu/default trainer=NPO \
        -m trainer.args.learning_rate=1e-5,2e-5 trainer.method_args.alpha=0.5,1

- Each combination's result lands in ``saves/<mode>/<task_name>/<swept values>`` (``paths.output_dir``
  through the ``sweep_subdir`` resolver), e.g.
  ``.../trainer.args.learning_rate=1e-05,trainer.method_args.alpha=0.5``.
- A combination that fails is logged and recorded, and the sweep goes on; at the end ``SweepSummary``
  (a Hydra callback, configs/hydra/default.yaml) lists every combination with its folder or error,
  writes ``sweep_summary.json`` into the sweep's log folder (``sweep_summary``: every job's record with
  the cost its run recorded, and those costs summed), and exits with an error if any failed.
- ``objective`` (top-level config) is what a run returns to a sweeper that optimises (the Optuna
  sweeper): values of its final evaluation, optionally subject to a constraint (``sweep_objective``);
  a failed run, or one that misses the constraint, returns the worst value (-inf when maximising).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from checks import BadValueError
from core.compute import sum_totals
from run_folder import COMPLETION_MARKER, write_atomic

log = logging.getLogger(__name__)

#: Written by each job of a multirun into its Hydra log folder; read by ``SweepSummary``.
JOB_STATUS_FILE = "job_status.json"
SWEEP_SUMMARY_FILE = "sweep_summary.json"
#: Overrides that pick what a sweep is about rather than a value it varies (left out of folder names when
#: nothing says which keys were swept).
_NOT_SWEPT_KEYS = {"experiment", "model", "trainer", "eval", "collator", "peft", "sequence", "task_name", "seed"}
_NOT_SWEPT_PREFIXES = ("paths.", "hydra.", "data.", "model.", "eval.")


def _chooses_the_sweep(key: str) -> bool:
    key = key.lstrip("+~")
    return key in _NOT_SWEPT_KEYS or key.startswith(_NOT_SWEPT_PREFIXES)


def _swept_keys(hydra_cfg: Any) -> set[str] | None:
    """Keys the sweep varies: command-line overrides with several values (``a=1,2``, ``range(...)``, ...),
    and the Optuna sweeper's ``hydra.sweeper.params``; None when neither can be read."""
    keys: set[str] = set()
    try:
        for override in OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a
                                                                  and not a.startswith("-")]):
            if override.is_sweep_override():
                keys.add(override.get_key_element())
    except Exception:  # a command line that is not ours (a launcher's worker process)
        pass
    params = OmegaConf.select(hydra_cfg, "sweeper.params") if hydra_cfg is not None else None
    if params:
        keys |= set(params)
    return keys or None


def job_folder_name(task_overrides: Sequence[str], swept: set[str] | None) -> str:
    """``key=value`` of the swept overrides of one job, joined by commas (the folder of its result).

    ``swept`` None: every override but those that choose what the sweep is about (``_chooses_the_sweep``).
    Path separators in values become ``_``.
    """
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    parts = []
    for override, text in zip(parsed, task_overrides):
        key = override.get_key_element()
        chosen = key in swept if swept is not None else not _chooses_the_sweep(key)
        if chosen:
            parts.append(text.lstrip("+~").replace("/", "_"))
    return ",".join(sorted(parts))


def sweep_subdir() -> str:
    """``/<swept values>`` inside a multirun job, else ``""``: the last part of ``paths.output_dir``."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed without Hydra's app (tests, the compose API)
        return ""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    name = job_folder_name(list(hydra_cfg.overrides.task), _swept_keys(hydra_cfg))
    return "/" + (name or f"job{hydra_cfg.job.num}")


def own_folder(cfg: DictConfig) -> None:
    """In a multirun job, make ``paths.output_dir`` the job's own, so that no combination replaces another.

    A literal folder given on the command line (``paths.output_dir=saves/mine``, not itself swept) is the same
    for every combination: the job's swept values become its subfolder (``saves/mine/<swept values>``), as in
    the default folder. A folder that another job of this sweep already used (one built from settings the
    sweep does not vary, ``paths.output_dir=saves/${task_name}``) is refused, naming that job."""
    hydra_cfg = HydraConfig.get()
    sub = sweep_subdir()
    # as typed on the command line (Hydra's record of the overrides may hold them resolved), else that record
    typed = [a for a in sys.argv[1:] if a.lstrip("+").startswith("paths.output_dir=")]
    task = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    given = typed or [o for o in task if o.lstrip("+").startswith("paths.output_dir=")]
    swept = _swept_keys(hydra_cfg) or set()
    out = str(cfg.paths.output_dir).rstrip("/")
    if given and "${" not in given[-1] and "paths.output_dir" not in swept and sub and not out.endswith(sub):
        cfg.paths.output_dir = out + sub
        log.info("paths.output_dir is the same for every combination of the sweep: this one's is %s",
                 cfg.paths.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    for status in sorted(sweep_dir.glob(f"*/{JOB_STATUS_FILE}")):
        try:
            record = json.loads(status.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("job") != hydra_cfg.job.num and record.get("output_dir") == str(cfg.paths.output_dir):
            raise BadValueError(
                f"paths.output_dir={cfg.paths.output_dir} was already the folder of job {record['job']} of this "
                f"sweep ({record.get('swept') or ' '.join(record.get('overrides', []))}): every combination needs "
                "its own; put a swept key in paths.output_dir, or leave paths.output_dir at its default "
                "(saves/<mode>/<task_name>/<swept values>)")


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


# ----- what a run returns to an optimising sweeper -----------------------------------------------------
def _lookup(summaries: Mapping[str, Mapping[str, Any]], name: str) -> float | None:
    """``bench.metric`` or a bare ``metric`` (the one benchmark that has it) in ``{bench: summary}``."""
    if "." in name:
        bench, metric = name.split(".", 1)
        value = (summaries.get(bench) or {}).get(metric)
    else:
        found = [s[name] for s in summaries.values() if name in s]
        if len(found) > 1:
            raise BadValueError(f"objective metric {name!r} is in several benchmarks ({', '.join(summaries)}): "
                                "write <bench>.<metric>")
        value = found[0] if found else None
    if value is None and not any(name.split(".")[-1] in s for s in summaries.values()):
        valid = [f"{b}.{m}" for b, s in summaries.items() for m in s]
        raise BadValueError(f"objective metric {name!r} is not in the run's final evaluation; valid: "
                            f"{', '.join(valid) or 'none (the run needs eval=<bench> and trainer.args.do_eval=true)'}")
    return float(value) if isinstance(value, (int, float)) else None


def worst_values(directions: Sequence[str]) -> list[float]:
    """The value no trial can be worse than, per objective: -inf when maximising, +inf when minimising.

    What a run that failed, or missed the constraint, returns: never the optimum, and a value every
    sampler takes (Optuna refuses NaN, and the sweeper then stops)."""
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad:
        raise BadValueError(f"sweeper direction {bad[0]!r}; valid: maximize, minimize")
    return [-math.inf if d == "maximize" else math.inf for d in directions]


def sweeper_directions(n_metrics: int) -> list[str]:
    """``hydra.sweeper.direction`` of the running sweep (one per objective), else maximize for each."""
    direction = None
    try:
        direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction")
    except ValueError:
        pass
    if direction is None:
        return ["maximize"] * n_metrics
    directions = [str(direction)] * n_metrics if isinstance(direction, str) else [str(d) for d in direction]
    if len(directions) != n_metrics:
        raise BadValueError(f"hydra.sweeper.direction has {len(directions)} entries but objective.metrics names "
                            f"{n_metrics}: give one direction per metric")
    return directions


def sweep_objective(summaries: Mapping[str, Mapping[str, Any]], metrics: Sequence[str],
                    constraint: str | None = None, directions: Sequence[str] | None = None) -> float | list[float]:
    """The value(s) a run returns to an optimising sweeper (Optuna): each of ``metrics`` from the run's
    final evaluation ``{bench: summary}``; one metric gives a float, several a list (a Pareto front).

    A metric that could not be computed, or a run that fails ``constraint`` (``"forget_quality >= 0.05"``),
    gives the worst value of each objective (``worst_values`` for ``directions``, default maximize): such a
    run is never the optimum, however good its metric.
    """
    from trainer.selection import parse_constraint

    if not metrics:
        raise BadValueError("objective.metrics is empty: name the metric(s) to optimise, e.g. [tofu.model_utility]")
    worst = worst_values(list(directions) if directions is not None else ["maximize"] * len(metrics))
    if len(worst) != len(metrics):
        raise BadValueError(f"{len(worst)} direction(s) for {len(metrics)} objective metric(s)")
    values = [_lookup(summaries, m) for m in metrics]
    values = [w if v is None or not math.isfinite(v) else v for v, w in zip(values, worst)]
    if constraint:
        parsed = parse_constraint(constraint)
        value = _lookup(summaries, parsed.metric)
        if not parsed.holds({parsed.metric: value} if value is not None else {}):
            log.info("objective: %s=%s fails %s: the run is not a candidate", parsed.metric, value, parsed)
            values = worst
    return values[0] if len(values) == 1 else values


# ----- the record of each job and the summary at the end -----------------------------------------------
def write_job_status(status: str, output_dir: str | None, objective: Any = None, error: str | None = None) -> None:
    """Record one multirun job's outcome in its Hydra log folder (nothing outside a multirun; process 0 only)."""
    if not is_multirun() or int(os.environ.get("RANK", "0")) != 0:
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    overrides = list(hydra_cfg.overrides.task)
    record = {"job": hydra_cfg.job.num, "swept": job_folder_name(overrides, _swept_keys(hydra_cfg)),
              "overrides": overrides, "status": status,
              "output_dir": output_dir, "objective": objective, "error": error}
    write_atomic(folder / JOB_STATUS_FILE, json.dumps(record, indent=2, default=str))


def run_job(run: Any, cfg: DictConfig) -> Path | None:
    """``run(cfg)``; inside a multirun a failure is logged and recorded instead of ending the sweep
    (returns None), elsewhere it propagates."""
    if not is_multirun():
        return run(cfg)
    try:
        own_folder(cfg)
        out = run(cfg)
    except Exception as error:  # noqa: BLE001 - any failure of one combination
        log.error("this combination failed:\n%s", traceback.format_exc())
        write_job_status("failed", str(cfg.paths.output_dir), error=f"{type(error).__name__}: {error}")
        return None
    return out


def job_cost(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``compute.total`` record of a finished job's run (its ``run_complete.json``); None for a failed job
    or a run without one."""
    if record["status"] != "finished" or not record["output_dir"]:
        return None
    try:
        marker = json.loads((Path(record["output_dir"]) / COMPLETION_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    total = (marker.get("compute") or {}).get("total") if isinstance(marker, dict) else None
    return total if isinstance(total, dict) else None


def sweep_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``sweep_summary.json`` holds: ``jobs`` (each job's record, in job order, with ``compute``: the cost its
    run recorded, ``job_cost``) and ``compute``, those costs summed (``core.compute.sum_totals``: wall and process
    time, device-hours, tokens and FLOPs added up over the jobs, the largest peak memory)."""
    jobs = [{**r, "compute": job_cost(r)} for r in sorted(records, key=lambda r: r["job"])]
    return {"jobs": jobs, "compute": sum_totals([j["compute"] for j in jobs])}


class SweepSummary(Callback):
    """At the end of a multirun: every combination, its result folder or its error, in the log and in
    ``<sweep dir>/sweep_summary.json``; exit status 1 if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = []
        for path in sorted(sweep_dir.glob(f"*/{JOB_STATUS_FILE}")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        if not records:
            return
        summary = sweep_summary(records)
        records = summary["jobs"]
        write_atomic(sweep_dir / SWEEP_SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
        lines = [f"sweep of {len(records)} combination(s) ({sweep_dir / SWEEP_SUMMARY_FILE}):"]
        for r in records:
            what = r["output_dir"] if r["status"] == "finished" else r["error"]
            objective = f" objective={r['objective']}" if r.get("objective") is not None else ""
            lines.append(f"  [{r['status']}] job {r['job']} {r.get('swept') or ' '.join(r['overrides'])}: "
                         f"{what}{objective}")
        spent = summary["compute"]
        if spent["runs_counted"]:
            lines.append(f"  cost of the {spent['runs_counted']} run(s) recorded: {spent['wall_s'] / 3600:.3g} h of "
                         f"runs one after another, {spent['device_hours']:.3g} device-hours")
        failed = [r for r in records if r["status"] != "finished"]
        if failed:
            lines.append(f"{len(failed)} of {len(records)} combination(s) failed; their logs: {sweep_dir}/<job>/")
        log.info("\n".join(lines))
        if failed:
            raise SystemExit(1)  # a Hydra callback's exceptions only warn; the sweep's exit status tells scripts
