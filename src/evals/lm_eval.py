"""``LMEvalEvaluator`` (``eval=lm_eval``): EleutherAI's lm-evaluation-harness on the in-memory model.

For WMDP (Li et al. 2024, arXiv:2403.03218: hazardous biology and cybersecurity knowledge, which an
unlearned model should lose) and MMLU (general knowledge, which it should keep), or any other
lm-eval task. The model and tokenizer in memory are wrapped in lm-eval's ``HFLM`` and each configured
task is run with ``lm_eval.simple_evaluate``; nothing is reloaded from disk, so it works on a model
being unlearned (``trainer.args.eval_strategy``) as well as from ``src/eval.py``.

Every setting of the config reaches lm-eval (configs/eval/lm_eval.yaml, docs/evaluation.md):

- ``tasks``: task or group names, or mappings ``{name, num_fewshot, metric, limit}`` (per-task values
  over the top-level ones);
- ``batch_size``, ``num_fewshot`` (``null``: the task's own), ``limit`` (documents per task),
  ``apply_chat_template`` / ``fewshot_as_multiturn`` / ``system_instruction``, ``bootstrap_iters``,
  ``log_samples``, ``lm_args`` (more ``HFLM`` arguments: ``max_length``, ``add_bos_token``, ...);
- ``include_path``: folders of task YAML files of one's own;
- ``task_overrides``: ``{task: {config key: value}}``, e.g. a local data file for ``wmdp_bio``. Each
  overridden task gets a generated YAML, in a temporary folder added last to the task search path,
  that ``include``s the task's own YAML and sets the keys (lm-eval merges an included file under the
  including one). A ``num_fewshot`` goes the same way, so it applies even to tasks whose YAML pins
  zero shots (WMDP does; ``simple_evaluate``'s own ``num_fewshot`` leaves those alone).

Files, as for the other evaluators: ``LMEval_EVAL.json`` (per task its metrics, per-sample records,
``_meta``) and ``LMEval_SUMMARY.json`` (``<task>_<metric>``). A task result in an earlier EVAL file is
reused when its fingerprint (task settings and YAML configs, local data files, model, prompt settings,
lm-eval and code versions) is unchanged and ``overwrite`` is false.
"""

from __future__ import annotations

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
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

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
from trainer.utils import is_sharded, on_main_process

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


def _import_lm_eval() -> Any:
    """The ``lm_eval`` package, or an ImportError that says how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"eval=lm_eval runs EleutherAI's lm-evaluation-harness, which is not installed: "
                          f"{INSTALL_HINT}") from e
    return lm_eval


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
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----- lm-eval's task index ------------------------------------------------------------------------
@functools.cache
def _builtin_index() -> dict:
    """lm-eval's own tasks, ``{name: Entry}``: parsing its ~10,000 YAML files takes seconds, so once per process."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([Path(lm_eval.tasks.__file__).parent])


def _task_manager(paths: list[str]) -> Any:
    """A ``TaskManager`` over lm-eval's tasks plus the folders ``paths`` (later ones win, as in lm-eval).

    Only ``paths`` are parsed here; the built-in index comes from ``_builtin_index``. Should the
    TaskManager's internals differ from the pinned release's, a plain ``TaskManager`` is built instead.
    """
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=list(paths) or None, include_defaults=False)
    if not all(hasattr(tm, a) for a in ("_index", "_all_tasks", "_all_subtasks", "_all_groups", "_all_tags")):
        return TaskManager(include_path=list(paths) or None)
    index = {**_builtin_index(), **tm._index}  # a new dict: loading a group adds names to it
    kinds = defaultdict(list)
    for name, entry in index.items():
        kinds[entry.kind.name].append(name)
    tm._index = index
    tm._all_tasks = sorted(index)
    tm._all_subtasks = sorted(kinds["TASK"] + kinds["PY_TASK"])
    tm._all_groups = sorted(kinds["GROUP"])
    tm._all_tags = sorted(kinds["TAG"])
    return tm


