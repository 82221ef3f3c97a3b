#!/usr/bin/env python
"""Host-side cost of one unlearning step: the same layers as a real model, widths too small to compute.

    python benchmarks/host_overhead.py --arch Llama-3.2-1B-arch --method GradDiff
    python benchmarks/host_overhead.py --arch Llama-3.2-1B-arch --method GradDiff trainer.args.joint_forward=true

The issue's reference GradDiff step of a 1B model on an H100 takes ~300 ms for ~10 ms of arithmetic:
small-model steps are bound by how fast the host (Python, the dispatcher, the autograd engine)
queues kernels, not by the GPU. That cost depends on the model's structure (layers, operations per
layer) and on the training code, not on the widths, so it can be measured on any machine: this
script builds a randomly initialised model with the layer structure of ``configs/model/<arch>.yaml``
(its ``random_init.config``: layer count, attention and MLP kinds, RoPE, tied embeddings) but
hidden size 64, two attention heads and a 512-token vocabulary, feeds it short random rows (12 to 23
tokens, the first 6 a masked prompt) through the method's real Trainer (``load_trainer``, the
project's collator, the ``trainer.args`` of ``configs/trainer/finetune.yaml``), and times the steps. On a CPU
each kernel then runs in microseconds, so the step time is the host's share: what a GPU step
cannot go below unless the kernels are fused or captured. Compare training knobs with it (e.g.
``trainer.args.joint_forward=true``); ``train_throughput.py`` measures real sizes.

Prints one JSON object: ``median_step_ms`` / ``mean_step_ms`` over the timed steps, ``per_step_ms``,
the layer count and parameter count of the skeleton model, the method and its arguments.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts src/ on sys.path)
from train_throughput import make_timer_callback  # noqa: E402

#: Widths of the skeleton model: small enough that every kernel takes microseconds on a CPU.
SKELETON = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 32, "vocab_size": 512}
PROMPT_TOKENS = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="Llama-3.2-1B-arch",
                   help="configs/model/<name>.yaml with a random_init.config (default: %(default)s)")
    p.add_argument("--method", default="GradDiff", help="a registered trainer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="forget rows per step; retain the same (default: 8)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1: kernels this small "
                   "do not gain from more, and the host's own work is single-threaded)")
    p.add_argument("--out", default=None, help="also write the JSON object here (atomically)")
    p.add_argument("overrides", nargs="*", help="trainer.method_args.<k>=<v> or trainer.args.<k>=<v>")
    return p.parse_args(argv)


def skeleton_config(arch: str) -> dict[str, Any]:
    """The ``random_init.config`` of ``configs/model/<arch>.yaml`` with the widths of ``SKELETON``."""
    from omegaconf import OmegaConf

    path = common.CONFIGS / "model" / f"{arch}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (common.CONFIGS / "model").glob("*.yaml")
                       if "random_init" in OmegaConf.load(p))
        raise SystemExit(f"--arch {arch!r}: no {path}; architectures with a random_init config: {', '.join(names)}")
    model_cfg = OmegaConf.load(path)
    if "random_init" not in model_cfg:
        raise SystemExit(f"--arch {arch!r} has no random_init.config (a model with weights to load)")
    config = OmegaConf.to_container(model_cfg.random_init.config, resolve=True)
    config.update(SKELETON)
    if isinstance(config.get("rope_scaling"), dict):
        config["rope_scaling"] = dict(config["rope_scaling"])
    return config


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``trainer.method_args.k=v`` / ``trainer.args.k=v`` into two dicts (values parsed as YAML scalars)."""
    import yaml

    method_args: dict[str, Any] = {}
    trainer_args: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.removeprefix("+")  # Hydra's "add a key" prefix, accepted as in train_throughput.py
        target = (method_args if key.startswith("trainer.method_args.") else
                  trainer_args if key.startswith("trainer.args.") else None)
        if not sep or target is None:
            raise SystemExit(f"override {item!r}: expected trainer.method_args.<key>=<value> or "
                             "trainer.args.<key>=<value>")
        target[key.rsplit(".", 1)[1]] = yaml.safe_load(value)
    return method_args, trainer_args


def default_trainer_args() -> dict[str, Any]:
    """``trainer.args`` of ``configs/trainer/finetune.yaml`` (the defaults every trainer config builds on)."""
    from omegaconf import OmegaConf

    args = OmegaConf.load(common.CONFIGS / "trainer" / "finetune.yaml").args
    args.seed = 0
    return OmegaConf.to_container(args, resolve=True)


def random_rows(n: int, seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 12 + (i * 7) % 12
        ids = torch.randint(1, SKELETON["vocab_size"], (length,), generator=gen)
        labels = ids.clone()
        labels[:PROMPT_TOKENS] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(length, dtype=torch.long),
                     "index": i})
    return rows


def run(args: argparse.Namespace) -> dict:
    common.set_offline_env()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from data.collators import DataCollatorForSupervisedDataset
    from data.unlearn import ForgetRetainDataset
    from trainer import load_trainer

    torch.set_num_threads(args.threads)
    set_seed(0)
    config = skeleton_config(args.arch)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation="sdpa")
    method_args, trainer_args = parse_overrides(args.overrides)
    n_rows = args.batch_size * (args.warmup_steps + args.steps)
    forget = random_rows(n_rows, seed=1)
    retain = None if args.method in ("GradAscent", "CEU", "TaskVector") else random_rows(n_rows, seed=2)
    if args.method in ("DPO", "IdkNLL", "AltPO"):
        alternates = random_rows(n_rows, seed=3)
        forget = [{"original": f, "alternate": a} for f, a in zip(forget, alternates)]
    steps = args.warmup_steps + args.steps
    trainer_cfg = {"handler": args.method, "method_args": method_args,
                   "args": {**default_trainer_args(), "per_device_train_batch_size": args.batch_size,
                            "gradient_accumulation_steps": 1, "max_steps": steps, "save_strategy": "no",
                            "eval_strategy": "no", "disable_tqdm": True, **trainer_args}}

    workdir = tempfile.mkdtemp(prefix="bench_host_")
    try:
        trainer = load_trainer(trainer_cfg, model, train_dataset=ForgetRetainDataset(forget, retain),
                               data_collator=DataCollatorForSupervisedDataset(_PadId()),
                               output_dir=str(Path(workdir) / "run"))
        stamps = make_timer_callback(args.warmup_steps, steps)  # host times: no synchronisation per step
        trainer.add_callback(stamps)
        with common.stdout_to_stderr():
            trainer.train()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_step = [b - a for a, b in zip(stamps.stamps, stamps.stamps[1:])][args.warmup_steps - 1:]
    ordered = sorted(per_step)
    return {
        "benchmark": "host_overhead",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "arch": args.arch,
        "skeleton_config": config,
        "layers": config.get("num_hidden_layers"),
        "params": sum(p.numel() for p in model.parameters()),
        "method": args.method,
        "method_args": method_args,
        "trainer_args": trainer_args,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "timed_steps": len(per_step),
        "median_step_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "mean_step_ms": round(1000 * sum(per_step) / len(per_step), 2),
        "per_step_ms": [round(1000 * s, 2) for s in per_step],
    }


class _PadId:
    pad_token_id = 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 1:
        raise SystemExit("--warmup-steps and --steps must be >= 1")
    common.emit(run(args), args.out)


if __name__ == "__main__":
    main()
