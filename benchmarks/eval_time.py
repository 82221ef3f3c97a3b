#!/usr/bin/env python
"""Wall time and peak memory of the TOFU evaluation (eval=tofu) of a model; prints ONE JSON object.

    python benchmarks/eval_time.py --model tiny-random-llama --forget-split forget01 --max-new-tokens 8
    python benchmarks/eval_time.py --model SmolLM2-135M-Instruct --forget-split forget01 \
        --holdout-split holdout01 --tofu ../shared/data/tofu --out saves/bench/eval.json

The config is composed from configs/eval.yaml exactly as ``src/eval.py --config-name=eval.yaml`` does
(same overrides), and ``src/eval.py``'s own ``run(cfg)`` evaluates it (model load, ``.cuda()``,
``get_evaluators``, ``Evaluator.evaluate``), writing into a temporary folder with ``overwrite`` on so
nothing is reused from an earlier EVAL file. This script only wraps, by monkeypatching:

- ``model.get_model`` (as imported by src/eval.py): model-load time;
- ``evals.passes.token_stats_passes`` / ``grad_norm_pass`` (teacher-forced forward passes; one
  ``token_stats_passes`` call may score several answer columns of the same questions) and
  ``generation_pass`` (greedy generation): time of each pass, each synchronised on the GPU;
- a forward pre-hook on the model and a wrapper of ``model.generate``: the number of forward calls
  actually executed in the teacher-forced passes, the number of ``model.generate`` calls (0 when our
  own greedy loop decodes) and of decoding forward calls (prefill + one per step and batch), against
  the number of (sample, answer) pairs / prompts evaluated.

``--metrics a,b`` keeps only those metrics of the default list (or selects others from
configs/eval/tofu_metrics); ``--max-new-tokens`` overrides every metric's generation length. After
each pass the partial result is written to ``--out`` (``"complete": false``), so a run killed by a
time limit still leaves its numbers.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts src/ on sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--dtype", default=None, help="model.model_args.dtype; default: the model config's")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--holdout-split", default="holdout01")
    p.add_argument("--retain-logs-path", default=None, help="retain model's TOFU_EVAL.json (forget quality)")
    p.add_argument("--tofu", default=None, help="folder of TOFU JSON files (default: generated data, real sizes)")
    p.add_argument("--metrics", default="default",
                   help="comma-separated metric names, or 'default' (the eval=tofu list) (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every metric's max_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="override every metric's batch_size")
    p.add_argument("--decoder", choices=("greedy_decode", "generate"), default="greedy_decode",
                   help="greedy_decode: our decoding loop (finished rows leave the batch; the default); generate: "
                        "model.generate on the same length-sorted batches, to measure what the loop gains")
    p.add_argument("--out", default=None, help="also write the JSON object here (atomically)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides of eval.yaml")
    return p.parse_args(argv)


def build_overrides(args: argparse.Namespace, tofu: str, output_dir: str, metrics: list[str] | None) -> list[str]:
    o = [
        f"model={args.model}",
        "eval=tofu",
        f"forget_split={args.forget_split}",
        f"holdout_split={args.holdout_split}",
        f"retain_logs_path={args.retain_logs_path or 'null'}",
        f"paths.tofu={tofu}",
        f"paths.root_dir={common.REPO}",
        f"paths.output_dir={output_dir}",
        "task_name=bench_eval",
        "eval.tofu.overwrite=true",
    ]
    if metrics is not None:
        # the defaults entry of configs/eval/tofu.yaml, addressed with its package
        o.append(f"eval/tofu_metrics@eval.tofu.tofu_metrics=[{','.join(metrics)}]")
    o += common.model_overrides(args)
    return o + list(args.overrides)


def _override_everywhere(node: Any, fn: Any) -> None:
    """Apply ``fn`` to every metric config, pre_compute ones included."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_dict(node):
        return
    if "handler" in node:
        fn(node)
    for value in node.values():
        _override_everywhere(value, fn)


