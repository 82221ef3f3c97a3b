"""The demo behind `make demo`: the whole TOFU recipe, offline, on a small generated dataset.

1. Generate a TOFU-format dataset of fictitious authors (src/data/synthetic_tofu.py).
2. Fine-tune SmolLM2-135M-Instruct on all of it -> the "target" model, which knows every author.
3. Fine-tune it on the retain part only -> the "retain" model, the gold standard of forgetting.
4. Unlearn the forget part from the target with GradDiff -> the "unlearned" model.
5. Evaluate the three models on the TOFU benchmark (src/eval.py) and print the table.

Every step is the public command line (src/train.py), so the demo doubles as an end-to-end check.
Options: --out DIR (default saves/demo), --fast (fewer epochs, for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MODEL = "SmolLM2-135M-Instruct"
# An empty system prompt instead of SmolLM2's default one: ~17 fewer tokens per sample (a faster demo).
SYSTEM_PROMPT = "model.template_args.system_prompt=''"
COMMON = [
    SYSTEM_PROMPT,
    "trainer.args.per_device_train_batch_size=8",
    "trainer.args.gradient_accumulation_steps=1",
    "trainer.args.logging_steps=2",
    "trainer.args.disable_tqdm=true",
]


def train(out: Path, config: str, overrides: list[str]) -> Path:
    cmd = [sys.executable, str(REPO / "src" / "train.py"), f"--config-name={config}", f"model={MODEL}",
           f"paths.tofu={out / 'data'}", f"paths.log_dir={out / 'logs'}", *COMMON, *overrides]
    print("\n$ " + " ".join(["python", "src/train.py", *cmd[2:]]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  done in {time.time() - start:.0f} s", flush=True)
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_dir=")))


def training_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def evaluate(out: Path, name: str, model_dir: Path, retain_logs: Path | None) -> dict:
    """The TOFU evaluation (src/eval.py) of one model; returns its summary."""
    eval_dir = out / "eval" / name
    cmd = [sys.executable, str(REPO / "src" / "eval.py"), "--config-name=eval.yaml", f"model={MODEL}",
           f"model.model_args.pretrained_model_name_or_path={model_dir}", "eval=tofu", "forget_split=forget10",
           f"retain_logs_path={retain_logs or 'null'}", f"paths.tofu={out / 'data'}",
           f"paths.log_dir={out / 'logs'}", f"paths.output_dir={eval_dir}", f"task_name=demo_{name}", SYSTEM_PROMPT,
           *[f"eval.tofu.metrics.{m}.generation_args.max_new_tokens=48" for m in ("forget_Q_A_ROUGE",)],
           *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=48"
             for p in ("retain", "ra", "wf")]]
    print(f"\n$ python src/eval.py ... ({name})", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"  done in {time.time() - start:.0f} s", flush=True)
    return json.loads((eval_dir / "TOFU_SUMMARY.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "saves" / "demo")
    parser.add_argument("--fast", action="store_true", help="fewer epochs (a smoke run, not a meaningful result)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out: Path = args.out.resolve()
    began = time.time()

    from data.synthetic_tofu import generate_tofu_like

    # 10 authors x 4 QA keeps the three trainings within a few minutes on 2 CPU cores.
    counts = generate_tofu_like(out / "data", n_authors=10, qa_per_author=4, seed=0, retain_eval_rows=10, world_rows=10)
    print(f"Generated a TOFU-format dataset in {out / 'data'}: {counts['full.json']} QA pairs, "
          f"forget10 = {counts['forget10.json']}, retain90 = {counts['retain90.json']}")

    ft_epochs = 1 if args.fast else 3
    ul_epochs = 1 if args.fast else 5
    finetune = ["trainer.args.learning_rate=2e-4", "trainer.args.warmup_steps=0.1",
                f"trainer.args.num_train_epochs={ft_epochs}"]
    target = train(out, "train.yaml", [*finetune, "data.train=TOFU_QA_FULL", "task_name=demo_target",
                                       f"paths.output_dir={out / 'target'}"])
    retain = train(out, "train.yaml", [*finetune, "data.train=TOFU_QA_RETAIN90", "task_name=demo_retain",
                                       f"paths.output_dir={out / 'retain'}"])
    unlearned = train(out, "unlearn.yaml", [
        f"model.model_args.pretrained_model_name_or_path={target}", "trainer=GradDiff",
        "trainer.method_args.alpha=1.0", "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90",
        "data.eval=null", "collator=DataCollatorForSupervisedDataset", "trainer.args.per_device_train_batch_size=4",
        "trainer.args.learning_rate=1e-4", f"trainer.args.num_train_epochs={ul_epochs}",
        "trainer.args.logging_steps=1", "task_name=demo_unlearn", f"paths.output_dir={out / 'unlearned'}",
    ])

    print("\n=== Training losses (step: loss) ===")
    for name, run_dir in (("target", target), ("retain", retain), ("unlearned (GradDiff)", unlearned)):
        losses = training_losses(run_dir)
        print(f"{name:>22}: " + ", ".join(f"{s}: {loss:.3f}" for s, loss in losses))
    print("  (GradDiff's loss = -NLL(forget) + NLL(retain): it goes down as the forget answers get less likely)")

    from evals import format_summary

    summaries = {"retain": evaluate(out, "retain", retain, None)}
    retain_logs = out / "eval" / "retain" / "TOFU_EVAL.json"
    summaries["target"] = evaluate(out, "target", target, retain_logs)
    summaries["unlearned"] = evaluate(out, "unlearned", unlearned, retain_logs)
    summaries["retain"] = evaluate(out, "retain", retain, retain_logs)  # reuses its metrics; adds forget_quality
    print("\n=== TOFU evaluation (forget10; forget quality and privleak against the retain model) ===")
    print(format_summary({k: summaries[k] for k in ("target", "retain", "unlearned")}))
    print("\nHow to read it: forgetting worked if the unlearned model moved from the target towards the retain\n"
          "model on the forget metrics (forget_Q_A_Prob, forget_Q_A_ROUGE, extraction_strength and\n"
          "exact_memorization down; forget_quality up) while model_utility held. The MIA AUCs are the chance\n"
          "that a holdout row (never trained on) looks less familiar than a forget row: above the retain\n"
          "model's value (0.5 on large sets; on these 4 + 4 rows it is noisy) = the forget rows are still recognised. privleak compares that AUC with\n"
          "the retain model's: 0 = like the retain model, NEGATIVE = still leaks membership (the target is\n"
          "strongly negative, down to -100), POSITIVE = over-unlearned (the forget rows now look less\n"
          "familiar than unseen text, which also gives the unlearning away).")
    print(f"\nModels are in {out}/{{target,retain,unlearned}}; total time {time.time() - began:.0f} s.")


if __name__ == "__main__":
    main()
