#!/usr/bin/env python
"""Unlearning throughput: warm-up steps, then timed optimizer steps of a method; prints ONE JSON object.

    python benchmarks/train_throughput.py --model tiny-random-llama --method GradDiff \
        --batch-size 4 --warmup-steps 2 --steps 3
    python benchmarks/train_throughput.py --model Llama-3.2-1B-arch --method NPO --batch-size 8 \
        --warmup-steps 5 --steps 100 --peak-tflops 989 --out saves/bench/npo.json

The run is built as ``src/train.py --config-name=unlearn.yaml`` builds it (the same config
composition, ``get_model``, ``get_data``, ``get_collator``, ``load_trainer``) and trained by the
method's own Trainer loop with ``max_steps = warmup + steps``; a callback timestamps every
``on_step_end`` (after a CUDA synchronisation). Reported: the timed window's mean seconds/step and
steps/s, padded tokens/s (forget + retain ``input_ids`` of each step, padding included), real
(attended) tokens/s, peak memory, MFU when ``--peak-tflops`` is given (6 * N * tokens/step *
steps/s / peak FLOP/s, N = parameter count) and the loss of the first 20 steps (logged every step)
so that two implementations can be checked for equal results.

Data: TOFU-format JSON files from ``--tofu`` (default: a generated copy with the real TOFU sizes,
made once under saves/bench/), or with ``--synthetic-seq-len N`` random token batches of exactly N
tokens for forget and retain (the first quarter of each is the prompt, masked out of the loss).
Extra Hydra overrides may follow the options (e.g. ``trainer.method_args.layer_id=1``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts src/ on sys.path)

# Forget dataset family per method (the rest use the plain QA split); methods trained without retain set.
FORGET_KIND = {"DPO": "IDK", "IdkNLL": "IDK", "AltPO": "ALT"}
NO_RETAIN = {"GradAscent", "CEU", "TaskVector"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--method", default="GradDiff", help="a registered trainer (configs/trainer/<name>.yaml)")
    p.add_argument("--batch-size", type=int, default=8, help="per-device forget batch (retain batch is the same)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps (default: %(default)s)")
    p.add_argument("--forget-split", default="forget10", help="TOFU forget split (retain = the complement)")
    p.add_argument("--forget", default=None, help="data.forget dataset name (default: from --forget-split/--method)")
    p.add_argument("--retain", default=None, help="data.retain dataset name, or 'null' (default: the complement)")
    p.add_argument("--tofu", default=None, help="folder of TOFU JSON files (default: generated data, real sizes)")
    p.add_argument("--synthetic-seq-len", "--seq-len", dest="synthetic_seq_len", type=int, default=None,
                   help="random token batches of exactly N tokens for forget and retain instead of TOFU data")
    p.add_argument("--max-length", type=int, default=None, help="data.dataset_args.max_length (truncation)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="model.model_args.dtype (float32, bfloat16, ...); default: config's")
    p.add_argument("--bf16", choices=("true", "false"), default=None,
                   help="trainer.args.bf16 autocast (default: the trainer config's; always off without a GPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak dense bf16 TFLOP/s for MFU (H100 SXM: 989; H200: 989)")
    p.add_argument("--loss-steps", type=int, default=20, help="log the loss of the first N steps (default: 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON object here (atomically)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides of unlearn.yaml")
    return p.parse_args(argv)


def split_names(args: argparse.Namespace) -> tuple[str, str | None]:
    pct = int(args.forget_split.removeprefix("forget"))
    kind = FORGET_KIND.get(args.method)
    forget = args.forget or f"TOFU_QA_FORGET{pct:02d}" + (f"_{kind}" if kind else "")
    retain = args.retain or (None if args.method in NO_RETAIN else f"TOFU_QA_RETAIN{100 - pct:02d}")
    if retain in ("null", "none", "None"):
        retain = None
    return forget, retain


def build_overrides(args: argparse.Namespace, tofu: str | None, output_dir: str) -> list[str]:
    forget, retain = split_names(args)
    o = [
        f"model={args.model}",
        f"trainer={args.method}",
        f"data.forget={forget}",
        f"data.retain={retain if retain else 'null'}",
        "data.eval=null",
        f"paths.root_dir={common.REPO}",
        f"paths.output_dir={output_dir}",
        f"seed={args.seed}",
        f"trainer.args.per_device_train_batch_size={args.batch_size}",
        f"trainer.args.gradient_accumulation_steps={args.grad_accum}",
        f"trainer.args.max_steps={args.warmup_steps + args.steps}",
        "trainer.args.save_strategy=no",
        "trainer.args.eval_strategy=no",
        "trainer.args.eval_on_start=false",
        "trainer.args.report_to=none",
        "trainer.args.disable_tqdm=true",
    ]
    if tofu:
        o.append(f"paths.tofu={tofu}")
    o += common.model_overrides(args)
    if args.bf16 is not None:
        o += [f"trainer.args.bf16={args.bf16}", f"trainer.args.bf16_full_eval={args.bf16}"]
    if args.max_length:
        o.append(f"data.dataset_args.max_length={args.max_length}")
    return o + list(args.overrides)


# ----- synthetic fixed-length data ---------------------------------------------------------------
class SyntheticQA:
    """``n`` samples of exactly ``seq_len`` random tokens; the first quarter is the (masked) prompt."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int, nested: bool = False):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n * (2 if nested else 1), seq_len), generator=g)
        self.n, self.seq_len, self.nested = n, seq_len, nested

    def _sample(self, row: int, index: int) -> dict:
        import torch

        ids = self.ids[row].clone()
        labels = ids.clone()
        labels[: max(1, self.seq_len // 4)] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "index": index}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if self.nested:  # preference methods: {"original": ..., "alternate": ...}
            return {"original": self._sample(2 * i, i), "alternate": self._sample(2 * i + 1, i)}
        return self._sample(i, i)


def synthetic_data(args: argparse.Namespace, tokenizer: Any, with_retain: bool) -> dict:
    from data import ForgetRetainDataset

    n = max(64, args.batch_size * args.grad_accum * (args.warmup_steps + args.steps))
    vocab = len(tokenizer)
    forget = SyntheticQA(n, args.synthetic_seq_len, vocab, seed=args.seed + 1, nested=args.method in FORGET_KIND)
    retain = SyntheticQA(n, args.synthetic_seq_len, vocab, seed=args.seed + 2) if with_retain else None
    return {"train": ForgetRetainDataset(forget, retain, seed=args.seed), "eval": None}


# ----- measurement -------------------------------------------------------------------------------
def _tensors(batch: Any, prefix: str = "") -> dict[str, Any]:
    """Every ``input_ids`` / ``attention_mask`` of a (nested) batch, keyed by its path (forget, retain, ...)."""
    out: dict[str, Any] = {}
    if isinstance(batch, dict):
        if "input_ids" in batch:
            out[prefix or "batch"] = batch
        else:
            for key, value in batch.items():
                out.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class CountingCollator:
    """Wraps the project's collator and records each collated batch's shapes and token counts, in order."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.records: list[dict] = []

    def __call__(self, items: list) -> Any:
        batch = self.inner(items)
        rec = {}
        for key, b in _tensors(batch).items():
            ids = b["input_ids"]
            mask = b.get("attention_mask")
            rec[key] = {"shape": list(ids.shape), "padded": int(ids.numel()),
                        "real": int(mask.sum()) if mask is not None else int(ids.numel())}
        self.records.append(rec)
        return batch

    def __getattr__(self, name: str) -> Any:  # e.g. a trainer reading collator.tokenizer
        return getattr(self.inner, name)


def make_timer_callback(warmup_steps: int, total_steps: int):
    """Timestamps every step end; the device is synchronised only where the timed window starts and ends.

    A synchronisation at every step would keep the host from queueing step k+1 while the device
    still runs step k, which is how training runs, so the per-step stamps in between are host times.
    On a GPU the warm-up steps after the first also count the synchronisations the step itself
    performs (``torch.cuda.set_sync_debug_mode``), reported as ``cuda_syncs_per_warmup_step``.
    """
    import warnings

    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t_begin: float | None = None
            self.stamps: list[float] = []
            self.cuda_syncs: list[int] = []
            self._catch: Any = None
            self._caught: list = []

        def on_train_begin(self, args, state, control, **kwargs):
            common.synchronize()
            self.t_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available() and 1 <= state.global_step < warmup_steps:
                self._catch = warnings.catch_warnings(record=True)
                self._caught = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if self._catch is not None:
                torch.cuda.set_sync_debug_mode("default")
                self._catch.__exit__(None, None, None)
                self._catch = None
                self.cuda_syncs.append(sum("synchroniz" in str(w.message) for w in self._caught))
            if state.global_step in (warmup_steps, total_steps):
                common.synchronize()
            self.stamps.append(time.perf_counter())

    return StepTimer()


def record_step_losses(trainer: Any, loss_steps: int) -> list[tuple[int, Any, dict]]:
    """Keep (step, loss, loss terms) of every training micro-step of the first ``loss_steps`` steps.

    The trainer already keeps these entries, on the device, until its next loss check
    (``FinetuneTrainer.check_finite_losses``, which returns them); the wrapper keeps the early ones.
    Reading them, or logging every step, would synchronise the device inside the timed window.
    """
    records: list[tuple[int, Any, dict]] = []
    check = trainer.check_finite_losses

    def check_finite_losses() -> list:
        checked = check()
        records.extend(entry for entry in checked if entry[0] <= loss_steps)
        return checked

    trainer.check_finite_losses = check_finite_losses
    return records


def step_losses(records: list[tuple[int, Any, dict]]) -> list[dict]:
    """Per step: ``loss`` (the sum over its micro-steps, as the Trainer logs it) and each term's mean."""
    by_step: dict[int, list[tuple[Any, dict]]] = {}
    for step, loss, terms in records:
        by_step.setdefault(step, []).append((loss, terms))
    out = []
    for step, micro in sorted(by_step.items()):
        entry = {"step": step, "loss": sum(float(loss) for loss, _ in micro)}
        for name in micro[0][1]:
            entry[name] = sum(float(terms[name]) for _, terms in micro) / len(micro)
        out.append(entry)
    return out


def drop_unknown_training_args(cfg: Any) -> list[str]:
    """Remove ``trainer.args`` keys the trainer's arguments class (``TrainingArguments`` of this transformers plus
    ours, ``trainer.arguments``) lacks when they are off anyway.

    configs/trainer/finetune.yaml sets ``activation_checkpointing: false``, a field that older
    transformers 5 releases (5.17, on the GPU machine) do not have; ``false`` is their behaviour anyway.
    A key that is switched on is left in place, so the project's own check still refuses it.
    """
    import dataclasses

    from omegaconf import open_dict

    from trainer import trainer_class

    valid = {f.name for f in dataclasses.fields(trainer_class(cfg.trainer.handler).arguments_class)}
    dropped = []
    with open_dict(cfg):
        for key in list(cfg.trainer.args):
            if key not in valid and not cfg.trainer.args[key]:
                del cfg.trainer.args[key]
                dropped.append(key)
    return dropped


def run(args: argparse.Namespace) -> dict:
    common.set_offline_env()
    wall = common.Stopwatch()
    import torch
    from omegaconf import OmegaConf
    from transformers import set_seed

    from data import get_collator, get_data
    from model import get_model
    from trainer import load_trainer

    torch.set_float32_matmul_precision("high")  # as src/train.py
    tofu = None if args.synthetic_seq_len else str(Path(args.tofu).resolve() if args.tofu else common.default_tofu_dir())
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    try:
        cfg = common.compose("unlearn.yaml", build_overrides(args, tofu, str(Path(workdir) / "run")))
        dropped_args = drop_unknown_training_args(cfg)
        set_seed(cfg.seed)
        t = common.Stopwatch()
        model, tokenizer = get_model(cfg.model)
        model_build_s = t()
        t = common.Stopwatch()
        if args.synthetic_seq_len:
            data = synthetic_data(args, tokenizer, with_retain=cfg.data.get("retain") is not None)
        else:
            data = get_data(cfg.data, cfg.mode, tokenizer, cfg.model.get("template_args"), seed=cfg.seed)
        data_build_s = t()
        collator = CountingCollator(get_collator(cfg.collator, tokenizer))
        t = common.Stopwatch()
        trainer = load_trainer(cfg.trainer, model, data["train"], data["eval"], tokenizer, collator,
                               output_dir=str(Path(workdir) / "run.incomplete"), evaluators=None)
        trainer_build_s = t()
        collator.records.clear()  # batches collated while building (e.g. NPO's reference pass) are not steps
        timer = make_timer_callback(args.warmup_steps, args.warmup_steps + args.steps)
        trainer.add_callback(timer)
        loss_records = record_step_losses(trainer, args.loss_steps)
        common.reset_peak_memory()
        t = common.Stopwatch()
        trainer.train()
        train_s = t()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    losses = step_losses(loss_records)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    n_steps = len(timer.stamps)
    if n_steps != args.warmup_steps + args.steps:
        raise RuntimeError(f"expected {args.warmup_steps + args.steps} steps, the trainer ran {n_steps}")
    start = timer.stamps[args.warmup_steps - 1] if args.warmup_steps > 0 else timer.t_begin
    window_s = timer.stamps[-1] - start
    per_step = [b - a for a, b in zip([timer.t_begin] + timer.stamps[:-1], timer.stamps)]
    ga = args.grad_accum
    recs = collator.records[args.warmup_steps * ga:(args.warmup_steps + args.steps) * ga]
    if len(recs) != args.steps * ga:
        raise RuntimeError(f"collated {len(collator.records)} batches for {n_steps} steps x {ga} accumulation")
    padded = sum(r["padded"] for rec in recs for r in rec.values())
    real = sum(r["real"] for rec in recs for r in rec.values())
    parts: dict[str, dict] = {}
    for rec in recs:
        for key, r in rec.items():
            p = parts.setdefault(key, {"rows": r["shape"][0], "seq_len_sum": 0, "seq_len_max": 0, "n": 0})
            p["seq_len_sum"] += r["shape"][1]
            p["seq_len_max"] = max(p["seq_len_max"], r["shape"][1])
            p["n"] += 1
    batch_shape = {k: {"rows": p["rows"], "mean_seq_len": round(p["seq_len_sum"] / p["n"], 1),
                       "max_seq_len": p["seq_len_max"]} for k, p in parts.items()}

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps_per_s = args.steps / window_s
    tokens_per_step = padded / args.steps
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": args.model,
        "model_path": args.model_path,
        "params": n_params,
        "trainable_params": n_trainable,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "method": args.method,
        "method_args": OmegaConf.to_container(cfg.trainer.get("method_args"), resolve=True),
        "trainer_args": {k: trainer.args.to_dict().get(k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "optim", "bf16",
            "max_grad_norm", "gradient_checkpointing", "train_sampling_strategy", "group_by_length", "nll_impl",
            "pack_rows", "joint_forward", "precompute_ref_log_probs")
            if k in trainer.args.to_dict()},
        "dropped_trainer_args": dropped_args,
        "data": ({"synthetic_seq_len": args.synthetic_seq_len} if args.synthetic_seq_len else
                 {"tofu": tofu, "forget": cfg.data.forget, "retain": cfg.data.get("retain"),
                  "forget_rows": len(data["train"])}),
        "batch_size": args.batch_size,
        "batch_shape": batch_shape,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "timed_window_s": round(window_s, 4),
        "s_per_step": round(window_s / args.steps, 5),
        "steps_per_s": round(steps_per_s, 4),
        "padded_tokens_per_step": round(tokens_per_step, 1),
        "padded_tokens_per_s": round(tokens_per_step * steps_per_s, 1),
        "real_tokens_per_s": round(real / window_s, 1),
        "padding_fraction": round(1 - real / padded, 4) if padded else None,
        "per_step_s": [round(x, 5) for x in per_step],
        "median_timed_step_s": round(sorted(per_step[args.warmup_steps:])[len(per_step[args.warmup_steps:]) // 2], 5),
        "peak_memory": common.peak_memory(),
        "peak_tflops": args.peak_tflops,
        "mfu": (round(6 * n_params * tokens_per_step * steps_per_s / (args.peak_tflops * 1e12), 5)
                if args.peak_tflops else None),
        "loss_first_steps": [entry["loss"] for entry in losses],
        "loss_terms_first_steps": losses,
        "final_logged_loss": logged[-1]["loss"] if logged else None,
        "finite": all(math.isfinite(v) for entry in losses for v in entry.values()),
        "cuda_syncs_per_warmup_step": timer.cuda_syncs if torch.cuda.is_available() else None,
        "setup_s": {"model_build": round(model_build_s, 2), "data_build": round(data_build_s, 2),
                    "trainer_build": round(trainer_build_s, 2)},
        "train_total_s": round(train_s, 3),
        "wall_s": round(wall(), 2),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        raise SystemExit("--steps must be >= 1 and --warmup-steps >= 0")
    with common.stdout_to_stderr():
        result = run(args)
    common.emit(result, args.out)


if __name__ == "__main__":
    main()