class PassRecorder:
    """Times the evaluation passes and counts the model calls made inside them."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.forward_calls = 0
        self.generate_calls = 0
        self.passes: list[dict] = []
        self.model_load_s = 0.0
        self.on_pass_end: Any = None

    # forward pre-hook: every model(...) call, including each decoding step inside generate()
    def hook(self, module: Any, args: Any, kwargs: Any = None) -> None:
        self.forward_calls += 1

    def wrap_model(self, model: Any) -> Any:
        model.register_forward_pre_hook(self.hook)
        original = model.generate

        @functools.wraps(original)
        def generate(*a: Any, **k: Any) -> Any:
            self.generate_calls += 1
            return original(*a, **k)

        model.generate = generate
        return model

    def wrap_get_model(self, get_model: Any) -> Any:
        @functools.wraps(get_model)
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            model, tokenizer = get_model(*a, **k)
            self.model_load_s += time.perf_counter() - t
            return self.wrap_model(model), tokenizer
        return timed

    @staticmethod
    def wrap_build_dataset(build: Any) -> Any:
        """Label each evaluation dataset with its file and answer key (e.g. forget01_perturbed:paraphrased_answer)."""
        @functools.wraps(build)
        def labelled(spec: Any, *a: Any, **k: Any) -> Any:
            dataset = build(spec, *a, **k)
            name = ((spec.get("args") or {}).get("hf_args") or {}).get("name")
            try:
                dataset.bench_label = f"{name}:{getattr(dataset, 'answer_key', '?')}"
            except AttributeError:
                pass
            return dataset
        return labelled

    def wrap_pass(self, kind: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(model: Any, dataset: Any, *a: Any, **k: Any) -> Any:
            common.synchronize()
            f0, g0 = self.forward_calls, self.generate_calls
            self.current = kind
            t = time.perf_counter()
            try:
                result = fn(model, dataset, *a, **k)
            finally:
                common.synchronize()
                seconds = time.perf_counter() - t
                self.current = None
            group = dataset if isinstance(dataset, (list, tuple)) else [dataset]  # token_stats_passes: several
            rec: dict[str, Any] = {
                "pass": kind,
                "dataset": "+".join(getattr(d, "bench_label", None) or getattr(d, "name", type(d).__name__)
                                    for d in group),
                "rows": len(group[0]),
                "seconds": round(seconds, 3),
            }
            if kind == "generation":
                rec["prompts"] = len(result)
                rec["generate_calls"] = self.generate_calls - g0
                rec["decode_forward_calls"] = self.forward_calls - f0
                rec["max_new_tokens"] = k.get("max_new_tokens")
                rec["batch_size"] = k.get("batch_size")
            else:
                results = result if isinstance(result, list) else [result]
                rec["pairs"] = sum(len(v) if isinstance(v, list) else 1 for r in results for v in r.values())
                rec["forward_calls"] = self.forward_calls - f0
                if "batch_size" in k:
                    rec["batch_size"] = k["batch_size"]
                if kind == "token_stats":
                    rec["vocab_moments"] = k.get("vocab_moments", True)
            self.passes.append(rec)
            if self.on_pass_end:
                self.on_pass_end()
            return result
        return timed


def run(args: argparse.Namespace) -> dict:
    common.set_offline_env()
    wall = common.Stopwatch()
    import eval as eval_script  # src/eval.py
    import evals.base as evals_base
    from evals import passes

    metrics = None
    if args.metrics != "default":
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    tofu = str(Path(args.tofu).resolve() if args.tofu else common.default_tofu_dir())
    rec = PassRecorder()
    eval_script.get_model = rec.wrap_get_model(eval_script.get_model)
    evals_base.build_dataset = rec.wrap_build_dataset(evals_base.build_dataset)
    passes.token_stats_passes = rec.wrap_pass("token_stats", passes.token_stats_passes)
    passes.grad_norm_pass = rec.wrap_pass("grad_norm", passes.grad_norm_pass)
    passes.generation_pass = rec.wrap_pass("generation", passes.generation_pass)
    if args.decoder == "generate":
        passes._plain_greedy_ok = lambda model: False  # generation_pass falls back to model.generate

    def result(summaries: Any, complete: bool) -> dict:
        fwd = [p for p in rec.passes if p["pass"] != "generation"]
        gen = [p for p in rec.passes if p["pass"] == "generation"]
        forward_s = sum(p["seconds"] for p in fwd)
        generation_s = sum(p["seconds"] for p in gen)
        wall_s = wall()
        return {
            "benchmark": "eval_time",
            "complete": complete,
            "date": common.now_iso(),
            "machine": common.machine_info(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "model": args.model,
            "model_path": args.model_path,
            "forget_split": args.forget_split,
            "holdout_split": args.holdout_split,
            "tofu": tofu,
            "metrics": metric_names,
            "max_new_tokens_override": args.max_new_tokens,
            "decoder": args.decoder,
            "wall_s": round(wall_s, 2),
            "model_load_s": round(rec.model_load_s, 2),
            "forward_s": round(forward_s, 2),
            "generation_s": round(generation_s, 2),
            "other_s": round(wall_s - rec.model_load_s - forward_s - generation_s, 2),
            "teacher_forced_passes": len(fwd),
            "forward_calls": sum(p["forward_calls"] for p in fwd),
            "pairs_evaluated": sum(p["pairs"] for p in fwd),
            "generation_passes": len(gen),
            "generate_calls": sum(p["generate_calls"] for p in gen),
            "decode_forward_calls": sum(p["decode_forward_calls"] for p in gen),
            "prompts_generated": sum(p["prompts"] for p in gen),
            "passes": rec.passes,
            "peak_memory": common.peak_memory(),
            "summary": summaries,
        }

    metric_names: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as workdir:
        cfg = common.compose("eval.yaml", build_overrides(args, tofu, workdir, metrics))
        if args.max_new_tokens is not None or args.batch_size is not None:
            def override(m: Any) -> None:
                if args.max_new_tokens is not None and "generation_args" in m:
                    m.generation_args.max_new_tokens = args.max_new_tokens
                if args.batch_size is not None and "batch_size" in m:
                    m.batch_size = args.batch_size
            _override_everywhere(cfg.eval.tofu.metrics, override)
        metric_names = list(cfg.eval.tofu.metrics)
        if args.out:
            rec.on_pass_end = lambda: common.write_json_atomic(args.out, result(None, complete=False))
        common.reset_peak_memory()
        summaries = {name: evaluation.summary for name, evaluation in eval_script.run(cfg).items()}
    return result(summaries, complete=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with common.stdout_to_stderr():
        res = run(args)
    common.emit(res, args.out)


if __name__ == "__main__":
    main()