def _entry_config(entry: Any) -> dict:
    """The config of an index entry as its YAML files give it (includes merged, ``!function`` as paths)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.yaml_path is not None:
        return load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    return copy.deepcopy(entry.cfg or {})


def _group_fields() -> set[str]:
    from dataclasses import fields

    from lm_eval.config.group import GroupConfig

    return {f.name for f in fields(GroupConfig)}


def _reached_configs(name: str, index: Mapping, inherited: dict | None = None, out: dict | None = None,
                     depth: int = 0) -> dict[str, dict]:
    """Every config that running ``name`` reads: ``{task or group name: config}``, the keys a group passes to
    its members merged in as lm-eval merges them (members' own keys < the group's < the caller's)."""
    out = {} if out is None else out
    inherited = inherited or {}
    entry = index.get(name)
    if entry is None or depth > 20:
        return out
    kind = entry.kind.name
    if kind == "TAG":
        for member in sorted(entry.tags):
            _reached_configs(member, index, inherited, out, depth + 1)
        return out
    cfg = _entry_config(entry)
    if kind != "GROUP":
        out[name] = {**cfg, **inherited}
        return out
    out[name] = {**cfg, "_inherited": inherited}
    group_fields = _group_fields()
    passed = {**{k: v for k, v in cfg.items() if k not in group_fields}, **inherited}
    members = cfg.get("task")
    for item in members if isinstance(members, list) else []:
        if isinstance(item, str):
            _reached_configs(item, index, passed, out, depth + 1)
        elif isinstance(item, Mapping):
            key = "group" if "group" in item else "task"
            member, extra = item.get(key), {k: v for k, v in item.items() if k != key}
            if member in index:
                _reached_configs(member, index, {**passed, **extra}, out, depth + 1)
            else:  # an inline task or group: its config is the item itself
                out[f"{name}::{member}"] = {**passed, **dict(item)}
    return out


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


def _file_stats(path: str) -> list[str]:
    """``path:size:mtime`` of a local data file (each match of a glob, each file of a folder)."""
    expanded = os.path.expanduser(path)
    matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
    stats = []
    for match in matches:
        p = Path(match)
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []):
            st = f.stat()
            stats.append(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}")
    return stats


