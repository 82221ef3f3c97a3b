"""Evaluate a model on a benchmark, top to bottom.

    python src/eval.py --config-name=eval.yaml model=SmolLM2-135M-Instruct \
        model.model_args.pretrained_model_name_or_path=<model folder> eval=tofu forget_split=forget10 \
        retain_logs_path=<retain model's TOFU_EVAL.json or null> paths.tofu=<folder>

Writes ``<paths.output_dir>/TOFU_EVAL.json`` (every metric, per-sample values), ``TOFU_SUMMARY.json``
(headline numbers) and the resolved ``config.yaml``, and prints the summary as a table. With
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

from attacks import format_robustness, get_attacks, robustness_summary, run_attacks  # noqa: E402
from checks import check_number  # noqa: E402
from evals import EvalResult, format_summary, get_evaluators  # noqa: E402
from model import get_model  # noqa: E402
from progress import quiet_library_bars  # noqa: E402
from resolvers import compose_names, register_resolvers  # noqa: E402
from run_folder import RUN_CONFIG, robustness_file, write_atomic, write_json_atomic  # noqa: E402
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


def run(cfg: DictConfig) -> dict[str, EvalResult]:
    """Evaluate the configured model on every benchmark of ``cfg.eval`` (and under ``cfg.attack``); each
    result is saved once into ``paths.output_dir`` and returned. Configs given by name (``model.peft=lora``,
    ``attack.relearn.data``) are composed first (``compose_names``)."""
    compose_names(cfg)
    set_seed(check_number("seed", cfg.get("seed", 0), integer=True, low=0))
    quiet_library_bars()
    if not cfg.get("eval"):
        raise ValueError("no benchmark selected: add eval=tofu")
    attacks = get_attacks(OmegaConf.to_container(cfg.attack, resolve=True) if cfg.get("attack") else None)
    # Under torchrun / accelerate launch every process holds the model on its own device and takes a strided
    # share of every pass; the results are gathered and process 0 writes the files (the same files as one process).
    state = PartialState(cpu=not torch.cuda.is_available())
    model, tokenizer = get_model(cfg.model)
    model = model.to(state.device)
    template_args = cfg.model.get("template_args")
    evaluators = get_evaluators(cfg.eval, tokenizer=tokenizer, template_args=template_args, paths=cfg.get("paths"))
    out_dir = Path(cfg.paths.output_dir)
    if state.is_main_process:  # what was evaluated and how, for src/report.py (written before the results)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    results: dict[str, EvalResult] = {}
    model_id = model_identity(cfg.model)
    for name, evaluator in evaluators.items():
        # with attacks, the clean result is saved with the attacked metrics, once (or alone if an attack fails)
        result = evaluator.evaluate(model, output_dir=out_dir, model_id=model_id, save=not attacks)
        robustness = None
        if attacks:  # every process: the attacked evaluations are sharded like the clean one
            try:
                attacked, baselines = run_attacks(attacks, evaluator, model, model_id, tokenizer,
                                                  evaluator.template_args,
                                                  evaluator.cfg.get("retain_logs_path"))
            except BaseException:
                if state.is_main_process:
                    result.save(out_dir)
                    print(f"{name}: an attack failed; the clean evaluation is saved in {out_dir}", file=sys.stderr)
                raise
            retain_path = evaluator.cfg.get("retain_logs_path")
            retain = EvalResult.from_eval_payload(evaluator.name, json.loads(Path(retain_path).read_text())) \
                if retain_path else None
            robustness = robustness_summary(result, attacked, baselines, retain)
            result = result.with_attacked(attacked)
            if state.is_main_process:
                result.save(out_dir)
                write_json_atomic(robustness_file(out_dir, evaluator.name), robustness)
        results[name] = result
        if state.is_main_process:
            print(f"\n{name} summary ({cfg.paths.output_dir}):")
            print(format_summary({cfg.task_name: result.summary}))
            if robustness:
                print(f"\n{name} under attack (clean, attacked, the retain model):")
                print(format_robustness(robustness))
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """One evaluation; inside a sweep (-m) a failed combination is recorded and the sweep goes on."""
    if run_job(run, cfg) is not None:
        write_job_status("finished", str(cfg.paths.output_dir))


if __name__ == "__main__":
    main()
