"""``Evaluator``: runs a benchmark's metrics on a model and writes ``<NAME>_EVAL.json`` / ``<NAME>_SUMMARY.json``.

A benchmark config (``configs/eval/<bench>.yaml``) lists metrics; each metric config names a
registered ``handler`` (src/evals/metrics), the ``datasets`` it reads (role -> dataset spec), its
``pre_compute`` metrics (full configs, keyed by metric name, each with an ``access_key``), its
``metric_inputs`` (``{access_key: name}``: other metrics of the same benchmark, whose results as reported
are handed to it with the ``pre_compute`` ones: a score built on the benchmark's own metrics, computed from
the same numbers and passes), optional ``reference_logs`` (another model's EVAL file) and handler options.
The evaluator:

1. plans the passes every metric needs and runs each (dataset, pass kind) once, sharing the result
   between metrics (``evals.passes``); teacher-forced passes over the same questions with different
   answer columns run together, each question's prompt once;
2. computes each metric once, dependencies first (a metric used as ``pre_compute`` by two others is
   computed once);
3. returns an ``EvalResult`` (every metric, per-sample values keyed by dataset index, ``_meta``, the
   summary), which ``evals.result.ResultStore`` writes once as the EVAL and SUMMARY files.

A metric already in an existing EVAL file is reused only if its fingerprint (metric config, model,
data files, template, code version, ``passes`` mode) matches; ``overwrite: true`` recomputes everything.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from core.distributed import is_main_process, is_sharded, on_main_process
from data import DATASET_REGISTRY, accepts_arg, build_dataset, dataset_config
from data.tofu import local_data_file, local_stem
from data.utils import DataFileError, check_rows_file
from evals.benchmark import COMMON_KEYS, Benchmark
from evals.metrics import PASS_INPUTS, get_metric
from evals.passes import PlainPassOptions
from evals.result import (
    EvalResult,
    ResultStore,
    code_version,
    content_hash,
    evaluated_model_id,
    file_digest,
    finite_or_none,
    model_fingerprint,
    utc_timestamp,
)
from evals.runners import PASS_CHECKS, PASS_RUNNERS, EvalContext
from evals.served import GenerationServerConfig, ServedGeneration

log = logging.getLogger(__name__)

#: ``reference_logs.<name>.missing_entries``: an included metric the reference file lacks is an ``error`` (before
#: any model pass), or gives the metric an entry without a value (``null``, with a note: scores that can go
#: without one, such as the aggregate Privacy score with a retain file of another framework).
MISSING_ENTRIES = ("error", "null")


def _missing_entries(ref: Mapping, where: str) -> str:
    choice = ref.get("missing_entries", "error")
    if choice not in MISSING_ENTRIES:
        raise ValueError(f"{where}={choice!r}; valid: {', '.join(MISSING_ENTRIES)}")
    return choice


def _input_names() -> set[str]:
    return set(PASS_INPUTS) | {"pre_compute", "reference_logs"}
CONTROL_KEYS = {"handler", "datasets", "pre_compute", "metric_inputs", "reference_logs", "access_key", "batch_size",
                "generation_args", "reference_model", "higher_is_better", "sampling_args", "answers", "scorer"}
#: The pass inputs whose ``batch_size`` may be ``auto`` (rows of a decoding batch, sized to the device).
DECODING_INPUTS = frozenset({"generations", "samples", "scored_answers"})
#: Metric-config keys that do not change a metric's value (left out of its fingerprint).
PRESENTATION_KEYS = ("higher_is_better",)
#: ``passes`` of a benchmark config: the fast passes (shared prompts, custom decoder) or the plain reference.
PASS_MODES = ("fast", "plain")


#: Benchmark-config keys this evaluator reads besides ``COMMON_KEYS``, and the ones its metric configs
#: interpolate (``${eval.tofu.forget_split}``, MUSE's published AUCs): any other key is a typo.
OWN_KEYS = frozenset({"metrics", "summary_metrics", "passes", "plain_pass_options", "limit", "retain_logs_path",
                      "reference_model_path", "generation_server"})
INTERPOLATED_KEYS = frozenset({"forget_split", "holdout_split", "data_split", "published_retrain_auc"})


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def with_question_key(mcfg: Mapping, key: str) -> dict:
    """A metric config whose every question-answer dataset (its own and its pre-compute metrics'; a dataset class
    that takes ``question_key``) reads its questions from the column ``key``."""
    out = copy.deepcopy(dict(mcfg))
    for spec in (out.get("datasets") or {}).values():
        if isinstance(spec, dict) and accepts_arg(spec, "question_key"):
            spec.setdefault("args", {})["question_key"] = key
    out["pre_compute"] = {name: with_question_key(sub, key) for name, sub in (out.get("pre_compute") or {}).items()}
    if not out["pre_compute"]:
        out.pop("pre_compute")
    return out


class FirstRows:
    """The first ``n`` items of an evaluation dataset (``limit``); everything else is the dataset's own."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} beyond the first {self.n} rows (limit)")
        return self.dataset[index]

    def lengths(self) -> list[int]:
        return list(self.dataset.lengths())[:self.n]

    def __getattr__(self, name: str) -> Any:  # prompt_text, answer_texts, template, last_token_is_eos, name
        return getattr(self.dataset, name)


