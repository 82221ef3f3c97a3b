#!/usr/bin/env python
"""Side by side with open-unlearning: the same workloads in both frameworks, timed, numbers compared.

    python benchmarks/vs_open_unlearning.py --ou-checkout <locuslab/open-unlearning checkout> \
        --ou-venv .cache/ou-venv --tofu ../shared/data/tofu --out saves/bench/vs_ou.json

Prints ONE JSON object (and writes it to ``--out``): per workload, open-unlearning's wall time, ours
in our default mode and in ``compat=open_unlearning``, the ratios, and for every metric both
frameworks computed the largest difference between open-unlearning and each of our two modes
(compat mode must match: per-sample probabilities within 1e-4 relative, the same generations and
ROUGE, the first training losses within 1e-4; ``matches`` says whether it does).

What the script does, in order:

1. **open-unlearning's virtualenv** (``--ou-venv``), built once from the checkout's
   requirements.txt, with torch pinned to the build installed here (bitsandbytes, GPU-only, is left
   out; deepspeed is built without its compiled ops; the pins are recorded). Its code is never copied: it
   runs from the checkout, through ``benchmarks/ou_driver.py``, which only points its Hub dataset
   loader at the local TOFU files.
2. **A model folder it reads.** It pins transformers 4.45, which reads neither our GGUF copy nor a
   folder written by transformers 5 (RoPE settings under ``rope_parameters`` would be silently
   ignored). ``write_legacy_model_folder`` writes every LlamaConfig field explicitly, safetensors
   weights with the ``format: pt`` metadata, and a fast tokenizer with the chat template inline; then
   the logits of both frameworks on the same tokens must be equal (``logits_max_abs_diff``) before
   anything else runs.
3. **Workloads**, each a whole process (model load included), the same for both:
   ``eval``: the TOFU evaluation (forget01 + holdout01) with the metrics both have;
   ``graddiff``: GradDiff on forget01 / retain99, batch 4 + 4, 10 steps, the same schedule.
   ``--rows N`` runs them on the first N rows of every TOFU file (the test's quick check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts src/ on sys.path)
from run_folder import publish_folder  # noqa: E402

REPO = common.REPO
DRIVER = Path(__file__).resolve().parent / "ou_driver.py"
#: Requirements of open-unlearning that need a GPU; the comparison runs without them (its default
#: optimiser, paged_adamw_32bit, is bitsandbytes': it trains with ``OU_OPTIM`` here).
SKIPPED_REQUIREMENTS = ("bitsandbytes",)
#: Built from source with no compiled ops (its import is needed: open-unlearning's RMU imports it).
BUILT_WITHOUT_ISOLATION = ("deepspeed",)
#: The metrics of the TOFU workload: open-unlearning's default list (its configs/eval/tofu.yaml, which
#: it runs as it is); ours is given the same list. With no retain model's logs, forget quality has
#: nothing to compare with on either side (and privleak differs by design: see docs/evaluation.md).
EVAL_METRICS = ["forget_Truth_Ratio", "forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
                "privleak", "extraction_strength"]
TOLERANCE = 1e-4


# ----- 1. open-unlearning's virtualenv ----------------------------------------------------------------
def ou_requirements(checkout: Path) -> list[str]:
    """The checkout's requirements, torch pinned to our installed build, GPU-only ones left out."""
    import torch

    pins = []
    for line in (checkout / "requirements.txt").read_text(encoding="utf-8").splitlines():
        req = line.split("#")[0].strip()
        if not req:
            continue
        name = req.split("=")[0].split("<")[0].split(">")[0].strip().lower()
        if name in SKIPPED_REQUIREMENTS:
            continue
        pins.append(f"torch=={torch.__version__.split('+')[0]}" if name == "torch" else req)
    # its evals package imports lm_eval at import time: the extra pinned in its setup.py is needed too
    setup = (checkout / "setup.py").read_text(encoding="utf-8") if (checkout / "setup.py").is_file() else ""
    pins += re.findall(r'"(lm-eval==[^"]+)"', setup)
    return pins


