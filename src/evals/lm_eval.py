"""``LMEvalEvaluator`` (``eval=lm_eval``): EleutherAI's lm-evaluation-harness on the in-memory model.

For WMDP (Li et al. 2024, arXiv:2403.03218: hazardous biology and cybersecurity knowledge, which an
unlearned model should lose), MMLU (general knowledge, which it should keep) or any other lm-eval task.
The model and tokenizer in memory are wrapped in lm-eval's ``HFLM`` and each configured task is run with
``lm_eval.simple_evaluate``; nothing is reloaded from disk, so it works on a model being unlearned
(``trainer.args.eval_strategy``) as well as from ``src/eval.py``. Every key of configs/eval/lm_eval.yaml
reaches lm-eval (docs/evaluation.md).

lm-eval is reached through its public API only. ``TaskManager`` indexes the task folders (lm-eval's
~10,000 YAML files take seconds, so one manager per set of folders is kept for the process; folders of
``include_path`` alone are indexed without lm-eval's own where they hold the task). ``task_overrides``
and a task's ``num_fewshot`` become a generated YAML that ``include``s the task's own and sets the keys
(so ``num_fewshot`` applies even where the YAML pins zero shots, as WMDP's does), in a folder named by
the overrides' content hash under one temporary folder per process. ``TaskManager.load`` builds each task
or group once per evaluator (lm-eval merges what a group passes its tasks, and loads the data); the
configs, metrics and directions of the built objects are checked and fingerprinted, and the same objects
are handed to ``simple_evaluate``.

Files, as for the other evaluators: ``LMEval_EVAL.json`` (per task, under its metric name
``<task>_<metric>``, its metrics and per-sample records; ``_meta``) and ``LMEval_SUMMARY.json``. A task result in an earlier EVAL file is
reused (``evals.result.ResultStore``) while its fingerprint (task settings, the configs lm-eval built,
local data files, model, prompt settings, lm-eval and code versions) is unchanged and ``overwrite`` is false.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import difflib
import functools
import glob
import hashlib
import importlib.metadata
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.compute import tokens_unknown
from core.distributed import is_sharded, on_main_process
from evals.benchmark import COMMON_KEYS, Benchmark
from evals.result import (
    EvalResult,
    ResultStore,
    code_version,
    content_hash,
    evaluated_model_id,
    finite_or_none,
    model_fingerprint,
    utc_timestamp,
)
from run_folder import publish_folder

log = logging.getLogger(__name__)

#: The release this evaluator was written and tested against (the ``lm_eval`` extra pins it).
LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = f'pip install -e ".[lm_eval]" (or pip install lm-eval=={LM_EVAL_VERSION})'
CONFIG_KEYS = COMMON_KEYS | {"tasks", "batch_size", "num_fewshot", "metric", "limit", "apply_chat_template",
                             "fewshot_as_multiturn", "system_instruction", "include_path", "task_overrides",
                             "log_samples", "bootstrap_iters", "lm_args"}
TASK_KEYS = {"name", "num_fewshot", "metric", "limit"}
#: ``HFLM`` arguments this evaluator sets itself (``lm_args`` may not).
OWN_LM_ARGS = {"pretrained", "tokenizer", "batch_size", "backend", "parallelize", "tp_plan", "peft", "delta"}
#: dataset builders of the ``datasets`` library that read local files (``dataset_kwargs.data_files``)
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


def _installed_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _plain(value: Any) -> Any:
    """``value`` as JSON data: numpy scalars and arrays as numbers and lists, anything else unknown as text."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value.item() if hasattr(value, "item") else str(value)


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _batch_size_ok(value: Any) -> bool:
    """A positive number, ``auto`` or ``auto:N`` (lm-eval's search for the largest batch, N times)."""
    if isinstance(value, str):
        return value == "auto" or value.startswith("auto:") and value[5:].replace(".", "", 1).isdigit()
    return _nonneg_int(value) and value >= 1


