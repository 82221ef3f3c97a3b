"""Unlearn forget folds one after another, evaluating after each: MUSE's scalability (C5) and
sustainability (C6) experiments, top to bottom.

    python src/sequential.py --config-name=unlearn.yaml sequence=muse_sust trainer=NPO model=Llama-2-7b-hf \
        model.model_args.pretrained_model_name_or_path=muse-bench/MUSE-News_target data.retain=MUSE_retain \
        eval=muse data_split=News

Each fold ``k`` of ``sequence.folds`` is an ordinary ``src/train.py`` unlearning run of the same config
with the top-level ``fold=k`` and ``data.forget=<sequence.forget>`` (a dataset config that reads ``fold``:
``MUSE_forget_scal`` nested folds, ``MUSE_forget_sust`` disjoint ones). It starts from the model the
previous fold left (``sequence.start_from: previous``, MUSE's sequential requests) or from the original
model every time (``target``, MUSE's scalability protocol: one forget-set size per run), saves to
``<paths.output_dir>/fold_<k>`` and is then evaluated by ``src/eval.py``'s ``run`` into
``<paths.output_dir>/eval/fold_<k>`` (``eval/start`` for the original model when
``sequence.evaluate_start``). After every stage, one table of every evaluator's summary per stage is
rewritten to ``SEQUENCE_SUMMARY.json`` and ``SEQUENCE_SUMMARY.md`` in ``paths.output_dir``.

Rerunning the same command after an interruption continues where it stopped: a fold whose run folder is
finished with the same resolved config is not trained again, and each evaluation reuses its cached
metrics (the evaluators' result cache).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import eval as eval_script  # noqa: E402
import train as train_script  # noqa: E402
from checks import check_bool, check_choice, check_number  # noqa: E402
from data import available_datasets  # noqa: E402
from resolvers import command_line_overrides, compose_names, register_resolvers  # noqa: E402
from run_folder import COMPLETION_MARKER, RUN_CONFIG, is_finished_run, write_atomic, write_json_atomic  # noqa: E402
from trainer import check_moved_overrides  # noqa: E402

# the resolvers our configs use, before Hydra composes (also in a launcher's worker, which imports this module)
register_resolvers()

log = logging.getLogger("sequential")

SUMMARY_NAME = "SEQUENCE_SUMMARY"
SEQUENCE_KEYS = {"forget", "folds", "start_from", "evaluate_start"}
START_FROM = ("previous", "target")


def check_sequence(cfg: DictConfig) -> dict[str, Any]:
    """The run's ``sequence`` settings, checked before any work (ValueError naming the bad key)."""
    if not cfg.get("sequence"):
        raise ValueError("no sequence selected: add sequence=muse_scal or sequence=muse_sust (configs/sequence/)")
    if cfg.get("mode") != "unlearn":
        raise ValueError(f"mode={cfg.get('mode')!r}: src/sequential.py runs --config-name=unlearn.yaml")
    seq = OmegaConf.to_container(cfg.sequence, resolve=True)
    unknown = set(seq) - SEQUENCE_KEYS
    if unknown:
        raise ValueError(f"sequence has unknown keys {sorted(unknown)}; valid: {', '.join(sorted(SEQUENCE_KEYS))}")
    if seq.get("forget") not in available_datasets():
        raise ValueError(f"sequence.forget={seq.get('forget')!r} is not a dataset config; valid: "
                         f"{', '.join(available_datasets())}")
    folds = seq.get("folds")
    if not isinstance(folds, list) or not folds:
        raise ValueError(f"sequence.folds={folds!r}; must be a non-empty list of fold numbers, e.g. [1, 2, 3, 4]")
    for k in folds:
        check_number("sequence.folds[]", k, integer=True, low=1)
    if len(set(folds)) != len(folds):
        raise ValueError(f"sequence.folds={folds} repeats a fold; each fold is unlearned once")
    check_choice("sequence.start_from", seq.get("start_from"), START_FROM)
    check_bool("sequence.evaluate_start", seq.get("evaluate_start", True))
    if not cfg.get("eval"):
        raise ValueError("a sequence evaluates after each fold: add eval=muse (or another benchmark)")
    return seq


def _with_model(cfg: DictConfig, model_dir: str | None) -> None:
    """Point ``cfg.model`` at a saved run folder (model and tokenizer), or leave it as it is (None)."""
    if model_dir is not None:
        cfg.model.model_args.pretrained_model_name_or_path = model_dir
        cfg.model.tokenizer_args.pretrained_model_name_or_path = model_dir


def base_config(cfg: DictConfig, seq: dict[str, Any]) -> DictConfig:
    """``cfg`` with ``data.forget`` set to the fold dataset, every config given by name composed (``compose_names``:
    each fold's run and its saved config then hold the same composed nodes) and the task name and output folder
    resolved."""
    base = copy.deepcopy(cfg)
    OmegaConf.set_struct(base, False)
    base.data.forget = seq["forget"]
    compose_names(base)
    base.fold = seq["folds"][0]
    base.task_name = str(base.task_name)
    base.paths.output_dir = str(base.paths.output_dir)
    base.sequence = None
    base.trainer.args.do_eval = False  # each fold is evaluated below, by src/eval.py, into <output>/eval/fold_<k>
    return base