def ensure_ou_venv(venv: Path, checkout: Path) -> Path:
    """``venv/bin/python``, after building the virtualenv if it does not hold these requirements yet."""
    pins = ou_requirements(checkout)
    marker = venv / ".requirements"
    python = venv / "bin" / "python"
    if python.is_file() and marker.is_file() and marker.read_text(encoding="utf-8") == "\n".join(pins):
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_pin = [p for p in pins if p.startswith("torch==")]
    # torch first and alone: pip then takes the local CPU build instead of resolving a CUDA one.
    subprocess.run([str(python), "-m", "pip", "install", "-q", *torch_pin], check=True)
    source_built = [p for p in pins if p.split("=")[0].lower() in BUILT_WITHOUT_ISOLATION]
    rest = [p for p in pins if p not in torch_pin and p not in source_built]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *rest], check=True)
    if source_built:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation", *source_built], check=True,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
    marker.write_text("\n".join(pins), encoding="utf-8")
    return python


# ----- 2. a model folder transformers 4.45 reads ------------------------------------------------------
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp",
                "tie_word_embeddings", "attention_bias", "attention_dropout", "mlp_bias")


def legacy_llama_config(config: dict) -> dict:
    """A transformers-5 Llama ``config.json`` as transformers 4.45 reads it: ``rope_theta`` and
    ``rope_scaling`` at the top level (4.45 ignores ``rope_parameters``), every field explicit."""
    if config.get("model_type") != "llama":
        raise ValueError(f"only Llama models are converted; this one is {config.get('model_type')!r}")
    rope = dict(config.get("rope_parameters") or {})
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "torch_dtype": config.get("dtype", config.get("torch_dtype", "float32"))}
    for key in LLAMA_FIELDS:
        if key in config:
            out[key] = config[key]
    out["rope_theta"] = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    out["rope_scaling"] = None if rope_type == "default" else rope
    return out


def write_legacy_model_folder(src: Path, dst: Path) -> Path:
    """``dst``: the model of folder ``src`` (written by transformers 5) in the layout transformers 4.45 reads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    template_file = src / "chat_template.jinja"
    tmp = dst.with_name(dst.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(legacy_llama_config(config), indent=2), encoding="utf-8")
    legacy_tokenizer = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                        if k in tokenizer_config}
    legacy_tokenizer.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                            model_max_length=config.get("max_position_embeddings", 2048))
    if template_file.is_file():
        legacy_tokenizer["chat_template"] = template_file.read_text(encoding="utf-8")
    elif "chat_template" in tokenizer_config:
        legacy_tokenizer["chat_template"] = tokenizer_config["chat_template"]
    (tmp / "tokenizer_config.json").write_text(json.dumps(legacy_tokenizer, indent=2), encoding="utf-8")
    shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "generation_config.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}), encoding="utf-8")
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dst, ignore_errors=True)
    publish_folder(tmp, dst)
    return dst


_LOGITS_SNIPPET = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits[0], sys.argv[2])
"""


def check_same_logits(ou_python: Path, legacy_folder: Path, our_folder: Path, tokens: list[int]) -> float:
    """Largest |logit difference| between transformers 4.45 on ``legacy_folder`` and ours on ``our_folder``;
    a ValueError when it exceeds ``TOLERANCE`` (the folder would not be the same model)."""
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.pt"
        subprocess.run([str(ou_python), "-c", _LOGITS_SNIPPET, str(legacy_folder), str(out),
                        ",".join(map(str, tokens))], check=True, env=_env())
        theirs = torch.load(out)
    model = AutoModelForCausalLM.from_pretrained(str(our_folder), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        ours = model.eval()(input_ids=torch.tensor([tokens])).logits[0]
    diff = float((ours - theirs).abs().max())
    if not diff <= TOLERANCE:
        raise ValueError(f"the model folder written for open-unlearning gives other logits than ours (max |diff| "
                         f"{diff:.3g} > {TOLERANCE}): {legacy_folder} is not the same model as {our_folder}")
    return diff


# ----- data -------------------------------------------------------------------------------------------
def subset_tofu(tofu: Path, rows: int | None, dst: Path) -> Path:
    """``tofu`` itself, or (``rows``) a folder with the first ``rows`` rows of each of its files."""
    if not rows:
        return tofu
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(tofu.iterdir()):
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8").lstrip()
            records = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                      if line.strip()]
            (dst / path.name).write_text("".join(json.dumps(r) + "\n" for r in records[:rows]), encoding="utf-8")
        elif path.is_file():
            shutil.copyfile(path, dst / path.name)
    return dst


