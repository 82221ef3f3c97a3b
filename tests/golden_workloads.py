"""The workloads whose outputs are pinned in ``tests/golden/`` (as torchtune pins its recipes' losses).

Each workload runs a real entry point (``src/eval.py``'s or ``src/train.py``'s ``run``) in this process on
fixed inputs and returns a JSON-able record of everything it produced that must not change when the code
is reorganised: every metric entry of an EVAL file (per-sample values and generations included) and its
SUMMARY, or the first logged losses, loss terms and gradient norms of a few training steps with a digest
of the final weights. ``tests/test_golden.py`` compares a fresh run with the committed file; the files are
written by ``python tests/golden/regenerate.py`` (only when a change of numbers is intended).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "golden"
SHARED_DATA = REPO.parent / "shared" / "data"
MODEL_CACHE = REPO / ".cache" / "models"
for _path in (REPO / "src", REPO / "tests", REPO / "scripts"):  # scripts/: synthetic_tofu
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: Relative tolerance of every number (generations and other strings must be equal).
REL_TOL = 1e-5
#: Numbers this close to zero are compared absolutely (a log-probability difference of 1e-9 is noise).
ABS_TOL = 1e-9
#: Rows of every evaluation dataset (``eval.<bench>.limit``): the first rows of each file.
EVAL_ROWS = 4
#: Tokens of every greedy generation (the benchmarks' defaults are 200 / 128 / 32).
MAX_NEW_TOKENS = 16
#: The ``_meta`` fields that describe what was computed (the others name paths, times and code versions).
STABLE_META = ("evaluator", "passes", "plain_pass_options", "limit", "split_sizes", "warnings", "higher_is_better")

TOFU_GENERATION_METRICS = ("forget_Q_A_ROUGE", "model_utility.pre_compute.retain_Q_A_ROUGE",
                           "model_utility.pre_compute.ra_Q_A_ROUGE", "model_utility.pre_compute.wf_Q_A_ROUGE")
MUSE_GENERATION_METRICS = ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE")

#: Every unlearning method with the forget dataset it trains on (IDK and alternate answers where it needs them).
METHOD_FORGET_SETS = {
    "GradAscent": "TOFU_QA_FORGET10", "GradDiff": "TOFU_QA_FORGET10", "NPO": "TOFU_QA_FORGET10",
    "SimNPO": "TOFU_QA_FORGET10", "DPO": "TOFU_QA_FORGET10_IDK", "AltPO": "TOFU_QA_FORGET10_ALT",
    "IdkNLL": "TOFU_QA_FORGET10_IDK", "RMU": "TOFU_QA_FORGET10", "UNDIAL": "TOFU_QA_FORGET10",
    "CEU": "TOFU_QA_FORGET10", "WGA": "TOFU_QA_FORGET10", "SatImp": "TOFU_QA_FORGET10",
    "PDU": "TOFU_QA_FORGET10", "TaskVector": "TOFU_QA_FORGET10",
}
#: Settings a method needs on a 2-layer model (RMU's defaults are for 32 layers).
METHOD_OVERRIDES = {"RMU": ["trainer.method_args.layer_id=1", "trainer.method_args.steering_coeff=2"],
                    "PDU": ["trainer.method_args.retain_loss_eps=10.5"]}
METHOD_STEPS = 3
#: What each logged training step keeps: the loss, every loss term, the gradient norm.
STEP_KEYS_SKIPPED = ("epoch", "learning_rate", "step")


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from resolvers import command_line_overrides, compose_names, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose_names(compose(config_name=config_name, overrides=command_line_overrides(
            [*overrides, f"paths.model_cache_dir={MODEL_CACHE}"])))


def _short_generations(bench: str, metrics: Iterable[str]) -> list[str]:
    return [f"eval.{bench}.metrics.{m}.generation_args.max_new_tokens={MAX_NEW_TOKENS}" for m in metrics]


def _eval_record(out: Path, name: str) -> dict[str, Any]:
    logs = json.loads((out / f"{name}_EVAL.json").read_text(encoding="utf-8"))
    summary = json.loads((out / f"{name}_SUMMARY.json").read_text(encoding="utf-8"))
    meta = logs.pop("_meta")
    return {"summary": summary, "eval": logs, "meta": {k: meta.get(k) for k in STABLE_META}}


def _evaluate(out: Path, overrides: list[str], name: str) -> dict[str, Any]:
    import eval as eval_script

    eval_script.run(_compose("eval.yaml", [*overrides, f"paths.output_dir={out}"]))
    return _eval_record(out, name)


def tofu_smollm2(out: Path, compat: bool = False, retain_logs: Path | None = None) -> dict[str, Any]:
    """SmolLM2-135M-Instruct on the real TOFU copy, forget01 against holdout01, the first ``EVAL_ROWS`` rows
    of every dataset, the default metric list (MIA attacks included), ``MAX_NEW_TOKENS``-token answers;
    ``compat``: ``compat=open_unlearning``; ``retain_logs``: a retain EVAL file (forget quality, privleak)."""
    overrides = ["model=SmolLM2-135M-Instruct", "eval=tofu", f"paths.tofu={SHARED_DATA / 'tofu'}",
                 "forget_split=forget01", "holdout_split=holdout01", f"eval.tofu.limit={EVAL_ROWS}",
                 *_short_generations("tofu", TOFU_GENERATION_METRICS)]
    if compat:
        overrides.append("compat=open_unlearning")
    if retain_logs is not None:
        overrides.append(f"retain_logs_path={retain_logs}")
    return _evaluate(out, overrides, "TOFU")


#: Characters kept of each MUSE text field in the subset (a 2048-token chunk costs a minute on 2 cores).
MUSE_TEXT_CHARS = 600


def muse_subset(folder: Path) -> Path:
    """A subset of the local MUSE-News copy in ``folder``: the first ``EVAL_ROWS`` rows of each evaluation file
    (every in-context example), each text field cut to its first ``MUSE_TEXT_CHARS`` characters."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((SHARED_DATA / "muse_news").glob("*.json")):
        if source.stem == "raw_forget":
            continue
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not source.stem.endswith("_icl"):
            rows = rows[:EVAL_ROWS]
        with open(folder / source.name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({k: v[:MUSE_TEXT_CHARS] if k in ("text", "prompt", "gt") else v
                                    for k, v in row.items()}) + "\n")
    return folder


