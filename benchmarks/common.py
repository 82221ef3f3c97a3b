"""Helpers shared by the benchmark scripts (machine facts, peak memory, JSON output, config composition).

Not a package: each script puts ``benchmarks/`` (its own folder, automatically), ``src/`` and ``scripts/``
(for ``synthetic_tofu``, the generated TOFU-format data) on ``sys.path`` itself, so the scripts run from a bare
checkout without installing anything.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SCRIPTS = REPO / "scripts"
CONFIGS = REPO / "configs"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))

#: Default generated TOFU-format data: 400 authors x 10 QA = the real TOFU sizes (full 4000, forget10
#: 400, retain90 3600, forget01 40, holdout01 40; only real_authors / world_facts are smaller).
GEN_AUTHORS, GEN_QA = 400, 10


def set_offline_env() -> None:
    """Benchmarks never reach the Hub (a stray call fails at once instead of hanging)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    for pkg in ("accelerate", "datasets", "hydra", "omegaconf"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, Any]:
    """CUDA max allocated (when a GPU is used) and the process's peak RSS, in GiB."""
    import torch

    out: dict[str, Any] = {
        # Linux reports ru_maxrss in KiB
        "cpu_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    if torch.cuda.is_available():
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


def add_model_args(parser: Any) -> None:
    """The model options both scripts take: --model, --model-path, --tokenizer."""
    parser.add_argument("--model", default="tiny-random-llama",
                        help="a configs/model/<name>.yaml (default: %(default)s)")
    parser.add_argument("--model-path", default=None,
                        help="model.model_args.pretrained_model_name_or_path (weights folder); default: the config's")
    parser.add_argument("--tokenizer", default=None,
                        help="model.tokenizer_args.pretrained_model_name_or_path (e.g. a saved tokenizer folder)")


def model_overrides(args: Any) -> list[str]:
    """Hydra overrides for --model-path, --tokenizer and --dtype (those given)."""
    out = []
    if args.model_path:
        out.append(f"model.model_args.pretrained_model_name_or_path={args.model_path}")
    if args.tokenizer:
        out.append(f"model.tokenizer_args.pretrained_model_name_or_path={args.tokenizer}")
    if args.dtype:
        out.append(f"model.model_args.dtype={args.dtype}")
    return out


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as JSON at ``path`` (anything else as its text), whole or not at all (``run_folder.write_atomic``)."""
    from run_folder import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), json.dumps(payload, indent=2, default=str) + "\n")


def emit(payload: dict, out: str | None, stdout: Any = None) -> None:
    """Print the result as ONE JSON object (to the real stdout) and write it to ``out`` if given."""
    if out:
        write_json_atomic(out, payload)
    stream = stdout or sys.__stdout__
    stream.write(json.dumps(payload, default=str) + "\n")
    stream.flush()


def default_tofu_dir() -> Path:
    """``../shared/data/tofu`` is the real TOFU copy on the project's machines; benchmarks default to a
    generated copy of the same sizes (the same data on every machine, the GPU machine included)."""
    folder = REPO / "saves" / "bench" / f"tofu_generated_{GEN_AUTHORS}x{GEN_QA}"
    if not (folder / "idontknow.jsonl").is_file():
        from synthetic_tofu import generate_tofu_like

        generate_tofu_like(folder, n_authors=GEN_AUTHORS, qa_per_author=GEN_QA, seed=0)
    return folder


def compose(config_name: str, overrides: Sequence[str]) -> Any:
    """The run config exactly as ``python src/<script>.py --config-name=<config_name> <overrides>`` builds it
    (dataset and PEFT names composed, ``resolvers.compose_names``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from resolvers import command_line_overrides, compose_names, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose_names(hydra_compose(config_name=config_name, overrides=command_line_overrides(overrides)))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the one JSON object: library prints (trainer logs, summaries) go to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