# ----- running ----------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        result = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {result.returncode}); log {log}:\n{tail}")
    return wall


def ou_model_overrides(folder: Path) -> list[str]:
    """open-unlearning's model config for the converted folder: fp32, sdpa, on the CPU, the chat template with
    no system prompt of its own (the template's default, as our SmolLM2 config)."""
    return ["model=Llama-3.2-1B-Instruct", f"model.model_args.pretrained_model_name_or_path={folder}",
            f"model.tokenizer_args.pretrained_model_name_or_path={folder}", "model.model_args.torch_dtype=float32",
            "model.model_args.attn_implementation=sdpa", "model.template_args.system_prompt=null",
            "model.template_args.date_string=null"]


def run_ou_eval(ou_python: Path, checkout: Path, folder: Path, tofu: Path, out: Path, batch_size: int,
                max_new_tokens: int) -> dict[str, Any]:
    timings = out / "ou_timings.json"
    cmd = [str(ou_python), str(DRIVER), "--checkout", str(checkout), "--tofu", str(tofu), "--timings", str(timings),
           "eval", *ou_model_overrides(folder), "model.model_args.device_map=cpu", "eval=tofu",
           "eval.tofu.forget_split=forget01", "eval.tofu.holdout_split=holdout01", "eval.tofu.overwrite=true",
           f"eval.tofu.batch_size={batch_size}", *_generation_overrides(max_new_tokens),
           "task_name=vs_ours", f"paths.output_dir={out / 'ou'}"]
    wall = _timed(cmd, checkout, out / "ou_eval.log")
    return {"wall_s": wall, **json.loads(timings.read_text()), "eval_file": str(out / "ou" / "TOFU_EVAL.json")}


def run_our_eval(folder: Path, tofu: Path, out: Path, compat: bool, max_new_tokens: int) -> dict[str, Any]:
    """Our TOFU evaluation of the same metrics (its own batch sizes: 32 rows per teacher-forced pass, as
    open-unlearning's default; generation ``auto``, which is 32 prompts in compat mode too)."""
    name = "ours_compat" if compat else "ours"
    metrics = ",".join(EVAL_METRICS)
    cmd = [sys.executable, "src/eval.py", "--config-name=eval.yaml", "model=SmolLM2-135M-Instruct",
           f"model.model_args.pretrained_model_name_or_path={folder}", "eval=tofu", f"eval/tofu_metrics@eval.tofu.tofu_metrics=[{metrics}]",
           f"paths.tofu={tofu}", "forget_split=forget01", "holdout_split=holdout01", "eval.tofu.overwrite=true",
           f"paths.output_dir={out / name}", f"compat={'open_unlearning' if compat else 'null'}",
           *_generation_overrides(max_new_tokens)]
    wall = _timed(cmd, REPO, out / f"{name}_eval.log")
    return {"wall_s": wall, "eval_file": str(out / name / "TOFU_EVAL.json")}


def _generation_overrides(max_new_tokens: int) -> list[str]:
    return [f"eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens={max_new_tokens}",
            *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens="
              f"{max_new_tokens}" for p in ("retain", "ra", "wf")]]


