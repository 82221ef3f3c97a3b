"""Fine-tune or unlearn, top to bottom.

    python src/train.py --config-name=train.yaml model=SmolLM2-135M-Instruct data.train=TOFU_QA_FULL
    python src/train.py --config-name=unlearn.yaml model=SmolLM2-135M-Instruct trainer=GradDiff \
        data.forget=TOFU_QA_FORGET10 data.retain=TOFU_QA_RETAIN90

The run works in ``<paths.output_dir>.incomplete`` and renames it to ``paths.output_dir`` only when
everything (model, tokenizer, config, logs) is written, so a failed run leaves no half-written output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from transformers import set_seed  # noqa: E402

from data import check_eval_splits, get_collator, get_data  # noqa: E402
from evals import get_evaluators  # noqa: E402
from model import get_model  # noqa: E402
from trainer import load_trainer  # noqa: E402

log = logging.getLogger("train")


def finalize_output(staging: Path, output_dir: Path) -> None:
    """Atomically put the finished run in place, replacing an earlier run of the same name."""
    old = output_dir.with_name(output_dir.name + ".old")
    if output_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output_dir, old)
    os.replace(staging, output_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_run_files(cfg: DictConfig, trainer, folder: Path) -> None:
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    with open(folder / "train_log.jsonl", "w", encoding="utf-8") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")


def run(cfg: DictConfig) -> Path:
    """Train as the config says and return the output folder."""
    state = PartialState()
    set_seed(cfg.seed)
    check_eval_splits(cfg)
    output_dir = Path(cfg.paths.output_dir)
    staging = output_dir.with_name(output_dir.name + ".incomplete")
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()

    model, tokenizer = get_model(cfg.model)
    data = get_data(cfg.data, cfg.mode, tokenizer, cfg.model.get("template_args"), root_cfg=cfg,
                    seed=cfg.seed, rank=state.process_index)
    collator = get_collator(cfg.collator, tokenizer)
    evaluators = get_evaluators(cfg.get("eval"), tokenizer=tokenizer, template_args=cfg.model.get("template_args"),
                                root_cfg=cfg)
    for evaluator in evaluators.values():
        evaluator.check_data_files()  # before training, not at its first evaluation
    try:
        trainer = load_trainer(cfg.trainer, model, data["train"], data["eval"], tokenizer, collator,
                               output_dir=str(staging), evaluators=evaluators)
        trainer.train()
        trainer.save_model(str(staging))
        if state.is_main_process:
            write_run_files(cfg, trainer, staging)
            finalize_output(staging, output_dir)
            log.info("saved to %s", output_dir)
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            log.error("run failed; removed the partial output %s", staging)
        raise
    return output_dir


@hydra.main(version_base=None, config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    run(cfg)


if __name__ == "__main__":
    main()
