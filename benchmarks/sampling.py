#!/usr/bin/env python
"""n sampled answers per prompt: ``evals.sampling.sample_answers`` against ``model.generate``; prints ONE JSON object.

    python benchmarks/sampling.py --model SmolLM2-135M-Instruct --forget-split forget01 --tofu ../shared/data/tofu
    python benchmarks/sampling.py --model tiny-random-llama --prompts 4 --num-samples 2 --max-new-tokens 4

The prompts are those the evaluation samples from: the questions of ``<forget split>_perturbed`` as the metric
``forget_Q_A_ROUGE`` builds its dataset (configs/eval.yaml with ``eval=tofu`` composed as ``src/eval.py`` does, the
dataset built by ``data.build_dataset`` with the model's ``template_args``, the prompts by
``evals.passes.generation_setup``, with the stop tokens), sorted by length
(longest first) and cut into batches of ``--prompts-per-batch`` prompts, the same batches for both methods:

- ``ours``: ``sample_answers`` (each prompt prefilled once and its KV cache repeated for its n samples; finished
  rows leave the batch), a batch being ``prompts x n`` rows;
- ``generate``: ``model.generate(input_ids=<left-padded prompts>, attention_mask, do_sample=True,
  num_return_sequences=n, temperature, top_p, top_k=0, max_new_tokens, eos_token_id=<stop ids>, pad_token_id)``
  (``top_k=0``: the whole distribution, as ours; transformers' default would keep the 50 most likely tokens),
  ``torch.manual_seed(seed + batch number)`` before each call.

Timing: ``--repeats`` rounds, each running both methods over all the batches, in alternating order (ours first
in even rounds, ``generate`` first in odd ones), so that a change of load on a shared machine hits both alike;
the figures are the medians. Each timed run follows a warm-up of its method (the first prompt, 2 new tokens).
Tokens are counted per row up to its first stop token, included; ``reproducible`` says that every round drew
the same answers (a hash of them). Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` (reset before each
run, the largest over the rounds; both methods in this process); on a CPU each timed run is a child process of
its own (this script again with ``--only <method>``), whose ``ru_maxrss`` (monotone over a process's life) is
that run's peak RSS, reported with the RSS after the model and prompts were loaded (the decoding's own share
is the difference; the largest over the rounds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts src/ on sys.path)

METHODS = ("ours", "generate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--dtype", default=None, help="model.model_args.dtype; default: the model config's")
    p.add_argument("--forget-split", default="forget01", help="the prompts: <split>_perturbed's questions")
    p.add_argument("--tofu", default=None, help="folder of TOFU JSON files (default: generated data, real sizes)")
    p.add_argument("--prompts", type=int, default=None, help="only the first N prompts of the split (default: all)")
    p.add_argument("--prompts-per-batch", type=int, default=8,
                   help="prompts per batch; a batch decodes prompts x num-samples rows (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=16, help="n, answers per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="(default: %(default)s, SamplingArgs' default; the greedy ROUGE metrics use 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds; each times both methods once, in alternating order (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run each timed run in a child process of its own (auto: on a CPU, where peak RSS needs it)")
    p.add_argument("--only", choices=METHODS, default=None, help=argparse.SUPPRESS)  # a child's one method
    p.add_argument("--out", default=None, help="also write the JSON object here (atomically)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides of eval.yaml")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("prompts_per_batch", "num_samples", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; give some of {', '.join(METHODS)}")
    return args


def methods(args: argparse.Namespace) -> list[str]:
    return [m for m in METHODS if m in args.methods.split(",")]


def build_overrides(args: argparse.Namespace, tofu: str) -> list[str]:
    return [f"model={args.model}", "eval=tofu", f"forget_split={args.forget_split}", f"paths.tofu={tofu}",
            f"paths.root_dir={common.REPO}", "eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_Q_A_ROUGE]",
            *common.model_overrides(args), *args.overrides]


class Workload:
    """The model, its prompts as the evaluation builds them, their batches and stop tokens."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from data import build_dataset
        from evals import passes
        from model import get_model

        self.args = args
        self.tofu = str(Path(args.tofu).resolve() if args.tofu else common.default_tofu_dir())
        cfg = common.compose("eval.yaml", build_overrides(args, self.tofu))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.tokenizer = get_model(cfg.model)
        self.model = model.to(device).eval()
        template_args = cfg.model.get("template_args")
        dataset = build_dataset(cfg.eval.tofu.metrics.forget_Q_A_ROUGE.datasets.main, self.tokenizer, template_args)
        prompts, _, self.stop_ids = passes.generation_setup(dataset, self.tokenizer, template_args, [])
        indices = sorted(prompts)[:args.prompts]
        self.prompts = {i: prompts[i] for i in indices}
        ordered = sorted(indices, key=lambda i: len(self.prompts[i]), reverse=True)  # as generation_pass
        self.batches = [ordered[k:k + args.prompts_per_batch] for k in range(0, len(ordered), args.prompts_per_batch)]

    def describe(self) -> dict[str, Any]:
        lengths = [len(self.prompts[i]) for batch in self.batches for i in batch]
        return {"tofu": self.tofu, "dtype": str(next(self.model.parameters()).dtype), "prompts": len(lengths),
                "prompt_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "min": min(lengths),
                                  "max": max(lengths)},
                "stop_ids": list(self.stop_ids), "batches": len(self.batches)}

    def run(self, method: str, batches: list[list[int]] | None = None,
            max_new_tokens: int | None = None) -> list[list[int]]:
        """Every answer's tokens (up to its first stop token, included), batch after batch (``batches``: those
        only; default all; ``max_new_tokens``: default ``--max-new-tokens``)."""
        batches = self.batches if batches is None else batches
        limit = self.args.max_new_tokens if max_new_tokens is None else max_new_tokens
        return self.ours(batches, limit) if method == "ours" else self.generate(batches, limit)

    def ours(self, batches: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from evals.sampling import SamplingArgs, sample_answers

        a = self.args
        sampling = SamplingArgs(num_samples=a.num_samples, temperature=a.temperature, top_p=a.top_p,
                                max_new_tokens=max_new_tokens, seed=a.seed)
        rows: list[list[int]] = []
        for batch in batches:
            for answers in sample_answers(self.model, [self.prompts[i] for i in batch], batch, sampling, self.stop_ids):
                rows.extend(answers)
        return rows

    def generate(self, batches: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

        from data.collators import pad_sequences

        a, device, stop = self.args, next(self.model.parameters()).device, set(self.stop_ids)
        rows: list[list[int]] = []
        with torch.no_grad():
            for number, batch in enumerate(batches):
                prompts = [self.prompts[i] for i in batch]
                ids = pad_sequences(prompts, self.tokenizer.pad_token_id, "left").to(device)
                mask = pad_sequences([torch.ones_like(p) for p in prompts], 0, "left").to(device)
                torch.manual_seed(a.seed + number)
                out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                          num_return_sequences=a.num_samples, temperature=a.temperature,
                                          top_p=a.top_p, top_k=0, max_new_tokens=max_new_tokens,
                                          eos_token_id=list(self.stop_ids), pad_token_id=self.tokenizer.pad_token_id)
                for row in out[:, ids.shape[1]:].tolist():
                    rows.append(row[:next((k + 1 for k, t in enumerate(row) if t in stop), len(row))])
        return rows


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def timed_run(work: Workload, method: str) -> dict[str, Any]:
    """A warm-up of ``method`` (the first prompt, 2 new tokens), then one timed run over every batch: its
    seconds, answer statistics and peak memory (see the module docstring)."""
    import torch

    work.run(method, [work.batches[0][:1]], max_new_tokens=2)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    common.synchronize()
    t = time.perf_counter()
    rows = work.run(method)
    common.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes()
    stops = set(work.stop_ids)
    print(f"{method}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return {"seconds": seconds, "rows": len(rows), "generated_tokens": sum(len(r) for r in rows),
            "stopped": sum(1 for r in rows if r and r[-1] in stops), "distinct_answers": len({tuple(r) for r in rows}),
            "answers_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
            "peak_memory_bytes": peak, "memory_before_decoding_bytes": base}


def summarize(runs: list[dict[str, Any]], cuda: bool, isolate: bool) -> dict[str, Any]:
    """A method's figures over its rounds: median seconds, tokens per second, the largest peak memory."""
    median = statistics.median(r["seconds"] for r in runs)
    last = runs[-1]
    peak = max(runs, key=lambda r: r["peak_memory_bytes"])
    return {
        "median_s": round(median, 3),
        "seconds": [round(r["seconds"], 3) for r in runs],
        "rows": last["rows"],
        "generated_tokens": last["generated_tokens"],
        "tokens_per_s": round(last["generated_tokens"] / median, 1),
        "mean_generated_length": round(last["generated_tokens"] / last["rows"], 2),
        "stopped_fraction": round(last["stopped"] / last["rows"], 3),
        "distinct_answers": last["distinct_answers"],
        "reproducible": len({r["answers_sha256"] for r in runs}) == 1,  # every round drew the same answers
        "answers_sha256": last["answers_sha256"],
        "peak_memory_bytes": peak["peak_memory_bytes"],
        "memory_before_decoding_bytes": peak["memory_before_decoding_bytes"],
        "decoding_memory_bytes": peak["peak_memory_bytes"] - peak["memory_before_decoding_bytes"],
        # without child processes on a CPU, the peak RSS is the process's so far (both methods, every round)
        "peak_memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss" if isolate else "shared_process_peak_rss",
    }


def child(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """One timed run of ``method`` in a fresh process (this script with ``--only``): its own peak RSS."""
    argv = [sys.executable, str(Path(__file__).resolve()), *strip_out(args.argv), "--only", method]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: the child process failed with exit code {proc.returncode} (its log is above)")
    return json.loads(proc.stdout)


def strip_out(argv: list[str]) -> list[str]:
    """The command line without ``--out`` (a child prints its result; the parent writes the file)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    common.set_offline_env()
    wall = common.Stopwatch()
    torch.manual_seed(args.seed)
    if args.only:  # a child: one timed run of one method, and the workload's shape
        work = Workload(args)
        return {"workload": work.describe(), "result": timed_run(work, args.only)}
    cuda = torch.cuda.is_available()
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not cuda)
    work = None if isolate else Workload(args)
    workload: dict[str, Any] = {} if work is None else work.describe()
    chosen = methods(args)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in chosen}
    for round_number in range(args.repeats):
        for method in chosen if round_number % 2 == 0 else chosen[::-1]:
            if isolate:
                done = child(args, method)
                workload = done["workload"]
                runs[method].append(done["result"])
            else:
                runs[method].append(timed_run(work, method))
    results = {m: summarize(r, cuda, isolate) for m, r in runs.items()}
    out = {
        "benchmark": "sampling",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *args.argv]),
        "device": "cuda" if cuda else "cpu",
        "model": args.model,
        "model_path": args.model_path,
        "forget_split": args.forget_split,
        **workload,
        "n": args.num_samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "prompts_per_batch": args.prompts_per_batch,
        "rows_per_batch": args.prompts_per_batch * args.num_samples,
        "repeats": args.repeats,
        "isolated_processes": isolate,
        "methods": results,
    }
    if set(results) == set(METHODS):
        ours, gen = results["ours"], results["generate"]
        out["speedup"] = round(gen["median_s"] / ours["median_s"], 3)
        out["memory_ratio"] = round(ours["peak_memory_bytes"] / gen["peak_memory_bytes"], 3)
        out["decoding_memory_ratio"] = round(ours["decoding_memory_bytes"] / max(gen["decoding_memory_bytes"], 1), 3)
    out["wall_s"] = round(wall(), 2)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with common.stdout_to_stderr():
        res = run(args)
    common.emit(res, None if args.only else args.out)


if __name__ == "__main__":
    main()