#: The GradDiff workload's schedule, the same on both sides: constant learning rate, no warmup (its
#: ``warmup_epochs`` divides by the number of GPUs, 0 on a CPU), AdamW, fp32, no evaluation. The
#: optimiser is each framework's own: open-unlearning's default (bitsandbytes' paged_adamw_32bit) needs a
#: GPU, so it gets transformers' default ``adamw_torch`` (``OU_OPTIM``); ours keeps its default
#: ``adamw_torch_fused`` (the same updates in one kernel: the compat loss check covers it).
OU_OPTIM = "adamw_torch"
GRADDIFF_ARGS = {"max_steps": 10, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                 "learning_rate": 1e-5, "weight_decay": 0.01, "lr_scheduler_type": "constant", "warmup_steps": 0,
                 "bf16": False, "bf16_full_eval": False, "logging_steps": 1,
                 "report_to": "none", "save_strategy": "no", "eval_strategy": "no", "eval_on_start": False,
                 "seed": 0}


def run_ou_graddiff(ou_python: Path, checkout: Path, folder: Path, tofu: Path, out: Path) -> dict[str, Any]:
    timings = out / "ou_timings.json"
    run_dir = out / "ou"
    cmd = [str(ou_python), str(DRIVER), "--checkout", str(checkout), "--tofu", str(tofu), "--timings", str(timings),
           "train", "--config-name=unlearn.yaml", "experiment=unlearn/tofu/default", "trainer=GradDiff",
           "forget_split=forget01", "retain_split=retain99", "holdout_split=holdout01",
           *ou_model_overrides(folder), "++trainer.args.warmup_epochs=0", "++trainer.args.do_eval=false",
           *[f"++trainer.args.{k}={_hydra(v)}" for k, v in GRADDIFF_ARGS.items()],  # ++: set, or add if absent
           f"++trainer.args.optim={OU_OPTIM}",
           "task_name=vs_ours", f"paths.output_dir={run_dir}"]
    wall = _timed(cmd, checkout, out / "ou_train.log")
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {"wall_s": wall, **json.loads(timings.read_text()), **_training_figures(state["log_history"])}


def run_our_graddiff(folder: Path, tofu: Path, out: Path, compat: bool) -> dict[str, Any]:
    name = "ours_compat" if compat else "ours"
    run_dir = out / name
    cmd = [sys.executable, "src/train.py", "--config-name=unlearn.yaml", "model=SmolLM2-135M-Instruct",
           f"model.model_args.pretrained_model_name_or_path={folder}", "trainer=GradDiff",
           "data.forget=TOFU_QA_FORGET01", "data.retain=TOFU_QA_RETAIN99", "data.eval=null", f"paths.tofu={tofu}",
           *[f"trainer.args.{k}={_hydra(v)}" for k, v in GRADDIFF_ARGS.items()],
           "trainer.args.disable_tqdm=true", f"paths.output_dir={run_dir}",
           f"compat={'open_unlearning' if compat else 'null'}"]
    wall = _timed(cmd, REPO, out / f"{name}_train.log")
    history = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": wall, **_training_figures(history)}