def fold_config(base: DictConfig, fold: int, start_model: str | None) -> DictConfig:
    """The unlearning run of fold ``fold``: ``fold=<k>``, its own task name and output folder, its start model."""
    cfg = copy.deepcopy(base)
    cfg.fold = fold
    cfg.task_name = f"{base.task_name}_fold_{fold}"
    cfg.paths.output_dir = str(Path(base.paths.output_dir) / f"fold_{fold}")
    _with_model(cfg, start_model)
    return cfg


def eval_config(run_cfg: DictConfig, model_dir: str | None, output_dir: Path, stage: str) -> DictConfig:
    cfg = copy.deepcopy(run_cfg)
    cfg.task_name = f"{run_cfg.task_name}_eval" if stage != "start" else f"{run_cfg.task_name}_start"
    cfg.paths.output_dir = str(output_dir)
    _with_model(cfg, model_dir)
    return cfg


def already_trained(run_cfg: DictConfig) -> bool:
    """Whether the fold's output is a finished run of exactly this config (then it is not trained again)."""
    folder = Path(run_cfg.paths.output_dir)
    if not is_finished_run(folder):
        return False
    saved = OmegaConf.to_container(OmegaConf.load(folder / RUN_CONFIG), resolve=True)
    if saved != OmegaConf.to_container(run_cfg, resolve=True):
        log.info("%s holds a finished run of another config: training this fold again", folder)
        return False
    return True


def _steps(folder: Path) -> int | None:
    try:
        return json.loads((folder / COMPLETION_MARKER).read_text(encoding="utf-8")).get("steps")
    except (OSError, ValueError, AttributeError):
        return None


def summary_row(stage: str, fold: int | None, model: str, steps: int | None,
                summaries: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """One table row: the stage, and each evaluator's summary metrics (prefixed ``<evaluator>/`` when there
    are several evaluators, so two benchmarks' metrics of one name stay apart)."""
    row: dict[str, Any] = {"stage": stage, "fold": fold, "model": model, "steps": steps}
    for name, summary in summaries.items():
        for metric, value in summary.items():
            row[metric if len(summaries) == 1 else f"{name}/{metric}"] = value
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``: one row per stage, one column per metric (blank where a stage has none)."""
    columns = ["stage", "steps"]
    for row in rows:
        columns += [c for c in row if c not in columns and c not in ("fold", "model")]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(output_dir: Path, seq: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """SEQUENCE_SUMMARY.json (settings and rows) and SEQUENCE_SUMMARY.md, each written whole (temp file + rename)."""
    write_json_atomic(output_dir / f"{SUMMARY_NAME}.json", {"sequence": seq, "rows": rows})
    write_atomic(output_dir / f"{SUMMARY_NAME}.md", markdown_table(rows))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the sequence as the config says; returns the summary rows (also written to SEQUENCE_SUMMARY.*)."""
    seq = check_sequence(cfg)
    base = base_config(cfg, seq)
    output_dir = Path(base.paths.output_dir)
    original = base.model.model_args.get("pretrained_model_name_or_path")
    rows: list[dict[str, Any]] = []
    if seq.get("evaluate_start", True):
        start_cfg = eval_config(base, None, output_dir / "eval" / "start", "start")
        summaries = {name: result.summary for name, result in eval_script.run(start_cfg).items()}
        rows.append(summary_row("start", None, str(original or "random_init"), 0, summaries))
        write_summary(output_dir, seq, rows)
        _free_memory()
    previous: str | None = None
    for fold in seq["folds"]:
        start_model = previous if seq["start_from"] == "previous" else None
        run_cfg = fold_config(base, fold, start_model)
        folder = Path(run_cfg.paths.output_dir)
        if already_trained(run_cfg):
            log.info("fold %s: reusing the finished run in %s", fold, folder)
        else:
            log.info("fold %s: unlearning %s from %s", fold, seq["forget"], start_model or original or "random_init")
            train_script.run(run_cfg)
            _free_memory()
        results = eval_script.run(eval_config(run_cfg, str(folder), output_dir / "eval" / f"fold_{fold}", "fold"))
        summaries = {name: result.summary for name, result in results.items()}
        rows.append(summary_row(f"fold_{fold}", fold, str(folder), _steps(folder), summaries))
        write_summary(output_dir, seq, rows)
        _free_memory()
        previous = str(folder)
    print(f"\nsequence summary ({output_dir / (SUMMARY_NAME + '.md')}):\n")
    print(markdown_table(rows))
    return rows


@hydra.main(version_base=None, config_path="../configs", config_name="unlearn.yaml")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    run(cfg)


if __name__ == "__main__":
    try:
        check_moved_overrides(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"Error: {error}")
    sys.argv[1:] = command_line_overrides(sys.argv[1:])  # data.retain=[A,B] in place of a composed default
    main()