@functools.cache
def _task_manager(paths: tuple[str, ...], defaults: bool) -> Any:
    """lm-eval's ``TaskManager`` over ``paths`` (later ones win), with lm-eval's own tasks if ``defaults``; one
    per process and arguments (indexing lm-eval's own tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


@functools.cache
def _override_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lm_eval_overrides-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _override_folder(files: Mapping[str, Mapping]) -> str:
    """A folder of one generated YAML per ``{task: config}``, named by their content hash (written once)."""
    import yaml

    folder = _override_root() / content_hash(files)
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(dir=_override_root()))
        for i, (_, cfg) in enumerate(sorted(files.items())):
            (staging / f"override_{i}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        publish_folder(staging, folder)
    return str(folder)


def task_data_files(cfg: Mapping) -> list[str]:
    """The local files a task config reads: ``dataset_kwargs.data_files`` (a path, a list, or a split -> path(s)
    mapping), plus ``dataset_path`` when it names a local file or folder."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, Mapping) else None
    found: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(files)
    path = cfg.get("dataset_path")
    if isinstance(path, str) and path not in FILE_BUILDERS and (os.path.exists(path) or path.startswith((".", "/", "~"))):
        found.append(path)
    return [f for f in found if "://" not in f]


def _matches(path: str) -> list[str]:
    expanded = os.path.expanduser(path)
    return sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else \
        [expanded] if os.path.exists(expanded) else []


def _file_stats(path: str) -> list[str]:
    """``path:size:mtime`` of a local data file (each match of a glob, each file of a folder)."""
    files = [f for m in map(Path, _matches(path)) for f in ([m] if m.is_file() else sorted(m.rglob("*")))
             if f.is_file()]
    return [f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files]


def _config_of(obj: Any) -> dict:
    """The config a built Task or Group runs with, as JSON data (without where its YAML happens to be)."""
    from lm_eval.api.group import Group

    cfg = _plain(obj.to_dict() if isinstance(obj, Group) else obj.dump_config())
    if isinstance(cfg.get("metadata"), dict):
        cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if k != "config_source"}
    return cfg


