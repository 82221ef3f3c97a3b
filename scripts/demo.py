"""The demo behind `make demo`: the whole TOFU recipe, offline, on a small generated dataset, ending in a report.

1. Generate a TOFU-format dataset of fictitious authors (scripts/synthetic_tofu.py): 20 authors x 5 questions;
   forget10 = the last 2 authors (10 questions), holdout10 = 10 questions about 2 authors never trained on.
2. Fine-tune SmolLM2-135M-Instruct on all of it -> the "target" model, which knows every author.
3. Fine-tune it on the retain part only -> the "retain" model, the gold standard of forgetting.
4. Evaluate both on TOFU (src/eval.py); the retain model's evaluation is the reference of forget quality and privleak.
5. Unlearn forget10 from the target with NPO, evaluating on TOFU every epoch and at the end -> "unlearned".
6. Write the report (src/report.py): table, forget quality vs model utility, trajectories, loss terms, and
   each forget question before and after.

Every step is the public command line, so the demo doubles as an end-to-end check. Its closing text reads
the table as it comes out: it says whether the unlearned model moved towards the retain model, stopped
short of it or went past it. Options: --out DIR (default saves/demo), --fast (a smoke run, not a result).
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
# Warnings and the trainer's loss lines only: the per-metric timing lines of the evaluations are left out.
QUIET = "hydra.job_logging.root.level=WARNING"
COMMON = [SYSTEM_PROMPT, QUIET, "trainer.args.per_device_train_batch_size=8", "trainer.args.gradient_accumulation_steps=1",
          "trainer.args.logging_steps=2"]
# Answers of at most 48 new tokens in the ROUGE metrics (the generated answers are short).
SHORT_GENERATION = [
    "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=48",
    *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=48"
      for p in ("retain", "ra", "wf")]]
#: The unlearning run: NPO (Zhang et al. 2024) with its retain NLL term, a small learning rate and a few epochs,
#: chosen so that the forget answers become about as unlikely as for the retain model, not far less.
UNLEARN = ["trainer=NPO", "trainer.method_args.beta=0.1", "trainer.method_args.alpha=1.0",
           "trainer.args.learning_rate=4e-5", "trainer.args.per_device_train_batch_size=4",
           "trainer.args.warmup_steps=0", "trainer.args.logging_steps=1"]
UNLEARN_EPOCHS = 3


def run_step(title: str, cmd: list[str], quiet: bool = False) -> None:
    shown = ["python", *[str(Path(c).relative_to(REPO)) if c.startswith(str(REPO / "src")) else c for c in cmd[1:3]]]
    print(f"\n$ {' '.join(shown)} ... ({title})", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None)
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def train(out: Path, title: str, config: str, overrides: list[str]) -> Path:
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_dir=")))
    run_step(title, [sys.executable, str(REPO / "src" / "train.py"), f"--config-name={config}", f"model={MODEL}",
                     f"paths.tofu={out / 'data'}", f"paths.log_dir={out / 'logs'}", *COMMON, *overrides])
    return run_dir


def evaluate(out: Path, name: str, model_dir: Path, retain_logs: Path | None) -> dict:
    """The TOFU evaluation (src/eval.py) of one model; returns its summary."""
    eval_dir = out / "eval" / name
    run_step(f"TOFU evaluation of the {name} model", [
        sys.executable, str(REPO / "src" / "eval.py"), "--config-name=eval.yaml", f"model={MODEL}",
        f"model.model_args.pretrained_model_name_or_path={model_dir}", "eval=tofu", "forget_split=forget10",
        f"retain_logs_path={retain_logs or 'null'}", f"paths.tofu={out / 'data'}", f"paths.log_dir={out / 'logs'}",
        f"paths.output_dir={eval_dir}", f"task_name=demo_{name}", SYSTEM_PROMPT, QUIET, *SHORT_GENERATION], quiet=True)
    return json.loads((eval_dir / "TOFU_SUMMARY.json").read_text())


def reading(target: dict, retain: dict, unlearned: dict) -> list[str]:
    """What the table says, in words, whichever way it came out."""
    lines = []
    t, r, u = (s["forget_Q_A_Prob"] for s in (target, retain, unlearned))
    gap = t - r
    if gap <= 0:
        lines.append(f"- The target does not know the forget answers better than the retain model "
                     f"(forget_Q_A_Prob {t:.3f} vs {r:.3f}): there was nothing to forget, so this run shows little.")
    else:
        moved = (t - u) / gap
        where = ("stopped short of the retain model" if moved < 0.75 else
                 "went well past the retain model (over-unlearning: the forget answers are now LESS likely than "
                 "for a model that never saw them, which itself gives the unlearning away)" if moved > 1.5 else
                 "landed near the retain model")
        lines.append(f"- Forget answers: probability {t:.3f} (target) -> {u:.3f} (unlearned) vs {r:.3f} (retain): "
                     f"{moved:.0%} of the way from the target to the retain model; it {where}.")
    fq_t, fq_u = target.get("forget_quality"), unlearned.get("forget_quality")
    if fq_t is not None and fq_u is not None:
        lines.append(f"- Forget quality (KS-test p-value of the truth ratios against the retain model's, 10 rows: "
                     f"coarse): {fq_t:.3g} (target) -> {fq_u:.3g} (unlearned); 1 = indistinguishable from the "
                     "retain model, below 0.05 = distinguishable.")
    pl_t, pl_u = target.get("privleak"), unlearned.get("privleak")
    if pl_t is not None and pl_u is not None:
        verdict = ("still leaks membership (negative)" if pl_u < -10 else
                   "looks over-unlearned to a membership test (positive)" if pl_u > 10 else
                   "is within 10 points of the retain model")
        lines.append(f"- privleak: {pl_t:+.1f} (target) -> {pl_u:+.1f} (unlearned): the unlearned model {verdict}.")
    mu_t, mu_r, mu_u = (s.get("model_utility") for s in (target, retain, unlearned))
    if None not in (mu_t, mu_u):
        change = (mu_u - mu_t) / mu_t if mu_t else 0.0
        kept = "held" if change > -0.1 else "dropped"
        lines.append(f"- Model utility: {mu_t:.3f} (target) -> {mu_u:.3f} (unlearned), retain model {mu_r:.3f}: "
                     f"it {kept} ({change:+.0%}).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "saves" / "demo")
    parser.add_argument("--fast", action="store_true", help="fewer epochs (a smoke run, not a meaningful result)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    out: Path = args.out.resolve()
    began = time.time()

    from synthetic_tofu import generate_tofu_like  # beside this script (its folder is sys.path[0])

    counts = generate_tofu_like(out / "data", n_authors=20, qa_per_author=5, seed=0, retain_eval_rows=10,
                                world_rows=10)
    print(f"Generated a TOFU-format dataset in {out / 'data'}: {counts['full.json']} QA pairs, "
          f"forget10 = {counts['forget10.json']}, retain90 = {counts['retain90.json']}, "
          f"holdout10 = {counts['holdout10.json']}")

    ft_epochs = 1 if args.fast else 3
    finetune = ["trainer.args.learning_rate=2e-4", "trainer.args.warmup_steps=0.1",
                f"trainer.args.num_train_epochs={ft_epochs}"]
    target = train(out, "fine-tune the target model on every author", "train.yaml", [
        *finetune, "data.train=TOFU_QA_FULL", "task_name=demo_target", f"paths.output_dir={out / 'target'}"])
    retain = train(out, "fine-tune the retain model on the retain authors only", "train.yaml", [
        *finetune, "data.train=TOFU_QA_RETAIN90", "task_name=demo_retain", f"paths.output_dir={out / 'retain'}"])

    summaries = {"retain": evaluate(out, "retain", retain, None)}
    retain_logs = out / "eval" / "retain" / "TOFU_EVAL.json"
    summaries["target"] = evaluate(out, "target", target, retain_logs)
    summaries["retain"] = evaluate(out, "retain", retain, retain_logs)  # reuses its metrics; adds forget_quality

    unlearned = train(out, "unlearn forget10 from the target with NPO, evaluated every epoch", "unlearn.yaml", [
        f"model.model_args.pretrained_model_name_or_path={target}", *UNLEARN, "data.forget=TOFU_QA_FORGET10",
        "data.retain=TOFU_QA_RETAIN90", "data.eval=null", f"trainer.args.num_train_epochs={1 if args.fast else UNLEARN_EPOCHS}",
        "eval=tofu", f"retain_logs_path={retain_logs}", "trainer.args.eval_strategy=epoch", *SHORT_GENERATION,
        "task_name=demo_unlearn_NPO", f"paths.output_dir={out / 'unlearned'}"])
    summaries["unlearned"] = json.loads((unlearned / "evals" / "TOFU_SUMMARY.json").read_text())

    from evals import format_summary

    print("\n=== TOFU evaluation (forget10; forget quality and privleak against the retain model) ===")
    print(format_summary({k: summaries[k] for k in ("target", "retain", "unlearned")}))
    print("\nWhat it says:")
    print("\n".join(reading(summaries["target"], summaries["retain"], summaries["unlearned"])))
    print("How to read the rest: the MIA AUCs are the chance that a holdout row (never trained on) looks less\n"
          "familiar than a forget row; the retain model's value is the goal (0.5 on large sets; on 10 + 10 rows it\n"
          "is noisy). privleak compares that AUC with the retain model's: 0 = like it, negative = still leaks\n"
          "membership, positive = over-unlearned.")

    run_step("the report", [sys.executable, str(REPO / "src" / "report.py"), str(out / "eval"), str(unlearned),
                            "--out", str(out / "report"), "--title", "make demo: NPO on forget10 (SmolLM2-135M)"])
    print(f"\nModels are in {out}/{{target,retain,unlearned}}; TensorBoard logs: tensorboard --logdir {out}/unlearned/runs")
    print(f"Report: {out / 'report' / 'report.html'} (also report.md, report.csv and the PNGs beside it)")
    print(f"Total time {time.time() - began:.0f} s.")


if __name__ == "__main__":
    main()