def muse_smollm2(out: Path, data: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct on ``data`` (``muse_subset``), the default metric list, ``MAX_NEW_TOKENS``-token
    generations, privleak against MUSE's published AUC."""
    overrides = ["model=SmolLM2-135M-Instruct", "eval=muse", f"paths.muse_news={data}",
                 f"eval.muse.limit={EVAL_ROWS}", *_short_generations("muse", MUSE_GENERATION_METRICS)]
    return _evaluate(out, overrides, "MUSE")


def weights_digest(state_dict: dict[str, Any]) -> dict[str, list[float]]:
    """Per tensor: its float64 sum, its L2 norm, and its dot product with a fixed pseudo-random vector
    (seeded by the tensor's size): three numbers that move with any change of its values."""
    import torch

    digest = {}
    for name in sorted(state_dict):
        values = state_dict[name].detach().to(torch.float64).flatten().cpu()
        probe = torch.randn(values.numel(), generator=torch.Generator().manual_seed(values.numel()),
                            dtype=torch.float64)
        digest[name] = [values.sum().item(), values.norm().item(), (values @ probe).item()]
    return digest


def method_run(out: Path, method: str, tofu: Path) -> dict[str, Any]:
    """``METHOD_STEPS`` steps of ``src/train.py --config-name=unlearn.yaml model=tiny-random-llama
    trainer=<method>`` (batch 2, every other setting the method's default) on the generated TOFU-format
    data ``tofu``: the logged steps and the digest of the saved weights."""
    from safetensors.torch import load_file

    import train

    cfg = _compose("unlearn.yaml", [
        "model=tiny-random-llama", f"trainer={method}", f"data.forget={METHOD_FORGET_SETS[method]}",
        "data.retain=TOFU_QA_RETAIN90", f"paths.tofu={tofu}", f"trainer.args.max_steps={METHOD_STEPS}",
        "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
        "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true", "trainer.args.report_to=none",
        *METHOD_OVERRIDES.get(method, []), f"paths.output_dir={out}"])
    train.run(cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [{k: v for k, v in entry.items() if k not in STEP_KEYS_SKIPPED} for entry in log if "loss" in entry]
    return {"steps": steps, "weights": weights_digest(load_file(str(out / "model.safetensors")))}


def method_data(folder: Path) -> Path:
    """The generated TOFU-format data the method runs train on (20 authors x 4 QA, seed 0), with an
    alternate-answers file for AltPO: each forget row's perturbed answers."""
    from synthetic_tofu import generate_tofu_like

    generate_tofu_like(folder, n_authors=20, qa_per_author=4, seed=0)
    perturbed = [json.loads(line) for line in (folder / "forget10_perturbed.json").read_text().splitlines()]
    rows = [json.loads(line) for line in (folder / "forget10.json").read_text().splitlines()]
    with open(folder / "forget10_alternate.json", "w", encoding="utf-8") as f:
        for row, pert in zip(rows, perturbed, strict=True):
            f.write(json.dumps({**row, "alternate_answer": pert["perturbed_answer"][:2]}) + "\n")
    return folder


def as_eval_file(record: dict[str, Any], path: Path) -> Path:
    """``record`` (a golden evaluation) written back as the EVAL file it came from, for ``retain_logs_path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record["eval"], "_meta": record["meta"]}), encoding="utf-8")
    return path


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def load_golden(name: str) -> Any:
    return json.loads(golden_path(name).read_text(encoding="utf-8"))


def write_golden(name: str, record: Any) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=True) + "\n"
    tmp = golden_path(name).with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, golden_path(name))


def differences(expected: Any, actual: Any, where: str = "", rel_tol: float = REL_TOL,
                limit: int = 20) -> list[str]:
    """Where ``actual`` differs from ``expected``: other keys or lengths, other strings, booleans or None,
    numbers further apart than ``rel_tol`` relative (NaN equals NaN). At most ``limit`` lines."""
    found: list[str] = []

    def walk(a: Any, b: Any, at: str) -> None:
        if len(found) >= limit:
            return
        here = at or "<root>"
        if isinstance(a, dict) and isinstance(b, dict):
            if set(a) != set(b):
                found.append(f"{here}: keys only in golden {sorted(set(a) - set(b))}, only now {sorted(set(b) - set(a))}")
            for key in sorted(set(a) & set(b), key=str):
                walk(a[key], b[key], f"{at}.{key}" if at else str(key))
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                found.append(f"{here}: {len(a)} items in golden, {len(b)} now")
            for k, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{here}[{k}]")
        elif isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str) \
                or isinstance(b, str):
            if type(a) is not type(b) or a != b:
                found.append(f"{here}: golden {a!r}, now {b!r}")
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if not ((math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel_tol, abs_tol=ABS_TOL)):
                found.append(f"{here}: golden {a!r}, now {b!r} (relative gap {abs(a - b) / max(abs(a), abs(b)):.2e})")
        else:
            found.append(f"{here}: golden {type(a).__name__}, now {type(b).__name__}")

    walk(expected, actual, where)
    return found