class Evaluator(Benchmark):
    """Runs the metrics of one benchmark config (see module docstring).

    Args:
        cfg: the benchmark config (``eval.<bench>``): ``metrics``, ``name`` (file prefix, e.g. TOFU),
            ``output_dir``, ``overwrite``, ``summary_metrics`` (headline list; default all), ``passes``
            (``fast``, the default, or ``plain``: the reference passes of ``evals.passes``, no speed tricks),
            ``plain_pass_options`` (how the plain passes compute: ``evals.passes.PlainPassOptions``; any of
            them set needs ``passes: plain``),
            ``limit`` (null, or the number of leading rows of every dataset to score: a quick look whose
            numbers are not the benchmark's; recorded in ``_meta`` and the fingerprints).
        tokenizer: the model's tokenizer.
        template_args: the model config's prompt settings.
        paths: the run's ``paths`` (its data folders), where ``data_folder_key`` (``paths.tofu``) is looked up.

    Every metric's ``datasets`` are composed dataset configs (Hydra composes them from the metric config's
    defaults list, ``/data/datasets@datasets.main: _TOFU_QA``), resolved with the benchmark config.
    """

    def __init__(self, cfg: Mapping, tokenizer: Any = None, template_args: Any = None,
                 paths: Mapping | None = None):
        super().__init__(cfg, tokenizer, template_args)
        unknown = sorted(set(self.cfg) - COMMON_KEYS - OWN_KEYS - INTERPOLATED_KEYS)
        if unknown:
            raise ValueError(f"evaluator {self.name}: unknown key(s) {unknown}; valid: "
                             f"{', '.join(sorted(COMMON_KEYS | OWN_KEYS | INTERPOLATED_KEYS))}")
        self.passes_mode = self.cfg.get("passes", "fast")
        if self.passes_mode not in PASS_MODES:
            raise ValueError(f"evaluator {self.name}: passes={self.passes_mode!r}; valid: {', '.join(PASS_MODES)}")
        self.limit = self.cfg.get("limit")
        if self.limit is not None and not _positive_int(self.limit):
            raise ValueError(f"evaluator {self.name}: limit={self.limit!r}; give a positive number of rows per "
                             "dataset, or null for every row")
        self.metrics_cfg: dict = dict(self.cfg.get("metrics") or {})
        if not self.metrics_cfg:
            raise ValueError(f"evaluator {self.name}: no metrics configured")
        for metric_name, mcfg in self.metrics_cfg.items():
            self._validate(metric_name, mcfg)
        self._check_metric_input_cycles()
        summary = self.cfg.get("summary_metrics")
        if summary is not None:
            if not isinstance(summary, (list, tuple)) or not all(isinstance(n, str) for n in summary):
                raise ValueError(f"evaluator {self.name}: summary_metrics={summary!r}; must be a list of metric names "
                                 f"(valid: {', '.join(self.metrics_cfg)})")
            unknown = [n for n in summary if n not in self.metrics_cfg]
            if unknown:
                raise ValueError(f"evaluator {self.name}: summary_metrics {unknown} are not metrics of this benchmark, "
                                 f"so they would be missing from {self.name}_SUMMARY.json; valid: "
                                 f"{', '.join(self.metrics_cfg)}")
        self._settle_roles()
        self.paths = paths
        self.plain_options = PlainPassOptions.from_config(self.cfg.get("plain_pass_options"), f"evaluator {self.name}")
        if self.plain_options.any() and self.passes_mode != "plain":
            chosen = [k for k, v in self.plain_options.as_dict().items() if v]
            raise ValueError(f"evaluator {self.name}: plain_pass_options {chosen} change how the plain passes compute, "
                             f"but passes={self.passes_mode!r}; set eval.<bench>.passes=plain (compat=open_unlearning "
                             "sets both)")
        server = self.cfg.get("generation_server")
        self.generation_server = None if server is None else \
            GenerationServerConfig.from_config(server, f"evaluator {self.name}")
        self._datasets: dict[str, Any] = {}

    def _validate(self, name: str, mcfg: Mapping) -> None:
        spec = get_metric(mcfg.get("handler"))
        direction = mcfg.get("higher_is_better")
        if direction is not None and (not isinstance(direction, bool) or
                                      spec.higher_is_better not in (None, direction)):
            raise ValueError(f"metric {name}: higher_is_better={direction!r}; give true, false or null"
                             + (f" (handler {spec.name} is registered with higher_is_better={spec.higher_is_better})"
                                if isinstance(direction, bool) else ""))
        params = inspect.signature(spec.fn).parameters
        valid = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _input_names())
        unknown = sorted(set(self._options(mcfg)) - set(valid))
        if unknown:
            raise ValueError(f"metric {name}: option(s) {unknown} not understood by handler {spec.name}; "
                             f"its options: {valid or 'none'} (plus {sorted(CONTROL_KEYS)})")
        for sub_name, sub in (mcfg.get("pre_compute") or {}).items():
            if "access_key" not in sub:
                raise ValueError(f"metric {name}: pre_compute.{sub_name} needs an access_key")
            self._validate(sub_name, sub)
        self._validate_metric_inputs(name, mcfg, spec.name, "pre_compute" in spec.needs)
        if any(n in spec.needs for n in PASS_INPUTS) and not mcfg.get("datasets"):
            raise ValueError(f"metric {name}: handler {spec.name} reads data but no datasets are given")
        for kind in spec.needs:
            if kind in PASS_CHECKS:
                PASS_CHECKS[kind](mcfg, f"metric {name}")
        if spec.check_config is not None:
            spec.check_config(mcfg, f"metric {name}")
        batch_size = mcfg.get("batch_size", 32)
        pass_inputs = {n for n in spec.needs if n in PASS_INPUTS}
        generation_only = bool(pass_inputs) and pass_inputs <= DECODING_INPUTS
        if not (batch_size == "auto" and generation_only or _positive_int(batch_size)):
            raise ValueError(f"metric {name}: batch_size={batch_size!r}; give a positive number of rows"
                             + (" or 'auto'" if generation_only else " ('auto' is for generation metrics only)"))

    def _validate_metric_inputs(self, name: str, mcfg: Mapping, handler: str, reads_pre_compute: bool) -> None:
        """``metric_inputs``: ``{access_key: name}`` of metrics of this benchmark, for a handler that reads
        ``pre_compute``, with access keys its ``pre_compute`` entries do not use."""
        inputs = mcfg.get("metric_inputs")
        if inputs is None:
            return
        if not isinstance(inputs, Mapping) or not inputs or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
            raise ValueError(f"metric {name}: metric_inputs={inputs!r}; give a mapping {{access key: name of "
                             f"another metric of this benchmark}} (its metrics: {', '.join(self.metrics_cfg)})")
        if not reads_pre_compute:
            raise ValueError(f"metric {name}: handler {handler} reads no pre_compute, so metric_inputs "
                             f"{sorted(inputs.values())} would go unused")
        unknown = [m for m in inputs.values() if m not in self.metrics_cfg]
        if unknown:
            raise ValueError(f"metric {name}: metric_inputs {unknown} are not metrics of evaluator {self.name} "
                             f"(its metrics: {', '.join(self.metrics_cfg)}); add them to its metric list, or "
                             f"leave {name} out")
        shared = sorted(set(inputs) & {sub.get("access_key") for sub in (mcfg.get("pre_compute") or {}).values()})
        if shared:
            raise ValueError(f"metric {name}: access key(s) {shared} are given both by metric_inputs and by "
                             "pre_compute; give each input its own key")

    def _metric_input_names(self, mcfg: Mapping) -> list[str]:
        """The benchmark metrics a metric config reads through ``metric_inputs``, its own and its pre-compute
        metrics'."""
        names = list((mcfg.get("metric_inputs") or {}).values())
        for sub in (mcfg.get("pre_compute") or {}).values():
            names += self._metric_input_names(sub)
        return names

    def _check_metric_input_cycles(self) -> None:
        """No metric reads itself through ``metric_inputs``, directly or through others (ValueError naming
        the cycle)."""
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            if name in path:
                cycle = " -> ".join(path[path.index(name):] + [name])
                raise ValueError(f"evaluator {self.name}: metrics read each other through metric_inputs: {cycle}")
            if name in done:
                return
            for input_name in self._metric_input_names(self.metrics_cfg[name]):
                visit(input_name, [*path, name])
            done.add(name)

        for metric_name in self.metrics_cfg:
            visit(metric_name, [])

    # ----- data ------------------------------------------------------------------------------------
    def _dataset_key(self, spec: Any, without_answer: bool = False) -> str:
        """Identity of a dataset (config, file size and time, template); ``without_answer``: of its
        questions only (the same file and question column, any answer column)."""
        resolved = dataset_config(spec)
        if without_answer:
            resolved = {**resolved, "args": {k: v for k, v in resolved.get("args", {}).items() if k != "answer_key"}}
        args = resolved.get("args", {})
        local = args.get("local_dir")
        files = []
        if local:
            stems = [local_stem(args)] + ([local_stem(args["fewshot"])] if args.get("fewshot") else [])
            for stem in stems:
                for cand in (Path(local) / f"{stem}.json", Path(local) / f"{stem}.jsonl"):
                    if cand.is_file():
                        files.append(f"{cand}:{cand.stat().st_size}:{int(cand.stat().st_mtime)}")
        return content_hash({"dataset": resolved, "files": files, "template": self.template_args})

    def _dataset(self, spec: Any) -> Any:
        key = self._dataset_key(spec)
        if key not in self._datasets:
            dataset = build_dataset(spec, self.tokenizer, self.template_args)
            self._datasets[key] = dataset if self.limit is None else FirstRows(dataset, self.limit)
        return self._datasets[key]

    def _metric_configs(self, names: list[str] | None = None) -> list[tuple[str, Mapping]]:
        """``(name, config)`` of the metrics ``names`` (default all) and of their ``pre_compute`` metrics."""
        found: list[tuple[str, Mapping]] = []

        def visit(name: str, mcfg: Mapping) -> None:
            found.append((name, mcfg))
            for sub_name, sub in (mcfg.get("pre_compute") or {}).items():
                visit(sub_name, sub)

        for name in self.metrics_cfg if names is None else names:
            visit(name, self.metrics_cfg[name])
        return found

    def input_paths(self) -> list[Path]:
        """The benchmark's data folder (``data_folder_key``), the local data folder of every dataset the metrics
        read, the reference EVAL files and the reference model folder."""
        key = self.roles.data_folder_key
        found: list[str] = [self._path_setting(key) if key else None]
        for _, mcfg in self._metric_configs():
            for spec in (mcfg.get("datasets") or {}).values():
                found.append(dataset_config(spec).get("args", {}).get("local_dir"))
            found += [ref.get("path") for ref in (mcfg.get("reference_logs") or {}).values()]
            found.append((mcfg.get("reference_model") or {}).get("pretrained_model_name_or_path"))
        found += [self.cfg.get("retain_logs_path"), self.cfg.get("reference_model_path")]
        return [Path(p) for p in dict.fromkeys(str(p) for p in found if p)]

    def _path_setting(self, key: str) -> Any:
        """The value of ``key`` (``paths.tofu``) in the run's ``paths``; None where it is not set."""
        if self.paths is None:
            return None
        paths = self.paths if OmegaConf.is_config(self.paths) else OmegaConf.create(dict(self.paths))
        return OmegaConf.select(paths, key.split(".", 1)[1]) if key.startswith("paths.") else None

    def with_inputs(self, *, question_key: str | None = None,
                    template_args: Mapping[str, Any] | None = None) -> Evaluator:
        """This benchmark with every question-answer dataset asking its questions from ``question_key`` and/or
        prompts built with ``template_args`` (the rephrasing attack)."""
        metrics = self.metrics_cfg if question_key is None else \
            {name: with_question_key(m, question_key) for name, m in self.metrics_cfg.items()}
        return Evaluator({**self.cfg, "metrics": metrics}, tokenizer=self.tokenizer,
                         template_args=self.template_args if template_args is None else template_args,
                         paths=self.paths)

    def sample_fields(self, metric: str) -> tuple[str, ...]:
        """The ``sample_fields`` its handler registers (``MetricSpec``)."""
        return get_metric(self.metrics_cfg[metric]["handler"]).sample_fields

    def check_inputs(self, names: list[str] | None = None) -> None:
        """Everything the metrics ``names`` (default all) will read, checked before any model pass:

        - every local data file (``paths.tofu``, ``paths.muse_news``) exists (FileNotFoundError naming the file and the files
          present; when the missing file is this benchmark's holdout split, which follows the forget
          split, forget10 -> holdout10, it says which holdout files the folder has and how to pick one,
          ``holdout_split=...``), and reads as one JSON object per line with the fields its dataset class
          reads (``file_fields``: question and answer, or text; DataFileError naming the file, the line
          and the field);
        - every reference EVAL file (``retain_logs_path``): ``check_reference_logs``.
        """
        checked = set()
        for metric, role, spec in [(name, role, spec) for name, mcfg in self._metric_configs(names)
                                   for role, spec in (mcfg.get("datasets") or {}).items()]:
            key = self._dataset_key(spec)
            if key in checked:
                continue
            checked.add(key)
            resolved = dataset_config(spec)
            args = resolved.get("args", {})
            if not args.get("local_dir"):
                continue  # read from the Hub
            hint = ""
            holdout = self.cfg.get("holdout_split")
            if holdout and args.get("hf_args", {}).get("name") == holdout:
                present = sorted(p.stem for p in Path(args["local_dir"]).glob("holdout*.json*"))
                hint = (f"The holdout split follows the forget split ({self.cfg.get('forget_split')} -> {holdout})"
                        + (f"; this folder has {', '.join(present)}: add holdout_split={present[0]} to use it "
                           "(the forget and holdout sets then differ in size, which the EVAL file's _meta records)"
                           if present else ""))
            what = f"{self.name} metric {metric} ({role})"
            handler = DATASET_REGISTRY[resolved["handler"]]
            fields, lists = handler.file_fields(args)
            files = [(local_data_file(args["local_dir"], local_stem(args), what, hint,
                                      local_dir_key=args.get("local_dir_key", "paths.tofu")), fields, lists)]
            if args.get("fewshot"):  # the in-context examples (MUSE's knowledge prompts): the same columns
                files.append((local_data_file(args["local_dir"], local_stem(args["fewshot"]),
                                              f"{what} in-context examples", "",
                                              local_dir_key=args.get("local_dir_key", "paths.tofu")), fields, ()))
            for path, file_fields, list_fields in files:
                try:
                    check_rows_file(path, file_fields, list_fields)
                except DataFileError as e:
                    raise DataFileError(f"{what}: {e}") from None
        self.check_reference_logs(names)

    def _read_reference_file(self, path: str, what: str) -> dict:
        """The JSON object of a reference EVAL file, or an error naming the key, the file and the problem."""
        from_top = " (retain_logs_path)" if path == self.cfg.get("retain_logs_path") else ""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what}={path}{from_top} does not exist" +
                                    (" (it is a folder; give its EVAL file)" if Path(path).is_dir() else
                                     f"; give the retain model's {self.name}_EVAL.json written by src/eval.py, or null"))
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{what}={path}{from_top}: not UTF-8 text (byte {e.start}); it must be an EVAL file "
                                "written by src/eval.py") from None
        try:
            logs = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{what}={path}{from_top}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                "it must be an EVAL file written by src/eval.py") from None
        if not isinstance(logs, dict):
            raise DataFileError(f"{what}={path}{from_top}: a JSON object of metric results expected, got a "
                                f"{type(logs).__name__}")
        meta = logs.get("_meta") if isinstance(logs.get("_meta"), dict) else {}
        benchmark = meta.get("evaluator")
        if benchmark is not None and benchmark != self.name:
            raise DataFileError(f"{what}={path}{from_top} is an evaluation of benchmark {benchmark} (its _meta.evaluator), "
                                f"not of {self.name}: give the retain model's {self.name}_EVAL.json")
        return logs

    def check_reference_logs(self, names: list[str] | None = None) -> None:
        """Before any model pass: every ``reference_logs`` file of the metrics ``names`` (default all; the
        retain model's EVAL file, ``retain_logs_path``) exists, is a JSON object, holds each metric the
        config includes, and each holds the fields its metric reads (``MetricSpec.reference_fields``)."""
        for metric, mcfg in self._metric_configs(names):
            fields = get_metric(mcfg.get("handler")).reference_fields
            for ref_name, ref in (mcfg.get("reference_logs") or {}).items():
                path = ref.get("path")
                if not path:
                    continue
                what = f"{self.name} metric {metric}: reference_logs.{ref_name}.path"
                logs = self._read_reference_file(str(path), what)
                lenient = _missing_entries(ref, f"{what[:-len('.path')]}.missing_entries") == "null"
                for included in (ref.get("include") or {}):
                    entry = logs.get(included)
                    if entry is None and lenient:  # the metric records why it has no value
                        continue
                    if not isinstance(entry, dict):
                        have = sorted(k for k in logs if k != "_meta")
                        problem = "has no metric" if entry is None else "has a non-object entry for"
                        raise DataFileError(f"{what}={path}: {problem} {included!r}, which {metric} reads (it has: "
                                            f"{', '.join(have) or 'no metrics'}); evaluate the retain model with a "
                                            f"config that includes {included}")
                    missing = [f for f in fields if not isinstance(entry.get(f), dict)]
                    if missing:
                        raise DataFileError(f"{what}={path}: its {included!r} entry has no {missing[0]!r} object, "
                                            f"which {metric} reads; it has: {', '.join(sorted(entry))}")

    def _split_sizes(self, names: list[str]) -> tuple[dict[str, int] | None, list[str]]:
        """Rows of the forget and holdout sets the membership metrics compare, and a warning per metric
        whose two sets differ in size (the AUCs and privleak then compare unequal samples)."""
        sizes, warnings = None, []
        for name in names:
            datasets = self.metrics_cfg[name].get("datasets") or {}
            if not {"forget", "holdout"} <= set(datasets):
                continue
            counts = {role: len(self._dataset(datasets[role])) for role in ("forget", "holdout")}
            sizes = sizes or counts
            if counts["forget"] != counts["holdout"]:
                warnings.append(
                    f"{name}: {counts['forget']} forget rows ({self.cfg.get('forget_split')}) against "
                    f"{counts['holdout']} holdout rows ({self.cfg.get('holdout_split')}): the membership AUCs "
                    "compare sets of different sizes (TOFU pairs forgetNN with holdoutNN)")
        return sizes, warnings

    # ----- passes ----------------------------------------------------------------------------------
    def _plan_token_stats(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The teacher-forced passes the metrics ``names`` will run: {questions key: {dataset key: spec}}."""
        plan: dict[str, dict[str, Any]] = {}
        for _, mcfg in self._metric_configs(names):
            if "token_stats" in get_metric(mcfg.get("handler")).needs:
                for spec in (mcfg.get("datasets") or {}).values():
                    plan.setdefault(self._dataset_key(spec, True), {})[self._dataset_key(spec)] = spec
        return plan

    def _inputs(self, mcfg: Mapping, needs: tuple, ctx: EvalContext) -> dict:
        datasets = dict(mcfg.get("datasets") or {})
        inputs: dict[str, Any] = {}
        for kind in PASS_INPUTS:
            if kind not in needs:
                continue
            runner = PASS_RUNNERS[kind]
            # keyed by dataset role whatever their number: a metric reading one dataset takes its sole role
            inputs[kind] = {role: runner(ctx, spec, mcfg) for role, spec in datasets.items()}
        return inputs

    # ----- metrics ---------------------------------------------------------------------------------
    @staticmethod
    def _options(mcfg: Mapping) -> dict:
        return {k: v for k, v in mcfg.items() if k not in CONTROL_KEYS}

    def _reference_logs(self, mcfg: Mapping) -> dict:
        out: dict[str, Any] = {}
        for ref_name, ref in (mcfg.get("reference_logs") or {}).items():
            path = ref.get("path")
            logs = self._read_reference_file(str(path), f"reference_logs.{ref_name}.path") if path else None
            lenient = _missing_entries(ref, f"reference_logs.{ref_name}.missing_entries") == "null"
            for metric_name, inc in (ref.get("include") or {}).items():
                if logs is not None and metric_name not in logs:
                    if not lenient:
                        raise DataFileError(f"{path} has no metric {metric_name!r} (it has: "
                                            f"{sorted(k for k in logs if k != '_meta')})")
                    out[inc["access_key"]] = {"agg_value": None, "note": f"{path} has no {metric_name!r} entry "
                                              "(evaluate the retain model with that metric)"}
                    continue
                out[inc["access_key"]] = logs[metric_name] if logs is not None else None
        return out

    def _compute(self, name: str, mcfg: Mapping, ctx: EvalContext, results: dict) -> dict:
        """The result of metric ``name`` with config ``mcfg``, computed once per (name, config).

        A metric used both on its own and as another's ``pre_compute`` is computed once when both copies
        have the same config, and separately when an override made them differ.
        """
        # access_key only says how a parent refers to this result; it does not change the result.
        cache = ctx.cache
        key = ("metric", name, content_hash({k: v for k, v in mcfg.items() if k != "access_key"}))
        if key in cache:
            return cache[key]
        same_config = {k: v for k, v in (self.metrics_cfg.get(name) or {}).items() if k != "access_key"} == \
            {k: v for k, v in mcfg.items() if k != "access_key"}
        if name in results and results[name] is not None and same_config:
            cache[key] = results[name]  # reused from an earlier EVAL file
            return cache[key]
        spec = get_metric(mcfg["handler"])
        log.info("%s: computing %s (%s)", self.name, name, spec.name)
        started = time.perf_counter()
        kwargs: dict[str, Any] = self._inputs(mcfg, spec.needs, ctx)
        if "pre_compute" in spec.needs:
            kwargs["pre_compute"] = {
                sub["access_key"]: self._compute(sub_name, sub, ctx, results)
                for sub_name, sub in (mcfg.get("pre_compute") or {}).items()
            }
            # the benchmark's own metrics, as they are reported (computed once, whoever asks first)
            kwargs["pre_compute"].update({
                access_key: self._compute(input_name, self.metrics_cfg[input_name], ctx, results)
                for access_key, input_name in (mcfg.get("metric_inputs") or {}).items()
            })
        if "reference_logs" in spec.needs:
            kwargs["reference_logs"] = self._reference_logs(mcfg)
        cache[key] = spec.fn(**kwargs, **self._options(mcfg))
        # the time of the passes this metric was the first to need, and of its pre-compute metrics
        log.info("%s: %s done in %.1f s", self.name, name, time.perf_counter() - started)
        return cache[key]

    def fingerprint(self, name: str, model_id: str, passes_mode: str) -> str:
        def with_data(mcfg: Mapping) -> dict:
            out = {k: v for k, v in mcfg.items() if k not in PRESENTATION_KEYS}
            out["datasets"] = {role: self._dataset_key(spec) for role, spec in (mcfg.get("datasets") or {}).items()}
            out["reference_files"] = {
                ref_name: file_digest(ref.get("path")) for ref_name, ref in (mcfg.get("reference_logs") or {}).items()
            }
            out["pre_compute"] = {k: with_data(v) for k, v in (mcfg.get("pre_compute") or {}).items()}
            if mcfg.get("metric_inputs"):  # the inputs' own fingerprint data: a changed input recomputes the score
                out["metric_inputs"] = {k: with_data(self.metrics_cfg[n]) for k, n in mcfg["metric_inputs"].items()}
            return out

        decodes = any(DECODING_INPUTS & set(get_metric(mcfg["handler"]).needs) for _, mcfg in self._metric_configs([name]))
        server = self.cfg.get("generation_server") if decodes else None  # where its answers are generated
        return content_hash({"metric": with_data(self.metrics_cfg[name]), "model": model_fingerprint(model_id),
                      "generation_server": server,
                      "template": self.template_args, "code": code_version(), "passes": passes_mode,
                      "plain_pass_options": self.plain_options.as_dict(), "limit": self.limit})

    # ----- entry point -----------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, *, output_dir: str | os.PathLike | None = None,
                 model_id: str | None = None, overwrite: bool | None = None, only: list[str] | None = None,
                 save: bool = True) -> EvalResult:
        """Compute every metric (or ``only`` these, afresh), reusing what an earlier EVAL file in ``output_dir``
        holds with the same fingerprint; the result is saved there once (``save``, by process 0).

        A model sharded over the processes (FSDP2, ZeRO-3: ``core.distributed.is_sharded``) is evaluated with
        the plain passes, which keep every process in the same sequence of forward calls (padding passes,
        ``generate(synced_gpus=True)``); the fast passes' shared prompts and joined decoding rows would not."""
        passes_mode = self.passes_mode
        if passes_mode != "plain" and is_sharded(model):
            log.info("%s: the model is sharded over the processes: plain passes, in lockstep", self.name)
            passes_mode = "plain"
        if only is not None:
            unknown = [n for n in only if n not in self.metrics_cfg]
            if unknown or not only:
                raise ValueError(f"evaluator {self.name}: only={list(only)}; give metrics of this benchmark: "
                                 f"{', '.join(self.metrics_cfg)}")
        names = list(self.metrics_cfg) if only is None else list(only)
        store = ResultStore(Path(output_dir or self.cfg.get("output_dir") or "."), self.name)
        overwrite = only is not None or bool(self.cfg.get("overwrite", False) if overwrite is None else overwrite)
        if model_id is None:
            model_id = evaluated_model_id(model)
        fingerprints = {name: self.fingerprint(name, model_id, passes_mode) for name in names}

        # Decided once, by process 0: a process that saw the file another one is writing would skip
        # the passes (and their collective calls) the others run.
        reused, previous = on_main_process(lambda: store.reusable(fingerprints, overwrite))
        results: dict[str, Any] = dict(reused)
        if reused:
            log.info("%s: reusing %d metric(s) from %s: %s", self.name, len(reused), store.eval_path, ", ".join(reused))

        to_compute = [n for n in names if n not in reused]
        self.check_inputs(to_compute)
        was_training = model.training
        model.eval()
        ctx = EvalContext(
            benchmark=self.name, model=model, tokenizer=self.tokenizer, template_args=self.template_args,
            plain_options=self.plain_options, plain=passes_mode == "plain", dataset=self._dataset, dataset_key=self._dataset_key,
            token_stats_plan=self._plan_token_stats(to_compute),
            moment_datasets=frozenset(self._dataset_key(spec) for _, mcfg in self._metric_configs(to_compute)
                                      if "vocab_moments" in get_metric(mcfg.get("handler")).needs
                                      for spec in (mcfg.get("datasets") or {}).values()),
            served=None if self.generation_server is None else ServedGeneration(self.generation_server))
        try:
            for name in names:
                results[name] = self._compute(name, self.metrics_cfg[name], ctx, results)
        finally:
            model.train(was_training)

        summary_names = self.summary_names() if only is None else names
        summary = {name: finite_or_none(results[name].get("agg_value")) for name in summary_names}
        split_sizes, warnings = self._split_sizes(names)
        for warning in warnings:
            log.warning("%s: %s", self.name, warning)
        meta = {
            "model": model_id, "code_version": code_version(), "evaluator": self.name, "passes": passes_mode,
            "plain_pass_options": self.plain_options.as_dict(),
            "limit": self.limit,
            "splits": {k: self.cfg.get(k) for k in ("forget_split", "holdout_split", "retain_logs_path")
                       if k in self.cfg},
            "split_sizes": split_sizes,
            "warnings": warnings,
            "timestamp": utc_timestamp(),
            "fingerprints": fingerprints,
            "config_hash": content_hash(self.metrics_cfg),
            "higher_is_better": {n: d for n, d in self.directions().items() if n in summary_names},
            "roles": self.roles_meta(),
            "generation_server": None if ctx.served is None else ctx.served.describe(),
        }
        result = EvalResult(self.name, self._every_result(names, results, ctx.cache, previous, list(reused)), summary, meta)
        if save and is_main_process():
            store.save(result)
        for note in {r.get("note") for r in results.values() if isinstance(r, dict) and r.get("note")}:
            log.warning("%s: %s", self.name, note)
        return result

    def _every_result(self, names: list[str], results: dict, cache: dict, previous: EvalResult | None,
                      reused: list[str]) -> dict:
        """The EVAL file's metric entries: each configured metric, then each ``pre_compute`` metric under its
        own name (``forget_Q_A_PARA_Prob``, ``ra_Q_A_Prob_normalised``, ...), as open-unlearning writes them.

        A pre-compute metric comes from this evaluation's cache, or, when its parent was reused, from the
        earlier file. A name that two configs share (an override made them differ) keeps the first one
        met: the top-level metric's.
        """
        payload = {name: results[name] for name in names}
        computed = {}
        for (kind, name, _), value in ((k, v) for k, v in cache.items() if isinstance(k, tuple) and len(k) == 3):
            if kind == "metric":
                computed.setdefault(name, value)
        earlier = previous.entries if previous is not None else {}
        for name, _ in self._metric_configs(reused):
            if name not in computed and isinstance(earlier.get(name), dict):
                computed[name] = earlier[name]
        for name, _ in self._metric_configs(names):
            if name not in payload and name in computed:
                payload[name] = computed[name]
        return payload

    def directions(self) -> dict[str, bool | None]:
        """For each summary metric, whether a larger value is better (more forgetting, or more utility kept):
        its config's ``higher_is_better``, else its handler's registered direction; None where neither says,
        e.g. privleak and the MIA AUCs, whose goal is the retain model's value."""
        directions = {}
        for name in self.summary_names():
            mcfg = self.metrics_cfg[name]
            given = mcfg.get("higher_is_better")
            directions[name] = given if given is not None else get_metric(mcfg.get("handler")).higher_is_better
        return directions

    def summary_names(self) -> list[str]:
        names = self.cfg.get("summary_metrics")
        return [n for n in names if n in self.metrics_cfg] if names else list(self.metrics_cfg)


def format_summary(summaries: Mapping[str, Mapping[str, float | None]]) -> str:
    """A text table: one row per metric, one column per model (``summaries`` = {model: summary})."""
    models = list(summaries)
    metrics: list[str] = []
    for s in summaries.values():
        metrics += [m for m in s if m not in metrics]
    width = max([len(m) for m in metrics] + [6])
    cols = [max(len(m), 10) for m in models]
    lines = [f"{'metric':<{width}} | " + " | ".join(f"{m:>{c}}" for m, c in zip(models, cols))]
    lines.append("-" * len(lines[0]))
    for metric in metrics:
        cells = []
        for model, c in zip(models, cols):
            v = summaries[model].get(metric)
            cells.append(f"{'n/a':>{c}}" if v is None else f"{v:>{c}.4g}")
        lines.append(f"{metric:<{width}} | " + " | ".join(cells))
    return "\n".join(lines)