def _reads_hub(cfg: Mapping) -> str | None:
    """The Hub dataset a task config reads (``path`` or ``path/name``), or None for local data."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or path in FILE_BUILDERS or task_data_files(cfg):
        return None
    name = cfg.get("dataset_name")
    return f"{path} ({name})" if name else path


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
        root_cfg: the run's full config (unused; accepted like the other evaluators).
    """

    default_name = "LMEval"

    def __init__(self, cfg: Mapping, tokenizer: Any = None, template_args: Any = None,
                 root_cfg: DictConfig | None = None):
        lm_eval = _import_lm_eval()
        if _installed_version() != LM_EVAL_VERSION:
            log.warning("lm-eval %s is installed; this evaluator was tested with %s (%s)",
                        getattr(lm_eval, "__version__", _installed_version()), LM_EVAL_VERSION, INSTALL_HINT)
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        super().__init__(cfg, tokenizer, template_args if template_args is not None else {})
        unknown = sorted(set(self.cfg) - CONFIG_KEYS)
        if unknown:
            raise ValueError(f"evaluator {self.name}: unknown key(s) {unknown}; valid: {sorted(CONFIG_KEYS)}")

        self.batch_size = self.cfg.get("batch_size", 8)
        bs = self.batch_size
        if not (_nonneg_int(bs) and bs >= 1 or isinstance(bs, str) and
                (bs == "auto" or bs.startswith("auto:") and bs[5:].replace(".", "", 1).isdigit())):
            raise ValueError(f"evaluator {self.name}: batch_size={bs!r}; give a positive number or 'auto' (lm-eval's "
                             "search for the largest batch that fits, 'auto:N' to search N times)")
        self.bootstrap_iters = self.cfg.get("bootstrap_iters", 100000)
        if not _nonneg_int(self.bootstrap_iters):
            raise ValueError(f"evaluator {self.name}: bootstrap_iters={self.bootstrap_iters!r}; give a number >= 0")
        self.log_samples = self.cfg.get("log_samples", True)
        if not isinstance(self.log_samples, bool):
            raise ValueError(f"evaluator {self.name}: log_samples={self.log_samples!r}; give true or false")
        self.lm_args = dict(self.cfg.get("lm_args") or {})
        if set(self.lm_args) & OWN_LM_ARGS:
            raise ValueError(f"evaluator {self.name}: lm_args may not set {sorted(set(self.lm_args) & OWN_LM_ARGS)} "
                             "(the evaluator passes the in-memory model, its tokenizer and batch_size itself)")

        chat = self.cfg.get("apply_chat_template", False)
        if chat is None:  # the model config's prompt format
            chat = bool(self.template_args.get("apply_chat_template", False))
        if not isinstance(chat, (bool, str)):
            raise ValueError(f"evaluator {self.name}: apply_chat_template={chat!r}; give true, false, null (the "
                             "model config's template_args.apply_chat_template) or a chat template name")
        self.apply_chat_template = chat
        multiturn = self.cfg.get("fewshot_as_multiturn")
        if multiturn is None:  # as lm-eval's command line: on with a chat template
            multiturn = bool(chat)
        if not isinstance(multiturn, bool) or multiturn and not chat:
            raise ValueError(f"evaluator {self.name}: fewshot_as_multiturn={multiturn!r} needs a chat template "
                             f"(apply_chat_template is {chat!r}); give false or null")
        self.fewshot_as_multiturn = multiturn
        self.system_instruction = self.cfg.get("system_instruction")
        if self.system_instruction is not None and not isinstance(self.system_instruction, str):
            raise ValueError(f"evaluator {self.name}: system_instruction must be text or null")

        include = self.cfg.get("include_path")
        include = [] if include is None else [include] if isinstance(include, str) else list(include)
        if not all(isinstance(p, str) for p in include):
            raise ValueError(f"evaluator {self.name}: include_path={include!r}; give a folder, a list of folders or null")
        self.include_path = [str(Path(p).expanduser().resolve()) for p in include]

        overrides = self.cfg.get("task_overrides") or {}
        if not isinstance(overrides, Mapping) or not all(isinstance(v, Mapping) for v in overrides.values()):
            raise ValueError(f"evaluator {self.name}: task_overrides must map task names to mappings of task config "
                             "keys, e.g. {wmdp_bio: {dataset_path: json, dataset_kwargs: {data_files: {test: <file>}}}}")
        for task, over in overrides.items():
            if {"task", "group", "include"} & set(over):
                raise ValueError(f"evaluator {self.name}: task_overrides.{task} may not set task, group or include")
        self.task_overrides = {str(k): dict(v) for k, v in overrides.items()}

        self.tasks: dict[str, dict] = {}
        tasks = self.cfg.get("tasks")
        if isinstance(tasks, (str, Mapping)):
            tasks = [tasks]
        if not tasks:
            raise ValueError(f"evaluator {self.name}: no tasks configured (e.g. tasks: [wmdp_bio, wmdp_cyber, mmlu])")
        for item in tasks:
            spec = self._task_spec(item)
            if spec["name"] in self.tasks:
                raise ValueError(f"evaluator {self.name}: task {spec['name']} is listed twice")
            self.tasks[spec["name"]] = spec
        self._settle_roles()

    def _task_spec(self, item: Any) -> dict:
        """``{name, num_fewshot, metric, limit}`` of a ``tasks`` entry, the top-level values filling the gaps."""
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"evaluator {self.name}: task {item!r}; give a task name or a mapping with a name")
        unknown = sorted(set(item) - TASK_KEYS)
        if unknown:
            raise ValueError(f"evaluator {self.name}: task {item['name']}: unknown key(s) {unknown}; valid: "
                             f"{sorted(TASK_KEYS)} (other task config keys go under task_overrides.{item['name']})")
        spec = {"name": item["name"]}
        for key, default in (("num_fewshot", None), ("metric", "acc"), ("limit", None)):
            spec[key] = item[key] if key in item else self.cfg.get(key, default)
        where = f"evaluator {self.name}: task {spec['name']}"
        if spec["num_fewshot"] is not None and not _nonneg_int(spec["num_fewshot"]):
            raise ValueError(f"{where}: num_fewshot={spec['num_fewshot']!r}; give a number >= 0 or null (the task's own)")
        if not isinstance(spec["metric"], str) or not spec["metric"]:
            raise ValueError(f"{where}: metric={spec['metric']!r}; give a metric name such as acc or acc_norm")
        limit = spec["limit"]
        if limit is not None and not (_nonneg_int(limit) and limit >= 1 or
                                      isinstance(limit, float) and 0 < limit < 1):
            raise ValueError(f"{where}: limit={limit!r}; give a number of documents >= 1, a fraction below 1, or null")
        over = self.task_overrides.get(spec["name"], {})
        if spec["num_fewshot"] is not None and "num_fewshot" in over and over["num_fewshot"] != spec["num_fewshot"]:
            raise ValueError(f"{where}: num_fewshot is {spec['num_fewshot']} but task_overrides.{spec['name']}."
                             f"num_fewshot is {over['num_fewshot']}; set it in one place")
        return spec

    # ----- tasks -----------------------------------------------------------------------------------
    def _yaml_overrides(self) -> dict[str, dict]:
        """The keys each generated task YAML sets: ``task_overrides`` plus each task's ``num_fewshot``."""
        out = {name: dict(over) for name, over in self.task_overrides.items()}
        for name, spec in self.tasks.items():
            if spec["num_fewshot"] is not None:
                out.setdefault(name, {})["num_fewshot"] = spec["num_fewshot"]
        return out

    def _unknown_task_error(self, name: str, index: Mapping, what: str) -> ValueError:
        close = difflib.get_close_matches(name, list(index), n=5)
        where = f" or in include_path {self.include_path}" if self.include_path else " (add include_path=<folder> for tasks of your own)"
        return ValueError(f"evaluator {self.name}: {what} {name!r} is no task of lm-eval {_installed_version()}{where}"
                          + (f"; close: {', '.join(close)}" if close else ""))

    @contextlib.contextmanager
    def _prepared(self) -> Iterator[SimpleNamespace]:
        """The task manager (lm-eval's tasks, ``include_path``, the generated override YAMLs, which exist until
        the block ends) and the configs each configured task reads."""
        import yaml

        for folder in self.include_path:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"evaluator {self.name}: include_path {folder} is not a folder")
        base = _task_manager(self.include_path)
        overrides = self._yaml_overrides()
        for name in self.tasks:
            if name not in base.task_index:
                raise self._unknown_task_error(name, base.task_index, "task")
        for name in overrides:
            if name not in base.task_index:
                raise self._unknown_task_error(name, base.task_index, "task_overrides entry")
        with tempfile.TemporaryDirectory(prefix="lm_eval_overrides-") as folder:
            for i, (name, over) in enumerate(sorted(overrides.items())):
                entry = base.task_index[name]
                if entry.yaml_path is None:
                    raise ValueError(f"evaluator {self.name}: {name} is a {entry.kind.name.lower()} with no YAML file of "
                                     "its own, so it cannot be overridden; override its tasks one by one")
                text = yaml.safe_dump({"include": str(Path(entry.yaml_path).resolve()), **_plain(over)}, sort_keys=False)
                (Path(folder) / f"override_{i}.yaml").write_text(text, encoding="utf-8")
            tm = _task_manager([*self.include_path, folder]) if overrides else base
            configs = {name: _reached_configs(name, tm.task_index) for name in self.tasks}
            kinds = {name: tm.task_index[name].kind.name for name in self.tasks}
            yield SimpleNamespace(tm=tm, configs=configs, kinds=kinds)

    def _check(self, prep: SimpleNamespace, names: list[str]) -> None:
        for name in names:
            spec, configs = self.tasks[name], prep.configs[name]
            if prep.kinds[name] == "TAG":
                members = sorted(configs)
                raise ValueError(f"evaluator {self.name}: {name} is a tag of lm-eval (a list of tasks without a score of "
                                 f"its own); list its tasks instead: {', '.join(members)}")
            top = configs.get(name, {})
            if prep.kinds[name] == "GROUP":
                listed = top.get("aggregate_metric_list") or []
                listed = [listed] if isinstance(listed, Mapping) else listed
                offered = [m.get("metric") for m in listed if isinstance(m, Mapping)]
                if not offered:
                    raise ValueError(f"evaluator {self.name}: group {name} has no aggregate_metric_list, so lm-eval gives "
                                     "it no score; list its tasks instead")
            else:
                offered = [m.get("metric") for m in (top.get("metric_list") or []) if isinstance(m, Mapping)]
            if offered and spec["metric"] not in offered:
                raise ValueError(f"evaluator {self.name}: task {name} reports {', '.join(map(str, offered))}, not "
                                 f"metric={spec['metric']}")
            for sub, cfg in configs.items():
                for path in task_data_files(cfg):
                    expanded = os.path.expanduser(path)
                    if not (glob.glob(expanded, recursive=True) if glob.has_magic(expanded) else os.path.exists(expanded)):
                        raise FileNotFoundError(f"evaluator {self.name}: task {sub}{f' (of {name})' if sub != name else ''} "
                                                f"reads {path}, which does not exist")

    def check_inputs(self, names: list[str] | None = None) -> None:
        """Before any model pass: ``include_path`` exists, every task (``names``, default all) and every
        ``task_overrides`` entry is known to lm-eval, each task reports its ``metric``, and every local data
        file the tasks read exists (FileNotFoundError / ValueError naming it)."""
        with self._prepared() as prep:
            self._check(prep, list(self.tasks) if names is None else names)

    def summary_names(self) -> list[str]:
        return [f"{name}_{spec['metric']}" for name, spec in self.tasks.items()]

    def directions(self) -> dict[str, bool | None]:
        """Each task's ``higher_is_better`` for its metric, as its lm-eval config declares it (None if it does not)."""
        with self._prepared() as prep:
            return self._directions(prep, list(self.tasks))

    def _directions(self, prep: SimpleNamespace, names: list[str]) -> dict[str, bool | None]:
        out = {}
        for name in names:
            spec, top = self.tasks[name], prep.configs[name].get(name, {})
            listed = top.get("metric_list") or top.get("aggregate_metric_list") or []
            listed = [listed] if isinstance(listed, Mapping) else listed
            given = [m.get("higher_is_better") for m in listed
                     if isinstance(m, Mapping) and m.get("metric") == spec["metric"]]
            out[f"{name}_{spec['metric']}"] = given[0] if given and isinstance(given[0], bool) else None
        return out

    def input_paths(self) -> list[Path]:
        """``include_path`` and the local data files ``task_overrides`` point tasks at."""
        found = [*self.include_path]
        for over in self.task_overrides.values():
            found += task_data_files(over)
        return [Path(p) for p in dict.fromkeys(found)]

    # ----- fingerprints ----------------------------------------------------------------------------
    def _code_files(self) -> list[str]:
        """Content hash of the Python files of ``include_path`` (``!function`` hooks of local tasks)."""
        out = []
        for folder in self.include_path:
            for f in sorted(Path(folder).rglob("*.py")):
                out.append(f"{f}:{hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
        return out

    def _settings(self) -> dict:
        chat_template = None
        if self.apply_chat_template and self.tokenizer is not None:
            chat_template = content_hash(getattr(self.tokenizer, "chat_template", None))
        return {"batch_size": self.batch_size, "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn, "system_instruction": self.system_instruction,
                "bootstrap_iters": self.bootstrap_iters, "log_samples": self.log_samples, "lm_args": self.lm_args,
                "chat_template": chat_template}

    def fingerprint(self, name: str, model_id: str, prep: SimpleNamespace) -> str:
        configs = prep.configs[name]
        files = sorted({s for cfg in configs.values() for p in task_data_files(cfg) for s in _file_stats(p)})
        return content_hash({"task": self.tasks[name], "configs": configs, "files": files, "code_files": self._code_files(),
                      "settings": self._settings(), "model": model_fingerprint(model_id), "code": code_version(),
                      "lm_eval": _installed_version()})

    # ----- running ---------------------------------------------------------------------------------
    def _check_sharding(self, model: torch.nn.Module) -> None:
        if is_sharded(model):
            raise ValueError(f"evaluator {self.name}: lm-eval runs the model on the main process alone, which weights "
                             "split over the processes (FSDP, DeepSpeed ZeRO-3) do not allow; evaluate the saved model "
                             "with src/eval.py instead")

    def _run_task(self, lm: Any, name: str, prep: SimpleNamespace) -> dict:
        import lm_eval

        spec = self.tasks[name]
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[name], num_fewshot=spec["num_fewshot"], batch_size=self.batch_size,
                limit=spec["limit"], bootstrap_iters=self.bootstrap_iters, log_samples=self.log_samples,
                apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn,
                system_instruction=self.system_instruction, task_manager=prep.tm)
        except Exception as e:
            hub = sorted({h for cfg in prep.configs[name].values() if (h := _reads_hub(cfg))})
            offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                          for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            if hub and offline:
                raise RuntimeError(
                    f"evaluator {self.name}: lm-eval task {name} failed ({type(e).__name__}: {e}). It reads the Hub "
                    f"dataset {', '.join(hub[:3])}{' ...' if len(hub) > 3 else ''} and the Hub is off "
                    "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): run once online to fill the datasets cache, or point the "
                    f"task at local files: '+eval.lm_eval.task_overrides.{name}={{dataset_path: json, "
                    "dataset_kwargs: {data_files: {test: <file.jsonl>}}}'") from e
            raise
        if out is None:
            raise RuntimeError(f"evaluator {self.name}: lm-eval returned no result for {name} (not its main process)")
        return self._entry(name, out)

    def _entry(self, name: str, out: Mapping) -> dict:
        """The EVAL file's entry of task ``name`` from a ``simple_evaluate`` result."""
        spec = self.tasks[name]
        results = out.get("results") or {}
        samples = out.get("samples") or {}

        def metrics_of(row: Mapping) -> dict:
            found = {}
            for key, value in row.items():
                if "," not in key:
                    continue
                metric, filt = key.split(",", 1)
                found[metric if filt == "none" else key] = None if value == "N/A" else _plain(value)
            return found

        def about(task: str) -> dict:
            entry: dict[str, Any] = {"metrics": metrics_of(results.get(task) or {})}
            for key, field in (("num_fewshot", "n-shot"), ("n_samples", "n-samples"), ("version", "versions"),
                               ("higher_is_better", "higher_is_better")):
                if task in (out.get(field) or {}):
                    entry[key] = _plain(out[field][task])
            if task in (out.get("configs") or {}):
                entry["config"] = _plain(out["configs"][task])
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
        subtasks = [t for t in results if t != name] + [t for t in samples if t not in results and t != name]
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
                rec["loglikelihoods"] = [float(r[0]) for r in resps]
                rec["is_greedy"] = [bool(r[1]) for r in resps]
            else:
                rec["responses"] = _plain(resps)
            for metric in s.get("metrics") or []:
                rec[metric] = _plain(s.get(metric))
            rec["doc_hash"], rec["prompt_hash"] = s.get("doc_hash"), s.get("prompt_hash")
            out[key] = rec
        return out

    def _compute(self, model: torch.nn.Module, names: list[str], prep: SimpleNamespace, tokenizer: Any) -> dict:
        from lm_eval.models.huggingface import HFLM

        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer = copy.deepcopy(tokenizer)  # HFLM gives a tokenizer without one a pad token: not ours
        results = {}
        was_training = model.training
        model.eval()
        try:
            # no_grad rather than inference_mode: a buffer a model creates lazily in an inference-mode
            # forward could not be used by the training's backward pass afterwards.
            with torch.no_grad():
                hflm_log, known = logging.getLogger(HFLM.__module__), _KnownWarnings()
                hflm_log.addFilter(known)
                try:
                    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **self.lm_args)
                finally:
                    hflm_log.removeFilter(known)
                for name in names:
                    log.info("%s: running lm-eval task %s", self.name, name)
                    results[name] = self._run_task(lm, name, prep)
        finally:
            model.train(was_training)
        return results

    def evaluate(self, model: torch.nn.Module, *, output_dir: str | os.PathLike | None = None,
                 model_id: str | None = None, overwrite: bool | None = None, only: list[str] | None = None,
                 save: bool = True) -> EvalResult:
        """Run every task (or ``only`` these, afresh), reusing an earlier result of the same fingerprint in
        ``output_dir``; the result is saved there once (``save``).

        With several processes the main one runs lm-eval and writes the files while the others wait; every
        process returns the result.
        """
        if only is not None and (not only or [n for n in only if n not in self.tasks]):
            raise ValueError(f"evaluator {self.name}: only={list(only)}; give tasks of this benchmark: "
                             f"{', '.join(self.tasks)}")
        store = ResultStore(Path(output_dir or self.cfg.get("output_dir") or "."), self.name)
        overwrite = only is not None or bool(self.cfg.get("overwrite", False) if overwrite is None else overwrite)
        if model_id is None:
            model_id = evaluated_model_id(model)
        if self.tokenizer is None:
            raise ValueError(f"evaluator {self.name}: no tokenizer (build it with get_evaluators(..., tokenizer=...))")
        self._check_sharding(model)
        names = list(self.tasks) if only is None else list(only)
        with _preserved_rng():
            return on_main_process(lambda: self._evaluate_main(model, store, names, model_id, overwrite, save))

    def _evaluate_main(self, model: torch.nn.Module, store: ResultStore, names: list[str], model_id: str,
                       overwrite: bool, save: bool) -> EvalResult:
        with self._prepared() as prep:
            fingerprints = {name: self.fingerprint(name, model_id, prep) for name in names}
            reused, _ = store.reusable(fingerprints, overwrite)
            if reused:
                log.info("%s: reusing %d task result(s) from %s: %s", self.name, len(reused), store.eval_path,
                         ", ".join(reused))
            to_compute = [n for n in names if n not in reused]
            self._check(prep, to_compute)
            results = dict(reused)
            if to_compute:
                results.update(self._compute(model, to_compute, prep, self.tokenizer))
            directions = self._directions(prep, names)
        summary = {f"{name}_{self.tasks[name]['metric']}": finite_or_none(results[name].get("agg_value"))
                   for name in names}
        meta = {
            "model": model_id, "code_version": code_version(), "evaluator": self.name,
            "lm_eval_version": _installed_version(),
            "tasks": {name: dict(self.tasks[name]) for name in names},
            "settings": {k: v for k, v in self._settings().items() if k != "chat_template"},
            "include_path": self.include_path, "task_overrides": self.task_overrides,
            "timestamp": utc_timestamp(),
            "fingerprints": fingerprints,
            "config_hash": content_hash({k: v for k, v in self.cfg.items() if k not in ("output_dir", "overwrite")}),
            "higher_is_better": directions,
            "roles": self.roles_meta(),
        }
        result = EvalResult(self.name, {name: results[name] for name in names}, summary, meta)
        if save:
            store.save(result)
        for name in names:
            if results[name].get("note"):
                log.warning("%s: %s", self.name, results[name]["note"])
        return result
