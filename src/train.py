"""Fine-tune or unlearn, top to bottom.

    python src/train.py --config-name=train.yaml model=SmolLM2-135M-Instruct data.train=TOFU_QA_FULL
    python src/train.py --config-name=unlearn.yaml model=SmolLM2-135M-Instruct trainer=GradDiff \
        data.forget=TOFU_QA_FORGET10 data.retain=TOFU_QA_RETAIN90

The run works in a staging folder of its own (``<paths.output_dir>.incomplete-<pid>-<time>``) under a
lock on the output path, and puts it in the output folder's place only when everything (model,
tokenizer, config, logs, then the completion marker) is written; an existing output folder is
replaced only if it is a finished run of ours (``run_folder``). ``trainer.args.resume_from_checkpoint=
true`` (or a checkpoint folder) continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from transformers import set_seed  # noqa: E402

from attacks import (  # noqa: E402
    attacked_result,
    check_attacks,
    format_robustness,
    get_attacks,
    run_attacks,
)
from checks import BadValueError  # noqa: E402
from core.compute import CostRecorder, Phase, flop_params  # noqa: E402
from core.distributed import check_process_count, on_main_process, unwrap_parallel  # noqa: E402
from data import check_eval_splits, data_input_paths, get_collator, get_data  # noqa: E402
from evals import Benchmark, EvalResult, get_evaluators  # noqa: E402
from model import get_model  # noqa: E402
from model.peft import is_peft_model, peft_settings, save_merged  # noqa: E402
from progress import quiet_library_bars  # noqa: E402
from resolvers import command_line_overrides, compose_names, register_resolvers  # noqa: E402
from run_folder import (  # noqa: E402
    BEST_CHECKPOINT_FILE,
    RESULT_EVALS_DIR,
    RUN_CONFIG,
    TRAIN_LOG_FILE,
    RunFolder,
    checkpoints,
    resumable_checkpoint,
    robustness_file,
    write_json_atomic,
)
from sweep import (  # noqa: E402
    run_job,
    sweep_objective,
    sweeper_directions,
    worst_values,
    write_job_status,
)
from trainer import (  # noqa: E402
    build_training_args,
    check_mode,
    check_moved_overrides,
    evaluates,
    load_trainer,
    trainer_class,
)

# the resolvers our configs use, before Hydra composes (also in a launcher's worker, which imports this module)
register_resolvers()

log = logging.getLogger("train")


def write_run_files(cfg: DictConfig, trainer, folder: Path) -> None:
    OmegaConf.save(cfg, folder / RUN_CONFIG, resolve=True)
    with open(folder / TRAIN_LOG_FILE, "w", encoding="utf-8") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")


def run_inputs(cfg: DictConfig, benchmarks: dict[str, Benchmark], attacks: list | None = None) -> list[str]:
    """Paths the run reads (model, tokenizer, the data folder of every dataset, EVAL files, each benchmark's
    ``input_paths``, the attacks' baseline models): the output folder must not hold them."""
    found = [cfg.model.model_args.get("pretrained_model_name_or_path"),
             cfg.model.get("tokenizer_args", {}).get("pretrained_model_name_or_path"),
             *data_input_paths(cfg.data), cfg.get("retain_logs_path"),
             *[attack_cfg.get("baseline_model_path") for _, attack_cfg in attacks or []]]
    for bench in benchmarks.values():
        found += bench.input_paths()
    return [str(p) for p in found if p and p != "auto"]


def final_attacks(cfg: DictConfig, benchmarks: dict[str, Benchmark]) -> list:
    """The attacks of ``cfg.attack`` the result's final evaluation runs (``attacks.get_attacks``), checked
    against the benchmarks before any work: they need an evaluation at the end (``eval=<bench>`` and
    ``trainer.args.do_eval``)."""
    attacks = get_attacks(OmegaConf.to_container(cfg.attack, resolve=True) if cfg.get("attack") else None)
    if not attacks:
        return []
    if not benchmarks or not cfg.trainer.args.do_eval:
        raise BadValueError(f"attack={[spec.name for spec, _ in attacks]} attacks the result's final evaluation, "
                            "but the run has none: add eval=<bench> (and keep trainer.args.do_eval=true)")
    check_attacks(attacks, benchmarks)
    return attacks


def attack_result(model: torch.nn.Module, tokenizer: Any, evaluators: dict[str, Benchmark], attacks: list,
                  final: dict[str, EvalResult], out_dir: Path, model_id: str, is_main: bool) -> dict[str, EvalResult]:
    """The final evaluation of every benchmark with its forget metrics under each attack added
    (``<metric>@<attack>``, ``attacks.run_attacks``; every process, as the evaluation), saved again into
    ``out_dir`` with ``<NAME>_ROBUSTNESS.json`` beside it; the model itself is not changed (attacks work on
    copies)."""
    was_training = model.training
    model.eval()
    attacked_results: dict[str, EvalResult] = {}
    try:
        for name, evaluator in evaluators.items():
            attacked, baselines = run_attacks(attacks, evaluator, model, model_id, tokenizer,
                                              evaluator.template_args, evaluator.cfg.get("retain_logs_path"))
            result, robustness = attacked_result(final[name], attacked, baselines, evaluator, attacks, model)
            if is_main:
                result.save(out_dir)
                write_json_atomic(robustness_file(out_dir, evaluator.name), robustness)
                log.info("%s under attack (clean, attacked, the retain model):\n%s", name, format_robustness(robustness))
            attacked_results[name] = result
    finally:
        model.train(was_training)
    return attacked_results


#: Settings a resumed run may change: where and how often it logs, saves and evaluates, and where its output
#: goes (a key, or a prefix ending with "."). Any other difference changes the trained model, so a resume
#: with it is refused (``resume_changes``).
RESUME_HARMLESS = (
    "paths.output_dir", "paths.model_cache_dir", "task_name", "hydra.", "eval.", "attack.", "data.eval", "objective.",
    "trainer.args.resume_from_checkpoint", "trainer.args.output_dir", "trainer.args.run_name",
    "trainer.args.logging_steps", "trainer.args.logging_strategy", "trainer.args.logging_first_step",
    "trainer.args.logging_dir", "trainer.args.report_to", "trainer.args.disable_tqdm",
    "trainer.args.save_steps", "trainer.args.save_strategy", "trainer.args.save_total_limit",
    "trainer.args.eval_steps", "trainer.args.eval_strategy", "trainer.args.eval_on_start", "trainer.args.do_eval",
    "trainer.args.per_device_eval_batch_size", "trainer.args.dataloader_num_workers",
)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def resume_changes(before: dict, now: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(changes that alter the result, harmless changes)`` between the resolved config of the run being
    resumed and this run's: ``{dotted key: (before, now)}`` (a key absent on one side reads ``<absent>``).
    Harmless are the settings of ``RESUME_HARMLESS``."""
    old, new = _flat(before), _flat(now)
    changed = {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
               if old.get(k, "<absent>") != new.get(k, "<absent>")}

    def harmless(key: str) -> bool:
        return any(key == h or (h.endswith(".") and key.startswith(h)) for h in RESUME_HARMLESS)

    return ({k: v for k, v in changed.items() if not harmless(k)}, {k: v for k, v in changed.items() if harmless(k)})


def check_resume(cfg: DictConfig, checkpoint: Path) -> dict[str, tuple]:
    """Refuse to resume ``checkpoint`` with a config that would give another result than the run that saved it
    (its ``config.yaml``, written when that run started), naming every differing setting; return the harmless
    differences (recorded in ``run_complete.json``). A checkpoint without its run's config cannot be checked:
    a WARNING says so."""
    saved = checkpoint.parent / RUN_CONFIG
    if not saved.is_file():
        log.warning("resuming %s: its run's %s is not next to it, so this run's settings cannot be compared with "
                    "the ones it was trained with", checkpoint, RUN_CONFIG)
        return {}
    before = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    blocking, harmless = resume_changes(before, OmegaConf.to_container(cfg, resolve=True))
    if blocking:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in blocking.items()))
        raise BadValueError(
            f"trainer.args.resume_from_checkpoint: {checkpoint} was trained with other settings that change the "
            f"result ({saved} records them): {listed}. Resume with that run's settings, or start a new run "
            "(without resume_from_checkpoint, or with another paths.output_dir)")
    if harmless:
        log.info("resuming %s with changed settings that do not alter the trained model: %s", checkpoint,
                 ", ".join(harmless))
    return harmless


@dataclass
class TrainRun:
    """A finished run: its output folder and the evaluation of its result (``trainer.args.do_eval``)."""

    output_dir: Path
    evaluations: dict[str, EvalResult] = field(default_factory=dict)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run cleans up as after any other failure."""


def _raise_terminated(signum, frame):
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def _start_folder(folder: RunFolder, resume) -> tuple[Path, Path | None]:
    """The main process takes the lock and makes the staging folder; every process gets its path."""
    return on_main_process(lambda: folder.start(resume))


def run(cfg: DictConfig) -> TrainRun:
    """Train as the config says; returns the output folder and the result's evaluations (see ``run_folder`` for
    the folder's safety rules). Dataset and PEFT configs given by name are composed first (``compose_names``):
    the saved config.yaml records what was used.

    ``run_complete.json`` records what the run cost (``core.compute``: setup, training, the evaluations during
    and after it); a resumed run's numbers cover the resumed part only (``compute.resumed_from``)."""
    with CostRecorder() as cost:
        return _run(cfg, cost)


def _run(cfg: DictConfig, cost: CostRecorder) -> TrainRun:
    setup = Phase("setup", "setup").start()  # config, model, data, trainer (ended on every process below)
    compose_names(cfg)
    check_mode(cfg)
    quiet_library_bars()
    if cfg.get("sequence"):
        raise ValueError("sequence=... unlearns folds one after another: run it with src/sequential.py "
                         "--config-name=unlearn.yaml (src/train.py runs one unlearning run)")
    # cpu=True without a GPU: otherwise the process group of a multi-process CPU run (torchrun) is not
    # set up until the Trainer's accelerator does it, and every process would take itself for the main one.
    check_process_count()  # a launcher that started fewer processes than asked for, before any work
    state = PartialState(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    check_eval_splits(cfg)
    # the benchmarks' configs checked, and their inputs known, before the output folder is taken
    benchmarks = get_evaluators(cfg.get("eval"), template_args=cfg.model.get("template_args"), paths=cfg.get("paths"))
    attacks = final_attacks(cfg, benchmarks)
    folder = RunFolder(cfg.paths.output_dir, inputs=run_inputs(cfg, benchmarks, attacks), mode=cfg.mode)
    resume = cfg.trainer.get("args", {}).get("resume_from_checkpoint")
    staging, checkpoint = _start_folder(folder, resume)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if state.is_main_process else None
    try:
        resumed_with = check_resume(cfg, checkpoint) if checkpoint is not None else {}
        if state.is_main_process:  # what this run trains with, for a later resume of its checkpoints to compare
            OmegaConf.save(cfg, staging / RUN_CONFIG, resolve=True)
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer_cfg["args"].pop("resume_from_checkpoint", None)  # the checkpoint goes to train() below
        # Before the model: launched with a DeepSpeed ZeRO-3 config, the arguments register DeepSpeed's config,
        # and from_pretrained then creates the model already partitioned over the processes (zero.Init).
        training_args = build_training_args(trainer_cfg["args"], str(staging),
                                            trainer_class(trainer_cfg["handler"]).arguments_class)
        model, tokenizer = get_model(cfg.model)
        data = get_data(cfg.data, cfg.mode, tokenizer, cfg.model.get("template_args"), seed=cfg.seed,
                        need_eval=evaluates(cfg.trainer.get("args")))
        collator = get_collator(cfg.collator, tokenizer)
        evaluators = get_evaluators(cfg.get("eval"), tokenizer=tokenizer, template_args=cfg.model.get("template_args"),
                                    paths=cfg.get("paths"))
        for evaluator in evaluators.values():
            evaluator.check_inputs()  # before training, not at its first evaluation
        trainer = load_trainer(trainer_cfg, model, data["train"], data["eval"], tokenizer, collator,
                               output_dir=str(staging), evaluators=evaluators, training_args=training_args)
        setup.stop()
        with Phase("training", "training"):  # the evaluations during training are phases inside it
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        trainer.save_model(str(staging))
        final: dict[str, EvalResult] = {}
        if evaluators and training_args.do_eval:  # every process: the evaluation runs in lockstep
            final = trainer.evaluate_result(str(staging / RESULT_EVALS_DIR))
            if attacks:  # the result under attack (robustness-aware selection: objective <metric>@<attack>)
                final = attack_result(trainer.accelerator.unwrap_model(trainer.model), tokenizer, evaluators, attacks,
                                      final, staging / RESULT_EVALS_DIR, f"{cfg.paths.output_dir}@final",
                                      state.is_main_process)
        # every process: the measures are combined
        spent = cost.finish(flop_params(model), resumed_from=str(checkpoint) if checkpoint is not None else None)
        if state.is_main_process:
            policy = unwrap_parallel(trainer.model)
            if is_peft_model(policy) and (peft_settings(cfg.model.get("peft")) or {}).get("merge"):
                log.info("merged model (base + adapters) saved to %s", save_merged(policy, tokenizer, staging))
            best = trainer.best_checkpoint_record()
            if best is not None:
                write_json_atomic(staging / BEST_CHECKPOINT_FILE, best)
                if best["step"] is None:
                    log.warning("no evaluation passed %s: the result is the last model",
                                best["constraint"] or f"a finite {best['metric']}")
            write_run_files(cfg, trainer, staging)
            resumed = {"resumed_from": str(checkpoint), "resume_changes": {k: list(v) for k, v in resumed_with.items()}} \
                if checkpoint is not None else {}
            folder.finish({"mode": cfg.mode, "task_name": cfg.task_name, "steps": trainer.state.global_step, **resumed,
                           "compute": spent.as_json()})
            log.info("saved to %s", folder.output_dir)
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            kept = folder.abandon()
            if kept is not None and any(resumable_checkpoint(c) for c in checkpoints(kept)):
                log.error("run failed; its checkpoints are kept in %s (not a result): continue it with "
                          "trainer.args.resume_from_checkpoint=true", kept)
            elif kept is not None:
                log.error("run failed; its weights-only checkpoints (trainer.args.save_only_model=true) are kept in "
                          "%s (not a result, and not resumable); python src/clean.py %s removes them", kept,
                          kept.parent)
            else:
                log.error("run failed; removed the partial output %s", staging)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return TrainRun(Path(cfg.paths.output_dir), final)


def objective_of(cfg: DictConfig, finished: TrainRun) -> float | list[float] | None:
    """``cfg.objective`` of the finished run (``sweep.sweep_objective``), None when no metric is named."""
    objective = cfg.get("objective") or {}
    if not objective.get("metrics"):
        return None
    metrics = list(objective.metrics)
    summaries = {bench: result.summary for bench, result in finished.evaluations.items()}
    return sweep_objective(summaries, metrics, objective.get("constraint"), sweeper_directions(len(metrics)))


@hydra.main(version_base=None, config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | list[float] | None:
    """One run; inside a sweep (-m) a failed combination is recorded and the sweep goes on (``sweep.run_job``).
    Returns the run's ``objective`` to an optimising sweeper."""
    torch.set_float32_matmul_precision("high")
    finished = run_job(run, cfg)
    if finished is None:  # failed inside a sweep: the worst value, so that an optimising sweeper goes on
        metrics = (cfg.get("objective") or {}).get("metrics")
        if not metrics:
            return None
        worst = worst_values(sweeper_directions(len(metrics)))
        return worst[0] if len(worst) == 1 else worst
    objective = objective_of(cfg, finished) if PartialState().is_main_process else None
    write_job_status("finished", str(finished.output_dir), objective=objective)
    return objective


if __name__ == "__main__":
    try:
        check_moved_overrides(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"Error: {error}")
    sys.argv[1:] = command_line_overrides(sys.argv[1:])  # data.train=[A,B] in place of a composed default
    main()
