"""Evaluate a model on a benchmark, top to bottom.

    python src/eval.py --config-name=eval.yaml model=SmolLM2-135M-Instruct \
        model.model_args.pretrained_model_name_or_path=<model folder> eval=tofu forget_split=forget10 \
        retain_logs_path=<retain model's TOFU_EVAL.json or null> paths.tofu=<folder>

Writes ``<paths.output_dir>/TOFU_EVAL.json`` (every metric, per-sample values), ``TOFU_SUMMARY.json``
(headline numbers), the resolved ``config.yaml`` and the completion marker ``run_complete.json`` (the folder
follows training's rules: built aside, put in place when complete; see ``run``), and prints the summary as
a table. With
``attack=quantize`` (or ``attack=[quantize,relearn,rephrase]``) the forget metrics are evaluated again under
each attack and added as ``<metric>@<attack>``, with ``TOFU_ROBUSTNESS.json`` (src/attacks/).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
from checks import check_number  # noqa: E402
from core.compute import CostRecorder, Phase, flop_params  # noqa: E402
from core.distributed import check_process_count, on_main_process  # noqa: E402
from evals import EvalResult, format_summary, get_evaluators  # noqa: E402
from model import get_model  # noqa: E402
from progress import quiet_library_bars  # noqa: E402
from resolvers import compose_names, register_resolvers  # noqa: E402
from run_folder import EVAL_SUFFIX, RUN_CONFIG, RunFolder, robustness_file, write_atomic, write_json_atomic  # noqa: E402
from sweep import run_job, write_job_status  # noqa: E402

# the resolvers our configs use, before Hydra composes (also in a launcher's worker, which imports this module)
register_resolvers()


def model_identity(model_cfg: DictConfig) -> str:
    """What the EVAL file records as the model: its path, or its random-init recipe."""
    path = model_cfg.model_args.get("pretrained_model_name_or_path")
    if path:
        return str(path)
    recipe = OmegaConf.to_container(model_cfg.get("random_init"), resolve=True)
    return "random_init:" + json.dumps(recipe, sort_keys=True)


def eval_inputs(cfg: DictConfig, benchmarks: dict, attacks: list) -> list[str]:
    """Paths the evaluation reads (the model, its tokenizer, each benchmark's ``input_paths``, the attacks'
    baseline models): the output folder may neither be nor contain them."""
    found = [cfg.model.model_args.get("pretrained_model_name_or_path"),
             cfg.model.get("tokenizer_args", {}).get("pretrained_model_name_or_path")]
    found += [attack_cfg.get("baseline_model_path") for _, attack_cfg in attacks]
    for bench in benchmarks.values():
        found += bench.input_paths()
    out = Path(cfg.paths.output_dir).absolute()
    # The output's own EVAL file as a reference (a retain model evaluated again against its own results, to fill
    # in its forget quality): read before anything is written, and superseded by the new evaluation it carries over.
    own = {str(p) for p in found if p and Path(str(p)).absolute().parent == out and str(p).endswith(EVAL_SUFFIX)}
    return [str(p) for p in found if p and p != "auto" and str(p) not in own]


def run(cfg: DictConfig) -> dict[str, EvalResult]:
    """Evaluate the configured model on every benchmark of ``cfg.eval`` (and under ``cfg.attack``); each
    result is saved once and returned. Configs given by name (``model.peft=lora``, ``attack.relearn.data``)
    are composed first (``compose_names``).

    The output folder follows training's rules (``run_folder``): the evaluation is written into a staging
    folder that takes ``paths.output_dir``'s place in one step when it is complete, and an existing
    ``paths.output_dir`` is replaced only if it is a finished evaluation of ours (whose results the new
    one starts from, and reuses where their fingerprints match); a training run's folder, a user's folder
    or a file is never touched. A failed evaluation leaves nothing behind, except that when an attack
    fails the clean results already computed are published before the error propagates.

    What the evaluation cost (``core.compute``: the setup, each benchmark's evaluation, each attack) is
    recorded in ``run_complete.json`` and, per benchmark, in its EVAL file's ``_meta.compute``."""
    with CostRecorder() as cost:
        return _run(cfg, cost)


def _run(cfg: DictConfig, cost: CostRecorder) -> dict[str, EvalResult]:
    setup = Phase("setup", "setup").start()  # config, model, benchmarks (ended on every process below)
    compose_names(cfg)
    set_seed(check_number("seed", cfg.get("seed", 0), integer=True, low=0))
    quiet_library_bars()
    if not cfg.get("eval"):
        raise ValueError("no benchmark selected: add eval=tofu")
    attacks = get_attacks(OmegaConf.to_container(cfg.attack, resolve=True) if cfg.get("attack") else None)
    # Under torchrun / accelerate launch every process holds the model on its own device and takes a strided
    # share of every pass; the results are gathered and process 0 writes the files (the same files as one process).
    check_process_count()  # a launcher that started fewer processes than asked for, before any work
    state = PartialState(cpu=not torch.cuda.is_available())
    template_args = cfg.model.get("template_args")
    # the benchmarks' configs checked, and their inputs known, before the output folder is taken
    benchmarks = get_evaluators(cfg.eval, template_args=template_args, paths=cfg.get("paths"))
    check_attacks(attacks, benchmarks)
    folder = RunFolder(cfg.paths.output_dir, inputs=eval_inputs(cfg, benchmarks, attacks), mode="eval")
    staging, _ = on_main_process(lambda: folder.start(carry_over=True))
    results: dict[str, EvalResult] = {}
    try:
        model, tokenizer = get_model(cfg.model)
        model = model.to(state.device)
        evaluators = get_evaluators(cfg.eval, tokenizer=tokenizer, template_args=template_args, paths=cfg.get("paths"))
        if state.is_main_process:  # what was evaluated and how, for src/report.py
            write_atomic(staging / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        model_id = model_identity(cfg.model)
        setup.stop()
        for name, evaluator in evaluators.items():
            # saved here, once, with its cost (and the attacked metrics: alone if an attack fails)
            with Phase(f"evaluation:{evaluator.name}", "evaluation") as evaluation:
                result = evaluator.evaluate(model, output_dir=staging, model_id=model_id, save=False)
            phases = [evaluation.record]
            robustness = None
            if attacks:  # every process: the attacked evaluations are sharded like the clean one
                before = len(cost.records())
                try:
                    attacked, baselines = run_attacks(attacks, evaluator, model, model_id, tokenizer,
                                                      evaluator.template_args,
                                                      evaluator.cfg.get("retain_logs_path"))
                except BaseException as error:
                    if state.is_main_process:  # this process's measure only: the others may be anywhere
                        result.with_compute(phases + cost.records()[before:]).save(staging)
                        folder.finish({"task_name": cfg.task_name, "benchmarks": [*results, name],
                                       "attack_failed": f"{name}: {type(error).__name__}: {error}",
                                       "compute": cost.finish(flop_params(model), gather=False).as_json()})
                        print(f"{name}: an attack failed; the clean evaluation is saved in {folder.output_dir}",
                              file=sys.stderr)
                    raise
                phases += cost.records()[before:]  # one per attack
                result, robustness = attacked_result(result, attacked, baselines, evaluator, attacks, model)
            result = result.with_compute(phases)
            if state.is_main_process:
                result.save(staging)
                if robustness is not None:
                    write_json_atomic(robustness_file(staging, evaluator.name), robustness)
            results[name] = result
            if state.is_main_process:
                print(f"\n{name} summary ({cfg.paths.output_dir}):")
                print(format_summary({cfg.task_name: result.summary}))
                if robustness:
                    print(f"\n{name} under attack (clean, attacked, the retain model):")
                    print(format_robustness(robustness))
        spent = cost.finish(flop_params(model))  # every process: the measures are combined
        if state.is_main_process:
            folder.finish({"task_name": cfg.task_name, "benchmarks": list(results), "compute": spent.as_json()})
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            folder.abandon()
        raise
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """One evaluation; inside a sweep (-m) a failed combination is recorded and the sweep goes on."""
    if run_job(run, cfg) is not None:
        write_job_status("finished", str(cfg.paths.output_dir))


if __name__ == "__main__":
    main()
