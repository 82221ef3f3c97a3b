#!/usr/bin/env python
"""Side by side with open-unlearning: the same workloads in both frameworks, timed, numbers compared.

    python benchmarks/vs_open_unlearning.py --ou-checkout <locuslab/open-unlearning checkout> \
        --ou-venv .cache/ou-venv --tofu ../shared/data/tofu --out saves/bench/vs_ou.json
    python benchmarks/vs_open_unlearning.py --ou-checkout <checkout> --workloads muse \
        --muse ../shared/data/muse_news --out saves/bench/vs_ou_muse.json

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
   loader at the local TOFU and MUSE-News files.
2. **A model folder it reads.** It pins transformers 4.45, which reads neither our GGUF copy nor a
   folder written by transformers 5 (RoPE settings under ``rope_parameters`` would be silently
   ignored). ``write_legacy_model_folder`` writes every LlamaConfig field explicitly, safetensors
   weights with the ``format: pt`` metadata, and a fast tokenizer with the chat template inline; then
   the logits of both frameworks on the same tokens must be equal (``logits_max_abs_diff``) before
   anything else runs.
3. **Workloads**, each a whole process (model load included), the same for both:
   ``eval``: the TOFU evaluation (forget01 + holdout01) with the metrics both have;
   ``graddiff``: GradDiff on forget01 / retain99, batch 4 + 4, 10 steps, the same schedule;
   ``muse``: the MUSE-News evaluation on the local copy (``--muse``), see ``muse_workload``.
   ``--rows N`` runs them on the first N rows of every TOFU / MUSE file (the test's quick check; MUSE's
   in-context examples stay whole).
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
#: New tokens per TOFU generation unless ``--max-new-tokens`` says otherwise (open-unlearning's default).
TOFU_MAX_NEW_TOKENS = 200
WORKLOADS = ("eval", "graddiff", "muse")


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
    return _subset_json_folder(tofu, rows, dst)


def subset_muse(muse: Path, rows: int | None, dst: Path) -> Path:
    """``muse`` itself, or (``rows``) a folder with the first ``rows`` rows of each of its files except the
    in-context examples (``*_icl.json``), which are copied whole: every knowmem question keeps its prompt."""
    return _subset_json_folder(muse, rows, dst, whole=lambda path: path.stem.endswith("_icl"))


def _subset_json_folder(src: Path, rows: int | None, dst: Path, whole=lambda path: False) -> Path:
    """``src`` itself, or (``rows``) ``dst`` holding the first ``rows`` rows of each ``.json`` file of ``src`` (JSON
    lines or one array, written as JSON lines), the files ``whole(path)`` names and any other file copied as they are."""
    if not rows:
        return src
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.suffix == ".json" and not whole(path):
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
           f"paths.output_dir={out / name}", *_compat_overrides(compat),
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
           *_compat_overrides(compat)]
    wall = _timed(cmd, REPO, out / f"{name}_train.log")
    history = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": wall, **_training_figures(history)}


def _compat_overrides(compat: bool) -> list[str]:
    """``compat=open_unlearning`` for compat mode; nothing for our default (``compat`` is a config group whose
    default is no option: a ``compat=null`` override is refused)."""
    return ["compat=open_unlearning"] if compat else []


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


def compare_eval_files(theirs: dict, ours: dict, roles: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Per metric present in both files: the largest relative difference of ``agg_value`` and of the
    per-sample numbers, and how many per-sample texts (generations) differ, in all and per field
    (``texts_differing_by_field``: ``generation``, ``ground_truth``, ``input``).

    ``roles``: sub-results whose per-sample numbers count too (``("forget", "holdout")``: the per-chunk
    scores of the membership-inference metrics, which keep them under those keys, not ``value_by_index``).
    """
    report = {}
    for name in sorted(set(theirs) & set(ours) - {"_meta"}):
        a, b = theirs[name], ours[name]
        if not (isinstance(a, dict) and isinstance(b, dict)):
            continue
        entry: dict[str, Any] = {"agg_rel_diff": _relative(_float(a.get("agg_value")), _float(b.get("agg_value")))}
        sa, sb = _numbers(a.get("value_by_index") or {}), _numbers(b.get("value_by_index") or {})
        for role in roles:
            if isinstance(a.get(role), dict) and isinstance(b.get(role), dict):
                sa.update(_numbers(a[role].get("value_by_index") or {}, role))
                sb.update(_numbers(b[role].get("value_by_index") or {}, role))
        shared = set(sa) & set(sb)
        numeric = [k for k in shared if isinstance(sa[k], (int, float)) and isinstance(sb[k], (int, float))]
        texts = [k for k in shared if isinstance(sa[k], str) and isinstance(sb[k], str)]
        entry["per_sample_max_rel_diff"] = max((_relative(float(sa[k]), float(sb[k])) for k in numeric), default=0.0)
        entry["per_sample_values"] = len(numeric)
        if texts:
            entry["texts_differing"] = sum(sa[k] != sb[k] for k in texts)
            entry["texts"] = len(texts)
            by_field: dict[str, int] = {}
            for k in texts:
                field = k.rsplit(".", 1)[-1]
                by_field[field] = by_field.get(field, 0) + (sa[k] != sb[k])
            entry["texts_differing_by_field"] = dict(sorted(by_field.items()))
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
    parser.add_argument("--muse", type=Path, default=REPO.parent / "shared" / "data" / "muse_news",
                        help="the local MUSE-News copy (the muse workload)")
    parser.add_argument("--muse-template", choices=MUSE_TEMPLATES, default="tags",
                        help="how the muse workload's knowmem questions are prompted: tags (MUSE's Question:/Answer: "
                             "prompt, open-unlearning's Llama-2-7b-hf model config) or chat (the chat template)")
    parser.add_argument("--workloads", default="eval", help="comma-separated: eval, graddiff, muse")
    parser.add_argument("--rows", type=int, default=None,
                        help="only the first N rows of every TOFU and MUSE file (MUSE's in-context examples whole)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"new tokens per generation, on both sides (default: {TOFU_MAX_NEW_TOKENS} for TOFU, "
                             "each MUSE metric's own for muse)")
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
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; valid: {', '.join(WORKLOADS)}")
    if {"eval", "graddiff"} & set(workloads):
        tofu = subset_tofu(args.tofu.resolve(), args.rows, work / "tofu")
    if "muse" in workloads:
        muse = subset_muse(args.muse.resolve(), args.rows, work / "muse_news")
    for workload in workloads:
        if workload == "eval":
            result["workloads"]["eval"] = eval_workload(ou_python, checkout, legacy, our_folder, tofu, work, args)
        elif workload == "graddiff":
            result["workloads"]["graddiff"] = graddiff_workload(ou_python, checkout, legacy, our_folder, tofu, work,
                                                                args)
        else:
            result["workloads"]["muse"] = muse_workload(ou_python, checkout, legacy, our_folder, muse, work, args)
        _write(result, args.out)
    _write(result, args.out)
    print(json.dumps(result, indent=2))
    return result


def eval_workload(ou_python: Path, checkout: Path, legacy: Path, our_folder: Path, tofu: Path, work: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    out = work / "eval"
    out.mkdir(exist_ok=True)
    max_new_tokens = TOFU_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    settings = {"ou_commit": _commit(checkout), "tofu": str(args.tofu.resolve()), "rows": args.rows,
                "max_new_tokens": max_new_tokens, "batch_size": args.batch_size, "cpu": common.cpu_model()}
    theirs = _reused_ou_eval(out / "ou_result.json", settings) if args.reuse_ou else None
    if theirs is None:
        if args.reuse_ou:
            print(f"--reuse-ou: no earlier open-unlearning evaluation with {settings} in {out}; running it",
                  file=sys.stderr)
        theirs = run_ou_eval(ou_python, checkout, legacy, tofu, out, args.batch_size, max_new_tokens)
        _write({"settings": settings, "result": theirs}, out / "ou_result.json")
    entry: dict[str, Any] = {"open_unlearning": theirs}
    ou_file = json.loads(Path(theirs["eval_file"]).read_text())
    for compat in args.compat_flags:
        name = "ours_compat" if compat else "ours"
        ours = run_our_eval(our_folder, tofu, out, compat, max_new_tokens)
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


# ----- the MUSE workload -------------------------------------------------------------------------------
#: The metrics of the MUSE workload, given to both sides: open-unlearning's default list (its
#: configs/eval/muse.yaml: knowmem and verbmem ROUGE, privleak, extraction_strength) plus those that file
#: lists commented out which we have too and which need nothing but the local files (exact memorisation on
#: the verbmem continuations, the LOSS / zlib / Min-K% / Min-K%++ attacks on the privleak chunks). Left
#: out: mia_reference (a reference model), mia_gradnorm (a backward pass per 2048-token chunk),
#: forget_gibberish (a classifier from the Hub, and not a metric of ours).
MUSE_METRICS = ["forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak",
                "extraction_strength", "exact_memorization", "mia_min_k", "mia_loss", "mia_zlib",
                "mia_min_k_plus_plus"]
#: How the knowmem questions are put to the model: ``tags``, MUSE's base-model prompt (``Question: q\nAnswer: a``
#: per in-context example, open-unlearning's model config Llama-2-7b-hf, which its MUSE experiment uses), or
#: ``chat``, the model's chat template with the examples as earlier turns (the TOFU workload's model config).
MUSE_TEMPLATES = ("tags", "chat")
TEMPLATE_TAGS = ("user_start_tag", "user_end_tag", "asst_start_tag", "asst_end_tag")


def _hydra_value(value: Any) -> str:
    """``value`` as a Hydra override value (strings quoted, so newlines and spaces pass through an argv entry)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        if any(c in value for c in "'\\$"):
            raise ValueError(f"{value!r}: quotes, backslashes and $ are not passed as Hydra values here")
        return f"'{value}'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    raise TypeError(f"no Hydra form for {type(value).__name__} {value!r}")


def _their_datasets_by_role(datasets: dict | None) -> dict[str, dict]:
    """open-unlearning's datasets of one metric, keyed as ours are: ``main`` when there is one, else by access key."""
    items = list((datasets or {}).items())
    if len(items) == 1:
        return {"main": items[0][1]}
    return {cfg.get("access_key", name): cfg for name, cfg in items}


def muse_alignment(theirs: dict, ours: dict, max_new_tokens: int | None = None
                   ) -> tuple[list[str], list[str], dict[str, dict]]:
    """The overrides that give our MUSE metrics open-unlearning's settings where only a setting differs.

    ``theirs``, ``ours``: each side's ``eval.muse.metrics``, composed and resolved. Compared, per metric
    present on both sides (and per ``pre_compute`` metric inside it): ``max_new_tokens`` (``max_new_tokens``
    when given: the run's cap on both sides), the stop strings (their ``stopwords``), each dataset's
    ``max_length``, privleak's ``ref_value``, ``k``, ``rouge_type`` and ``batch_size``. Returns ``(overrides for both of our
    modes, overrides for compat mode only, record)``: batch sizes go to compat mode only (they change
    rounding, not what is computed, and our default keeps its own batching); ``record`` maps each
    overridden key to ``{"ours_default", "open_unlearning", "compat_only"}``.
    """
    both: list[str] = []
    compat_only: list[str] = []
    record: dict[str, dict] = {}

    def align(key: str, our_value: Any, their_value: Any, bucket: list[str]) -> None:
        if our_value != their_value:
            bucket.append(f"{key}={_hydra_value(their_value)}")
            record[key] = {"ours_default": our_value, "open_unlearning": their_value,
                           "compat_only": bucket is compat_only}

    def walk(prefix: str, t: dict, o: dict) -> None:
        t_gen, o_gen = t.get("generation_args"), o.get("generation_args")
        if isinstance(t_gen, dict) and isinstance(o_gen, dict):
            target = max_new_tokens if max_new_tokens is not None else t_gen.get("max_new_tokens")
            align(f"{prefix}.generation_args.max_new_tokens", o_gen.get("max_new_tokens"), target, both)
            align(f"{prefix}.generation_args.stop_strings", list(o_gen.get("stop_strings") or []),
                  list(t_gen.get("stopwords") or []), both)
        t_data = _their_datasets_by_role(t.get("datasets"))
        for role, o_cfg in sorted((o.get("datasets") or {}).items()):
            t_cfg = t_data.get(role)
            if t_cfg is not None and "max_length" in t_cfg.get("args", {}):
                align(f"{prefix}.datasets.{role}.args.max_length", o_cfg.get("args", {}).get("max_length"),
                      t_cfg["args"]["max_length"], both)
        if "ref_value" in t and "ref_value" in o:
            align(f"{prefix}.ref_value", o["ref_value"], t["ref_value"], both)
            if f"{prefix}.ref_value" in record and o.get("ref_value_source") is not None:
                both.append(f"{prefix}.ref_value_source=null")  # the note would name MUSE's published AUC
        for key in ("k", "rouge_type"):  # Min-K%'s fraction, the ROUGE score reported
            if key in t and key in o:
                align(f"{prefix}.{key}", o[key], t[key], both)
        if isinstance(t.get("batch_size"), int):
            align(f"{prefix}.batch_size", o.get("batch_size"), t["batch_size"], compat_only)
        for name, t_pre in sorted((t.get("pre_compute") or {}).items()):
            o_pre = (o.get("pre_compute") or {}).get(name)
            if isinstance(t_pre, dict) and isinstance(o_pre, dict):
                walk(f"{prefix}.pre_compute.{name}", t_pre, o_pre)

    for name in sorted(set(theirs) & set(ours)):
        walk(f"eval.muse.metrics.{name}", theirs[name], ours[name])
    return both, compat_only, record


def our_template_overrides(template: str, their_template_args: dict) -> list[str]:
    """Our model's prompt settings for ``--muse-template``: ``chat`` keeps SmolLM2's chat template (as the
    TOFU workload); ``tags`` switches it off and takes open-unlearning's four tags as they are."""
    if template == "chat":
        return []
    return ["model.template_args.apply_chat_template=false",
            *[f"++model.template_args.{k}={_hydra_value(their_template_args[k])}" for k in TEMPLATE_TAGS]]


def ou_muse_model_overrides(folder: Path, template: str) -> list[str]:
    """open-unlearning's model config for the MUSE workload: ``chat`` as the TOFU workload
    (``ou_model_overrides``); ``tags`` its Llama-2-7b-hf config (MUSE's base-model prompt tags, what its
    ``experiment=eval/muse/default`` uses) pointed at the converted folder, fp32 and sdpa."""
    if template == "chat":
        return ou_model_overrides(folder)
    return ["model=Llama-2-7b-hf", f"model.model_args.pretrained_model_name_or_path={folder}",
            f"model.tokenizer_args.pretrained_model_name_or_path={folder}", "model.model_args.torch_dtype=float32",
            "model.model_args.attn_implementation=sdpa"]


def _metrics_override(group: str, package: str, metrics: list[str]) -> str:
    return f"{group}@{package}=[{','.join(metrics)}]"


_OU_CONFIG_SNIPPET = """
import json, sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
with initialize_config_dir(config_dir=sys.argv[1], version_base=None):
    cfg = compose(config_name="eval.yaml", overrides=sys.argv[3:])
with open(sys.argv[2], "w") as f:
    json.dump({"metrics": OmegaConf.to_container(cfg.eval.muse.metrics, resolve=True),
               "template_args": OmegaConf.to_container(cfg.model.template_args, resolve=True)}, f)
"""


def ou_muse_config(ou_python: Path, checkout: Path, overrides: list[str]) -> dict[str, Any]:
    """open-unlearning's composed MUSE config for ``overrides``: ``{"metrics": eval.muse.metrics,
    "template_args": model.template_args}`` (Hydra's compose in its venv; nothing of its code runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "config.json"
        result = subprocess.run([str(ou_python), "-c", _OU_CONFIG_SNIPPET, str(checkout / "configs"), str(out),
                                 *overrides], env=_env(), cwd=checkout, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"open-unlearning's config did not compose with {overrides}:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def our_muse_config(overrides: list[str]) -> dict[str, Any]:
    """Our composed ``eval.muse.metrics`` for ``overrides`` (default mode), resolved."""
    from omegaconf import OmegaConf

    cfg = common.compose("eval.yaml", overrides)
    return OmegaConf.to_container(cfg.eval.muse.metrics, resolve=True)


def run_ou_muse(ou_python: Path, checkout: Path, muse: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    timings = out / "ou_timings.json"
    cmd = [str(ou_python), str(DRIVER), "--checkout", str(checkout), "--muse", str(muse), "--timings", str(timings),
           "eval", *overrides, "model.model_args.device_map=cpu", "eval.muse.overwrite=true", "task_name=vs_ours",
           f"paths.output_dir={out / 'ou'}"]
    wall = _timed(cmd, checkout, out / "ou_eval.log")
    return {"wall_s": wall, **json.loads(timings.read_text()), "eval_file": str(out / "ou" / "MUSE_EVAL.json"),
            "overrides": overrides}


def run_our_muse(muse: Path, out: Path, compat: bool, overrides: list[str]) -> dict[str, Any]:
    name = "ours_compat" if compat else "ours"
    cmd = [sys.executable, "src/eval.py", "--config-name=eval.yaml", *overrides, "eval.muse.overwrite=true",
           f"paths.output_dir={out / name}", *_compat_overrides(compat)]
    wall = _timed(cmd, REPO, out / f"{name}_eval.log")
    return {"wall_s": wall, "eval_file": str(out / name / "MUSE_EVAL.json"), "overrides": overrides}


def muse_workload(ou_python: Path, checkout: Path, legacy: Path, our_folder: Path, muse: Path, work: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    r"""open-unlearning's MUSE-News evaluation against ours, on the local copy (``--muse``, ``--rows``).

    open-unlearning runs as published (``eval=muse``, its metric configs untouched) except for three
    things: the model (the converted SmolLM2 folder, fp32, sdpa, on the CPU; ``--muse-template`` picks its
    prompt config), the data loader (``ou_driver.py``: muse-bench/MUSE-News read from the local files), and
    the metric list (``MUSE_METRICS``: its default list plus the metrics it ships commented out that both
    sides have). ``--max-new-tokens N``, when given, caps every generation at N tokens on both sides.

    Our side gets the same metric list, and is given open-unlearning's value wherever the two differ in a
    setting only (``muse_alignment`` reads both composed configs and overrides ours; the JSON's ``aligned``
    lists every key, both values, and whether it applies to compat mode only). With open-unlearning at
    d3d7cf9 and our configs of this writing, that is:

    - ``forget_verbmem_ROUGE``'s ``datasets.main.args.max_length``: 2048 (ours 128). Open-unlearning's
      ground truth is the whole continuation, ours its first 128 tokens; on the local copy every
      continuation is shorter than 128 tokens, so this changes nothing there, but the ground truth is
      then the same by construction;
    - the knowmem datasets' ``max_length``: 512 (ours 1024): the budget of prompt plus answer, which no
      knowmem prompt (10 in-context examples, under 450 tokens) reaches on either side;
    - ``privleak.ref_value``: 0.5 (ours MUSE's published retrained-model AUC, 0.5228 for News): with no
      retain model's logs, both compare with the same reference AUC (and our note's source is dropped);
    - in compat mode only, every ``batch_size`` (generation: 16 for knowmem, 8 for verbmem, where ours is
      ``auto``): compat mode's dataset-order batches then hold the same rows, padded the same way, so
      greedy decoding rounds the same;
    - with ``--muse-template tags``, our chat template is switched off and open-unlearning's Question/Answer
      tags are passed explicitly (they equal our defaults);
    - with ``--max-new-tokens``, the three ROUGE metrics' ``max_new_tokens`` on both sides.

    Already equal, so not overridden (but compared on every run): the stop strings (``"\n\n"``,
    ``"\nQuestion"``, ``"Question:"``), 32 / 128 new tokens, the membership chunks' ``max_length`` (2048),
    Min-K%'s ``k`` (0.4), ROUGE-L F1; and, by the model settings, fp32 and greedy decoding. Per-sample
    numbers of the membership attacks (the ``forget`` / ``holdout`` chunk scores) are compared too.

    What is left are differences of behaviour, not settings (measured on SmolLM2-135M-Instruct, first rows
    of the local copy): open-unlearning treats the last labelled token of every sample as an EOS and leaves
    it out of exact memorisation, extraction strength, Min-K% and Min-K%++, also on raw text (verbmem
    continuations, membership chunks), where it is a real token that we score; its zlib attack compresses
    the decoded labels, which miss the chunk's first (unlabelled) token, where ours compresses the text.
    With the chat template (``--muse-template chat``) its attention mask (``input_ids != pad id``) also hides
    the ``<|im_end|>`` closing every in-context turn, so knowmem generations differ and often run on into a
    made-up next turn. Our ROUGE records' ``input`` is the question, theirs the whole decoded prompt.
    """
    out = work / "muse"
    out.mkdir(exist_ok=True)
    model_overrides = ou_muse_model_overrides(legacy, args.muse_template)
    ou_base = [*model_overrides, "eval=muse",
               _metrics_override("eval/muse_metrics", "eval.muse.muse_metrics", MUSE_METRICS)]
    their_cfg = ou_muse_config(ou_python, checkout, ou_base)
    generation_metrics = sorted(m for m, c in their_cfg["metrics"].items() if isinstance(c.get("generation_args"), dict))
    ou_overrides = [*ou_base, *([f"eval.muse.metrics.{m}.generation_args.max_new_tokens={args.max_new_tokens}"
                                 for m in generation_metrics] if args.max_new_tokens is not None else [])]
    our_base = ["model=SmolLM2-135M-Instruct", f"model.model_args.pretrained_model_name_or_path={our_folder}",
                "eval=muse", _metrics_override("eval/muse_metrics", "eval.muse.muse_metrics", MUSE_METRICS),
                f"paths.muse_news={muse}", *our_template_overrides(args.muse_template, their_cfg["template_args"])]
    both, compat_only, aligned = muse_alignment(their_cfg["metrics"], our_muse_config(our_base), args.max_new_tokens)

    settings = {"ou_commit": _commit(checkout), "muse": str(args.muse.resolve()), "rows": args.rows,
                "max_new_tokens": args.max_new_tokens, "template": args.muse_template, "metrics": MUSE_METRICS,
                "cpu": common.cpu_model()}
    theirs = _reused_ou_eval(out / "ou_result.json", settings) if args.reuse_ou else None
    if theirs is None:
        if args.reuse_ou:
            print(f"--reuse-ou: no earlier open-unlearning MUSE evaluation with {settings} in {out}; running it",
                  file=sys.stderr)
        theirs = run_ou_muse(ou_python, checkout, muse, out, ou_overrides)
        _write({"settings": settings, "result": theirs}, out / "ou_result.json")
    entry: dict[str, Any] = {"open_unlearning": theirs, "template": args.muse_template, "metrics": MUSE_METRICS,
                             "aligned": aligned}
    ou_file = json.loads(Path(theirs["eval_file"]).read_text())
    for compat in args.compat_flags:
        name = "ours_compat" if compat else "ours"
        try:
            ours = run_our_muse(muse, out, compat, [*our_base, *both, *(compat_only if compat else [])])
        except RuntimeError as e:  # one mode failing (compat mode is being extended) leaves the other's figures
            entry[name] = {"error": str(e), "matches": False}
            continue
        ours["speedup"] = theirs["wall_s"] / ours["wall_s"]
        ours["vs_open_unlearning"] = compare_eval_files(ou_file, json.loads(Path(ours["eval_file"]).read_text()),
                                                        roles=("forget", "holdout"))
        ours["matches"] = all(m["matches"] for m in ours["vs_open_unlearning"].values())
        ours["metrics_differing"] = sorted(k for k, m in ours["vs_open_unlearning"].items() if not m["matches"])
        entry[name] = ours
    return entry


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