class _KnownWarnings(logging.Filter):
    """Drops HFLM's two warnings about being handed a model object, which is how this evaluator always calls it."""

    KNOWN = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.KNOWN)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's global generators: put them back afterwards, so that an
    evaluation during training changes nothing that the training draws (dropout, data order)."""
    import numpy as np

    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class LMEvalEvaluator(Benchmark):
    """lm-evaluation-harness tasks on the in-memory model (see the module docstring; configs/eval/lm_eval.yaml).

    Args:
        cfg: the ``eval.lm_eval`` config.
        tokenizer: the model's tokenizer (lm-eval tokenizes with it).
        template_args: the model config's prompt settings; ``apply_chat_template: null`` follows its
            ``apply_chat_template``.
        paths: the run's ``paths`` (unused; accepted like the other evaluators).
    """

    default_name = "LMEval"

    def __init__(self, cfg: Mapping, tokenizer: Any = None, template_args: Any = None,
                 paths: Mapping | None = None):
        try:
            import lm_eval  # noqa: F401
        except ImportError as e:
            raise ImportError(f"eval=lm_eval runs EleutherAI's lm-evaluation-harness, which is not installed: "
                              f"{INSTALL_HINT}") from e
        if _installed_version() != LM_EVAL_VERSION:
            log.warning("lm-eval %s is installed; this evaluator was tested with %s (%s)", _installed_version(),
                        LM_EVAL_VERSION, INSTALL_HINT)
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        super().__init__(cfg, tokenizer, template_args if template_args is not None else {})
        if set(self.cfg) - CONFIG_KEYS:
            raise ValueError(f"evaluator {self.name}: unknown key(s) {sorted(set(self.cfg) - CONFIG_KEYS)}; "
                             f"valid: {sorted(CONFIG_KEYS)}")

        def setting(key: str, default: Any, ok: Any, hint: str) -> Any:
            value = self.cfg.get(key, default)
            if not ok(value):
                raise ValueError(f"evaluator {self.name}: {key}={value!r}; {hint}")
            return value

        self.batch_size = setting("batch_size", 8, _batch_size_ok, "give a positive number or 'auto' (lm-eval's "
                                  "search for the largest batch that fits, 'auto:N' to search N times)")
        self.bootstrap_iters = setting("bootstrap_iters", 100000, _nonneg_int, "give a number >= 0")
        self.log_samples = setting("log_samples", True, lambda v: isinstance(v, bool), "give true or false")
        self.lm_args = dict(self.cfg.get("lm_args") or {})
        if set(self.lm_args) & OWN_LM_ARGS:
            raise ValueError(f"evaluator {self.name}: lm_args may not set {sorted(set(self.lm_args) & OWN_LM_ARGS)} "
                             "(the evaluator passes the in-memory model, its tokenizer and batch_size itself)")
        chat = setting("apply_chat_template", False, lambda v: v is None or isinstance(v, (bool, str)), "give true, "
                       "false, null (the model config's template_args.apply_chat_template) or a chat template name")
        self.apply_chat_template = bool(self.template_args.get("apply_chat_template", False)) if chat is None else chat
        multiturn = self.cfg.get("fewshot_as_multiturn")  # null: as lm-eval's command line, on with a chat template
        self.fewshot_as_multiturn = bool(self.apply_chat_template) if multiturn is None else multiturn
        if not isinstance(self.fewshot_as_multiturn, bool) or (self.fewshot_as_multiturn
                                                                and not self.apply_chat_template):
            raise ValueError(f"evaluator {self.name}: fewshot_as_multiturn={multiturn!r} needs a chat template "
                             f"(apply_chat_template is {self.apply_chat_template!r}); give false or null")
        self.system_instruction = setting("system_instruction", None, lambda v: v is None or isinstance(v, str),
                                          "give text or null")
        include = setting("include_path", None, lambda v: v is None or isinstance(v, str) or (
            isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)),
            "give a folder, a list of folders or null")
        include = [include] if isinstance(include, str) else include or []
        self.include_path = [str(Path(p).expanduser().resolve()) for p in include]
        overrides = self.cfg.get("task_overrides") or {}
        if not isinstance(overrides, Mapping) or not all(isinstance(v, Mapping) for v in overrides.values()):
            raise ValueError(f"evaluator {self.name}: task_overrides must map task names to mappings of task config "
                             "keys, e.g. {wmdp_bio: {dataset_path: json, dataset_kwargs: {data_files: {test: <file>}}}}")
        for task, over in overrides.items():
            if {"task", "group", "include"} & set(over):
                raise ValueError(f"evaluator {self.name}: task_overrides.{task} may not set task, group or include")
        self.task_overrides = {str(k): dict(v) for k, v in overrides.items()}

        tasks = self.cfg.get("tasks")
        tasks = [tasks] if isinstance(tasks, (str, Mapping)) else tasks
        if not tasks:
            raise ValueError(f"evaluator {self.name}: no tasks configured (e.g. tasks: [wmdp_bio, wmdp_cyber, mmlu])")
        self.tasks: dict[str, dict] = {}
        for item in tasks:
            spec = self._task_spec(item)
            if spec["name"] in self.tasks:
                raise ValueError(f"evaluator {self.name}: task {spec['name']} is listed twice")
            self.tasks[spec["name"]] = spec
        self._built: dict[str, SimpleNamespace] = {}  # what lm-eval built of each task (``_loaded``)
        #: summary name (``<task>_<metric>``, this benchmark's metric names) -> task
        self.task_of = {f"{name}_{spec['metric']}": name for name, spec in self.tasks.items()}
        self._settle_roles()

    def _tasks_of(self, names: list[str] | None) -> list[str]:
        """The tasks of the summary names ``names`` (default all), or an error listing the valid names."""
        if names is None:
            return list(self.tasks)
        unknown = [n for n in names if n not in self.task_of]
        if unknown or not names:
            raise ValueError(f"evaluator {self.name}: {list(names)}; give metrics of this benchmark "
                             f"(<task>_<metric>): {', '.join(self.task_of)}")
        return [self.task_of[n] for n in names]

    def _task_spec(self, item: Any) -> dict:
        """``{name, num_fewshot, metric, limit}`` of a ``tasks`` entry, the top-level values filling the gaps."""
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"evaluator {self.name}: task {item!r}; give a task name or a mapping with a name")
        if set(item) - TASK_KEYS:
            raise ValueError(f"evaluator {self.name}: task {item['name']}: unknown key(s) "
                             f"{sorted(set(item) - TASK_KEYS)}; valid: {sorted(TASK_KEYS)} (other task config keys "
                             f"go under task_overrides.{item['name']})")
        spec = {"name": item["name"]}
        for key, default in (("num_fewshot", None), ("metric", "acc"), ("limit", None)):
            spec[key] = item[key] if key in item else self.cfg.get(key, default)
        where, shots, limit = f"evaluator {self.name}: task {spec['name']}", spec["num_fewshot"], spec["limit"]
        if shots is not None and not _nonneg_int(shots):
            raise ValueError(f"{where}: num_fewshot={shots!r}; give a number >= 0 or null (the task's own)")
        if not isinstance(spec["metric"], str) or not spec["metric"]:
            raise ValueError(f"{where}: metric={spec['metric']!r}; give a metric name such as acc or acc_norm")
        if limit is not None and not (_nonneg_int(limit) and limit >= 1 or isinstance(limit, float) and 0 < limit < 1):
            raise ValueError(f"{where}: limit={limit!r}; give a number of documents >= 1, a fraction below 1, or null")
        over = self.task_overrides.get(spec["name"], {})
        if shots is not None and "num_fewshot" in over and over["num_fewshot"] != shots:
            raise ValueError(f"{where}: num_fewshot is {shots} but task_overrides.{spec['name']}.num_fewshot is "
                             f"{over['num_fewshot']}; set it in one place")
        return spec

    # ----- tasks, as lm-eval builds them -----------------------------------------------------------
    def _yaml_overrides(self) -> dict[str, dict]:
        """The keys each generated task YAML sets: ``task_overrides`` plus each task's ``num_fewshot``."""
        out = {name: dict(over) for name, over in self.task_overrides.items()}
        for name, spec in self.tasks.items():
            if spec["num_fewshot"] is not None:
                out.setdefault(name, {})["num_fewshot"] = spec["num_fewshot"]
        return out

    def _lookup(self, name: str, what: str = "task") -> tuple[Any, Any]:
        """``(task manager, index entry)`` of ``name``: from ``include_path`` alone where it is found there,
        else from lm-eval's tasks plus ``include_path``; an unknown name is an error naming close ones."""
        for folder in self.include_path:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"evaluator {self.name}: include_path {folder} is not a folder")
        for defaults in ([False] if self.include_path else []) + [True]:
            tm = _task_manager(tuple(self.include_path), defaults)
            if name in tm.task_index:
                return tm, tm.task_index[name]
        close = difflib.get_close_matches(name, tm.all_tasks, n=5)
        where = f" or in include_path {self.include_path}" if self.include_path else \
            " (add include_path=<folder> for tasks of your own)"
        raise ValueError(f"evaluator {self.name}: {what} {name!r} is no task of lm-eval {_installed_version()}{where}"
                         + (f"; close: {', '.join(close)}" if close else ""))

    def _override_manager(self, names: list[str], defaults: bool) -> Any:
        """A task manager whose ``names`` are their overridden versions (generated YAMLs)."""
        overrides, files = self._yaml_overrides(), {}
        for name in names:
            entry = self._lookup(name, "task_overrides entry")[1]
            if entry.yaml_path is None:
                raise ValueError(f"evaluator {self.name}: {name} is a {entry.kind.name.lower()} with no YAML file of "
                                 "its own, so it cannot be overridden; override its tasks one by one")
            # tag: [] keeps the generated file from registering the task's tags anew, with it as their only task
            files[name] = {"include": str(Path(entry.yaml_path).resolve()), "tag": [], **_plain(overrides[name])}
        folder = _override_folder(files)
        return _task_manager((*self.include_path, folder) if defaults else (folder,), defaults)

    def _loaded(self, name: str) -> SimpleNamespace:
        """Task or group ``name`` as lm-eval builds it (data loaded), once per evaluator and while its local data
        files are unchanged: the object, its task manager, its ``kind``, ``configs`` (``{task or group: config}``),
        ``directions`` (``{metric: higher is better}``) and local data ``files``."""
        done = self._built.get(name)
        if done is not None and done.files == self._stats(done.configs):
            return done
        overrides = self._yaml_overrides()
        for task, over in self.task_overrides.items():
            self._lookup(task, "task_overrides entry")
            for path in task_data_files(over):
                if not _matches(path):
                    raise FileNotFoundError(f"evaluator {self.name}: task {task} reads {path}, which does not exist")
        tm, entry = self._lookup(name)
        kind = entry.kind.name
        if kind == "TAG":
            raise ValueError(f"evaluator {self.name}: {name} is a tag of lm-eval (a list of tasks without a score of "
                             f"its own); list its tasks instead: {', '.join(sorted(entry.tags))}")
        if kind == "GROUP":  # the overrides of its tasks reach them through the group
            tm = self._override_manager(sorted(overrides), True) if overrides else \
                _task_manager(tuple(self.include_path), True)
        elif name in overrides:
            tm = self._override_manager([name], False)
        try:
            with _preserved_rng():
                built = tm.load([name])
        except Exception as e:
            raise self._load_error(name, tm.task_index.get(name, entry), e) from e
        obj = built["groups"][name] if kind == "GROUP" else built["tasks"][name]
        configs = {n: _config_of(x) for n, x in {name: obj, **built["groups"], **built["tasks"]}.items()}
        if kind == "GROUP":  # its aggregated metrics, in the direction its tasks agree on
            ways = {a.metric: {t.higher_is_better().get(a.metric) for t in obj.get_all_tasks()}
                    for a in obj.aggregate_metric_list or []}
            directions = {m: way.pop() if len(way) == 1 else None for m, way in ways.items()}
        else:
            directions = dict(obj.higher_is_better())
        self._built[name] = SimpleNamespace(obj=obj, tm=tm, kind=kind, configs=configs, directions=directions,
                                            files=self._stats(configs))
        return self._built[name]

    @staticmethod
    def _stats(configs: Mapping[str, Mapping]) -> list[str]:
        return sorted({s for cfg in configs.values() for p in task_data_files(cfg) for s in _file_stats(p)})

    def _load_error(self, name: str, entry: Any, e: Exception) -> Exception:
        """A failure to build ``name`` as a clear error where the reason is known: a local data file that is
        missing, or a Hub dataset while the Hub is off (with the override that points the task at a file)."""
        cfg = entry.cfg or {}  # the task's YAML as lm-eval indexed it
        for path in task_data_files(cfg):
            if not _matches(path):
                return FileNotFoundError(f"evaluator {self.name}: task {name} reads {path}, which does not exist")
        path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
        hub = path if isinstance(path, str) and path not in FILE_BUILDERS and not task_data_files(cfg) else None
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if not offline or not (hub or isinstance(e, ConnectionError)):
            return e
        group = entry.kind.name == "GROUP"
        what = f"It reads the Hub dataset {hub}{f' ({subset})' if subset else ''}" if hub else \
            f"{'One of its tasks reads' if group else 'It reads'} a Hub dataset"
        return RuntimeError(
            f"evaluator {self.name}: lm-eval task {name} failed ({type(e).__name__}: {e}). {what} and the Hub is off "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): run once online to fill the datasets cache, or point the task "
            f"at local files: '+eval.lm_eval.task_overrides.{'<task>' if group else name}={{dataset_path: json, "
            "dataset_kwargs: {data_files: {test: <file.jsonl>}}}'")

    def check_inputs(self, names: list[str] | None = None) -> None:
        """Before any model pass: ``include_path`` exists, the task of every metric (``names``: summary names,
        default all) and every ``task_overrides`` entry is known to lm-eval, the local data files they name
        exist, and each task builds (its data loads) and reports its ``metric`` (FileNotFoundError / ValueError /
        RuntimeError naming it)."""
        for name in self._tasks_of(names):
            done, metric = self._loaded(name), self.tasks[name]["metric"]
            if done.kind == "GROUP" and not done.directions:
                raise ValueError(f"evaluator {self.name}: group {name} has no aggregate_metric_list, so lm-eval gives "
                                 "it no score; list its tasks instead")
            if metric.split(",")[0] not in done.directions:
                raise ValueError(f"evaluator {self.name}: task {name} reports {', '.join(done.directions)}, not "
                                 f"metric={metric}")

    def summary_names(self) -> list[str]:
        return [f"{name}_{spec['metric']}" for name, spec in self.tasks.items()]

    def directions(self, names: list[str] | None = None) -> dict[str, bool | None]:
        """For each metric (``names``: summary names, default all), its task's ``higher_is_better``, as lm-eval's
        built task gives it (a group: the one its tasks agree on; None where there is none)."""
        ways = {f"{n}_{self.tasks[n]['metric']}": self._loaded(n).directions.get(self.tasks[n]["metric"].split(",")[0])
                for n in self._tasks_of(names)}
        return {key: way if isinstance(way, bool) else None for key, way in ways.items()}

    def input_paths(self) -> list[Path]:
        """``include_path`` and the local data files ``task_overrides`` point tasks at."""
        found = [*self.include_path, *(f for over in self.task_overrides.values() for f in task_data_files(over))]
        return [Path(p) for p in dict.fromkeys(found)]

    def _settings(self) -> dict:
        chat_template = None
        if self.apply_chat_template and self.tokenizer is not None:
            chat_template = content_hash(getattr(self.tokenizer, "chat_template", None))
        return {"batch_size": self.batch_size, "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn, "system_instruction": self.system_instruction,
                "bootstrap_iters": self.bootstrap_iters, "log_samples": self.log_samples, "lm_args": self.lm_args,
                "chat_template": chat_template}

    def fingerprint(self, name: str, model_id: str) -> str:
        """What the result of task ``name`` depends on: its settings, the configs lm-eval built (after overrides),
        its local data files, the Python files of ``include_path``, the model, the code and lm-eval versions."""
        done = self._loaded(name)
        code_files = [f"{f}:{hashlib.sha256(f.read_bytes()).hexdigest()[:16]}"
                      for folder in self.include_path for f in sorted(Path(folder).rglob("*.py"))]
        return content_hash({"task": self.tasks[name], "configs": done.configs, "files": done.files,
                             "code_files": code_files, "settings": self._settings(),
                             "model": model_fingerprint(model_id), "code": code_version(),
                             "lm_eval": _installed_version()})

    # ----- running ---------------------------------------------------------------------------------
    def _run_task(self, lm: Any, name: str) -> dict:
        """The EVAL file's entry of task ``name``, run by ``simple_evaluate`` on the task lm-eval built."""
        import lm_eval

        spec, done = self.tasks[name], self._loaded(name)
        log.info("%s: running lm-eval task %s", self.name, name)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[done.obj], num_fewshot=spec["num_fewshot"], batch_size=self.batch_size,
            limit=spec["limit"], bootstrap_iters=self.bootstrap_iters, log_samples=self.log_samples,
            apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn,
            system_instruction=self.system_instruction, task_manager=done.tm)
        if out is None:
            raise RuntimeError(f"evaluator {self.name}: lm-eval returned no result for {name} (not its main process)")
        results, samples = out.get("results") or {}, out.get("samples") or {}

        def about(task: str) -> dict:
            metrics = {(key.split(",")[0] if key.endswith(",none") else key): None if v == "N/A" else _plain(v)
                       for key, v in (results.get(task) or {}).items() if "," in key}
            entry: dict[str, Any] = {"metrics": metrics}
            for key, field in (("num_fewshot", "n-shot"), ("n_samples", "n-samples"), ("version", "versions"),
                               ("higher_is_better", "higher_is_better"), ("config", "configs")):
                if task in (out.get(field) or {}):
                    entry[key] = _plain(out[field][task])
            if task in samples:
                entry["value_by_index"] = self._samples(samples[task])
            return entry

        details = about(name)
        value = details["metrics"].get(spec["metric"])
        entry = {"agg_value": finite_or_none(value), "metric": spec["metric"],
                 "stderr": finite_or_none(details["metrics"].get(f"{spec['metric']}_stderr")), **details}
        if value is None:
            entry["note"] = (f"lm-eval reported no {spec['metric']} for {name}; it reported: "
                             f"{', '.join(entry['metrics']) or 'nothing'}")
        subtasks = [t for t in {**results, **samples} if t != name]
        if subtasks:
            entry["subtasks"] = {t: about(t) for t in subtasks}
        return entry

    @staticmethod
    def _samples(records: list) -> dict:
        """Per-document records keyed by document index (``<index>,<filter>`` for filters other than none)."""
        out = {}
        for s in records:
            key = str(s.get("doc_id")) if s.get("filter", "none") == "none" else f"{s.get('doc_id')},{s.get('filter')}"
            resps = s.get("filtered_resps") or []
            rec: dict[str, Any] = {"target": _plain(s.get("target"))}
            if resps and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], (int, float))
                             for r in resps):  # loglikelihood requests: (sum log p(continuation), greedy?)
                rec["loglikelihoods"], rec["is_greedy"] = [float(r[0]) for r in resps], [bool(r[1]) for r in resps]
            else:
                rec["responses"] = _plain(resps)
            rec.update({metric: _plain(s.get(metric)) for metric in s.get("metrics") or []})
            rec["doc_hash"], rec["prompt_hash"] = s.get("doc_hash"), s.get("prompt_hash")
            out[key] = rec
        return out

    def _compute(self, model: torch.nn.Module, names: list[str]) -> dict:
        from lm_eval.models.huggingface import HFLM

        tokenizer = self.tokenizer
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer = copy.deepcopy(tokenizer)  # HFLM gives a tokenizer without one a pad token: not ours
        was_training, hflm_log, known = model.training, logging.getLogger(HFLM.__module__), _KnownWarnings()
        # lm-eval scores padded batches without an attention mask: its tokens cannot be told from its padding
        tokens_unknown("lm-eval runs its own padded batches without an attention mask: no exact token count")
        model.eval()
        try:
            # no_grad rather than inference_mode: a buffer a model creates lazily in an inference-mode
            # forward could not be used by the training's backward pass afterwards.
            with torch.no_grad():
                hflm_log.addFilter(known)
                try:
                    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **self.lm_args)
                finally:
                    hflm_log.removeFilter(known)
                return {name: self._run_task(lm, name) for name in names}
        finally:
            model.train(was_training)

    def evaluate(self, model: torch.nn.Module, *, output_dir: str | os.PathLike | None = None,
                 model_id: str | None = None, overwrite: bool | None = None, only: list[str] | None = None,
                 save: bool = True) -> EvalResult:
        """Run every task (or those of the metrics ``only``, summary names, afresh), reusing an earlier result of
        the same fingerprint in ``output_dir``; the result, one entry per metric (``<task>_<metric>``), is saved
        there once (``save``). With several processes the main one runs lm-eval and writes the files while the
        others wait; every process returns the result."""
        tasks = self._tasks_of(only)
        store = ResultStore(Path(output_dir or self.cfg.get("output_dir") or "."), self.name)
        overwrite = only is not None or bool(self.cfg.get("overwrite", False) if overwrite is None else overwrite)
        model_id = evaluated_model_id(model) if model_id is None else model_id
        if self.tokenizer is None:
            raise ValueError(f"evaluator {self.name}: no tokenizer (build it with get_evaluators(..., tokenizer=...))")
        if is_sharded(model):
            raise ValueError(f"evaluator {self.name}: lm-eval runs the model on the main process alone, which weights "
                             "split over the processes (FSDP, DeepSpeed ZeRO-3) do not allow; evaluate the saved model "
                             "with src/eval.py instead")
        with _preserved_rng():
            return on_main_process(lambda: self._evaluate_main(model, store, tasks, model_id, overwrite, save))

    def _evaluate_main(self, model: torch.nn.Module, store: ResultStore, tasks: list[str], model_id: str,
                       overwrite: bool, save: bool) -> EvalResult:
        metric_of = {task: f"{task}_{self.tasks[task]['metric']}" for task in tasks}
        names = list(metric_of.values())
        fingerprints = {metric_of[task]: self.fingerprint(task, model_id) for task in tasks}
        reused, _ = store.reusable(fingerprints, overwrite)
        if reused:
            log.info("%s: reusing %d task result(s) from %s: %s", self.name, len(reused), store.eval_path,
                     ", ".join(reused))
        to_compute = [n for n in names if n not in reused]
        if to_compute:
            self.check_inputs(to_compute)
            computed = self._compute(model, [self.task_of[n] for n in to_compute])
            reused = {**reused, **{metric_of[task]: entry for task, entry in computed.items()}}
        results = {n: reused[n] for n in names}
        summary = {n: finite_or_none(results[n].get("agg_value")) for n in names}
        meta = {"model": model_id, "code_version": code_version(), "evaluator": self.name,
                "lm_eval_version": _installed_version(), "tasks": {t: dict(self.tasks[t]) for t in tasks},
                "settings": {k: v for k, v in self._settings().items() if k != "chat_template"},
                "include_path": self.include_path, "task_overrides": self.task_overrides, "timestamp": utc_timestamp(),
                "fingerprints": fingerprints,
                "config_hash": content_hash({k: v for k, v in self.cfg.items() if k not in ("output_dir", "overwrite")}),
                "higher_is_better": self.directions(names),
                "roles": self.roles_meta()}
        result = EvalResult(self.name, {n: results[n] for n in names}, summary, meta)
        if save:
            store.save(result)
        for name in names:
            if results[name].get("note"):
                log.warning("%s: %s", self.name, results[name]["note"])
        return result