def _hydra(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _training_figures(history: list[dict]) -> dict[str, Any]:
    """The Trainer's own figures from its log history: step losses, train_runtime, steps per second."""
    final = next((e for e in reversed(history) if "train_runtime" in e), {})
    return {"losses": [e["loss"] for e in history if "loss" in e and "train_runtime" not in e],
            "train_runtime_s": final.get("train_runtime"), "train_steps_per_second": final.get("train_steps_per_second")}


def graddiff_workload(ou_python: Path, checkout: Path, legacy: Path, our_folder: Path, tofu: Path, work: Path,
                      args: argparse.Namespace) -> dict[str, Any]:
    out = work / "graddiff"
    out.mkdir(exist_ok=True)
    theirs = run_ou_graddiff(ou_python, checkout, legacy, tofu, out)
    entry: dict[str, Any] = {"open_unlearning": theirs, "args": GRADDIFF_ARGS, "open_unlearning_optim": OU_OPTIM}
    for compat in args.compat_flags:
        ours = run_our_graddiff(our_folder, tofu, out, compat)
        ours["speedup_wall"] = theirs["wall_s"] / ours["wall_s"]
        if theirs["train_runtime_s"] and ours["train_runtime_s"]:
            ours["speedup_train_runtime"] = theirs["train_runtime_s"] / ours["train_runtime_s"]
        pairs = list(zip(theirs["losses"], ours["losses"]))
        ours["loss_max_abs_diff"] = max((abs(a - b) for a, b in pairs), default=None)
        ours["matches"] = bool(pairs) and len(theirs["losses"]) == len(ours["losses"]) and \
            ours["loss_max_abs_diff"] <= TOLERANCE
        entry["ours_compat" if compat else "ours"] = ours
    return entry


# ----- comparing --------------------------------------------------------------------------------------
def _numbers(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a metric's ``value_by_index`` entry into ``{"<index>.<stat>[.<k>]": number or text}``."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        for k, v in enumerate(value):
            out.update(_numbers(v, f"{prefix}.{k}"))
    else:
        out[prefix] = value
    return out


def _relative(a: float, b: float) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare_eval_files(theirs: dict, ours: dict) -> dict[str, dict[str, Any]]:
    """Per metric present in both files: the largest relative difference of ``agg_value`` and of the
    per-sample numbers, and how many per-sample texts (generations) differ."""
    report = {}
    for name in sorted(set(theirs) & set(ours) - {"_meta"}):
        a, b = theirs[name], ours[name]
        if not (isinstance(a, dict) and isinstance(b, dict)):
            continue
        entry: dict[str, Any] = {"agg_rel_diff": _relative(_float(a.get("agg_value")), _float(b.get("agg_value")))}
        sa, sb = _numbers(a.get("value_by_index") or {}), _numbers(b.get("value_by_index") or {})
        shared = set(sa) & set(sb)
        numeric = [k for k in shared if isinstance(sa[k], (int, float)) and isinstance(sb[k], (int, float))]
        texts = [k for k in shared if isinstance(sa[k], str) and isinstance(sb[k], str)]
        entry["per_sample_max_rel_diff"] = max((_relative(float(sa[k]), float(sb[k])) for k in numeric), default=0.0)
        entry["per_sample_values"] = len(numeric)
        if texts:
            entry["texts_differing"] = sum(sa[k] != sb[k] for k in texts)
            entry["texts"] = len(texts)
        entry["matches"] = (entry["agg_rel_diff"] <= TOLERANCE and entry["per_sample_max_rel_diff"] <= TOLERANCE
                            and not entry.get("texts_differing"))
        report[name] = entry
    return report


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _commit(checkout: Path) -> str | None:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


# ----- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ou-checkout", required=True, type=Path, help="a checkout of locuslab/open-unlearning")
    parser.add_argument("--ou-venv", type=Path, default=REPO / ".cache" / "ou-venv",
                        help="open-unlearning's virtualenv (built here once)")
    parser.add_argument("--tofu", type=Path, default=REPO.parent / "shared" / "data" / "tofu")
    parser.add_argument("--model-folder", type=Path, default=None,
                        help="our SmolLM2-135M-Instruct folder (default: the offline copy in .cache/models)")
    parser.add_argument("--workloads", default="eval", help="comma-separated: eval, graddiff")
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows of every TOFU file")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--our-modes", default="ours_compat,ours",
                        help="which of our runs, comma-separated: ours_compat (compat=open_unlearning), ours "
                             "(our defaults); e.g. ours alone for a quicker speed figure")
    parser.add_argument("--reuse-ou", action="store_true",
                        help="reuse open-unlearning's evaluation from an earlier run in the same --work-dir (same "
                             "checkout commit, data, rows, max new tokens, batch size and CPU model) instead of "
                             "running it again; "
                             "the JSON marks it as reused")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.compat_flags = _compat_flags(args.our_modes)
    common.set_offline_env()

    checkout = args.ou_checkout.resolve()
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="vs_ou_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ou_python = ensure_ou_venv(args.ou_venv.resolve(), checkout)
    our_folder = (args.model_folder or _our_smollm2_folder()).resolve()
    legacy = write_legacy_model_folder(our_folder, work / "model_for_ou")
    tokens = list(range(1, 33))
    result: dict[str, Any] = {
        "machine": common.machine_info(),
        "ours_commit": _commit(REPO), "ou_commit": _commit(checkout),
        "ou_requirements": ou_requirements(checkout), "ou_skipped_requirements": list(SKIPPED_REQUIREMENTS),
        "model": str(our_folder), "rows": args.rows,
        "logits_max_abs_diff": check_same_logits(ou_python, legacy, our_folder, tokens),
        "workloads": {},
    }
    tofu = subset_tofu(args.tofu.resolve(), args.rows, work / "tofu")
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if workload == "eval":
            result["workloads"]["eval"] = eval_workload(ou_python, checkout, legacy, our_folder, tofu, work, args)
        elif workload == "graddiff":
            result["workloads"]["graddiff"] = graddiff_workload(ou_python, checkout, legacy, our_folder, tofu, work,
                                                                args)
        else:
            raise ValueError(f"unknown workload {workload!r}; valid: eval, graddiff")
        _write(result, args.out)
    _write(result, args.out)
    print(json.dumps(result, indent=2))
    return result


def eval_workload(ou_python: Path, checkout: Path, legacy: Path, our_folder: Path, tofu: Path, work: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    out = work / "eval"
    out.mkdir(exist_ok=True)
    settings = {"ou_commit": _commit(checkout), "tofu": str(args.tofu.resolve()), "rows": args.rows,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "cpu": common.cpu_model()}
    theirs = _reused_ou_eval(out / "ou_result.json", settings) if args.reuse_ou else None
    if theirs is None:
        if args.reuse_ou:
            print(f"--reuse-ou: no earlier open-unlearning evaluation with {settings} in {out}; running it",
                  file=sys.stderr)
        theirs = run_ou_eval(ou_python, checkout, legacy, tofu, out, args.batch_size, args.max_new_tokens)
        _write({"settings": settings, "result": theirs}, out / "ou_result.json")
    entry: dict[str, Any] = {"open_unlearning": theirs}
    ou_file = json.loads(Path(theirs["eval_file"]).read_text())
    for compat in args.compat_flags:
        name = "ours_compat" if compat else "ours"
        ours = run_our_eval(our_folder, tofu, out, compat, args.max_new_tokens)
        ours["speedup"] = theirs["wall_s"] / ours["wall_s"]
        ours["vs_open_unlearning"] = compare_eval_files(ou_file, json.loads(Path(ours["eval_file"]).read_text()))
        ours["matches"] = all(m["matches"] for m in ours["vs_open_unlearning"].values())
        entry[name] = ours
    return entry


def _reused_ou_eval(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """open-unlearning's evaluation result saved by an earlier run with the same ``settings`` (None: none, or
    one with other settings, which is then run again)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("settings") != settings or not Path(saved["result"]["eval_file"]).is_file():
        return None
    return {**saved["result"], "reused_from": str(path)}


OUR_MODES = {"ours_compat": True, "ours": False}


def _compat_flags(modes: str) -> list[bool]:
    """``--our-modes`` as the ``compat`` flag of each of our runs, in the order given."""
    names = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in OUR_MODES]
    if unknown or not names:
        raise ValueError(f"--our-modes {modes!r}: give one or more of {', '.join(OUR_MODES)}")
    return [OUR_MODES[m] for m in names]


def _our_smollm2_folder() -> Path:
    from model import get_model  # noqa: F401  (the offline copy is made by our model loader)

    folder = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is missing: run `make demo` or the tests once to convert the GGUF copy")
    return folder


def _write(result: dict, path: Path | None) -> None:
    if path is not None:
        common.write_json_atomic(path, result)


if __name__ == "__main__":
    main()
