"""Every command the documentation shows must at least compose.

The commands are collected from README.md, docs/*.md (fenced code blocks and inline code) and the comments of
configs/**/*.yaml: each line (``\\`` continuations joined) that runs ``python src/<script>.py``, or a launcher
(``torchrun ...``, ``accelerate launch ...``) on ``src/<script>.py``; the command is taken from ``src/`` on.
Placeholders (``<model folder>``, ``<retain model's TOFU_EVAL.json or null>``, ``<name>``, ...) become test
values, ``...`` elisions are dropped and ``[optional parts]`` kept. Then, without running anything:

- a Hydra entry point (``@hydra.main``): the overrides get the pre-processing its ``__main__`` block applies
  (``trainer.check_moved_overrides``, ``resolvers.command_line_overrides``), Hydra's compose API composes the
  config (one combination of a ``-m`` sweep: the first value of each swept override), ``resolvers.compose_names``
  composes the names in it and every interpolation is resolved;
- an argparse script: its own parser reads the arguments, and the work is never reached.

The configs a worked example of the documentation adds (a ``yaml`` block opening with ``# configs/<file>``
that the tree lacks: ``trainer=CustomMethod``, ``eval=toy``) are put on Hydra's search path for its commands.
A command that needs a Hydra plugin of an optional extra (the Optuna sweeper, the SLURM launcher) is only
checked where the plugin is installed. Every failing command is reported at once, with where it is documented.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import re
import shlex
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from conftest import REPO
from resolvers import command_line_overrides, compose_names, register_resolvers
from trainer import check_moved_overrides

CONFIGS = REPO / "configs"


# ----- collecting the commands ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocCommand:
    where: str  # <file>:<line>, relative to the repository
    text: str  # the command line as documented (continuations joined), from src/<script>.py on

    @property
    def script(self) -> str:
        return self.text.split(None, 1)[0]


# a launcher, its own options, then the script: python src/x.py, torchrun --nproc_per_node 8 src/x.py, ...
# (inside quotes: ``bash -c '...'``, or inline code shown in a fenced block, whose closing quote ends it)
_COMMAND = re.compile(r"(?:^|(?<=[\s'\"`]))(?P<quote>['\"`])?(?:python3?|torchrun|accelerate\s+launch)\s+"
                      r"(?:\S+\s+)*?(?P<script>src/\w+\.py)(?=[\s'\"`]|$)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def _joined(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(line number, text) with every line that ends in a backslash joined to the next."""
    start, parts = None, []
    for number, line in lines:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(p.strip() for p in parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(p.strip() for p in parts)


def _command_in(text: str) -> str | None:
    """The command in ``text`` from ``src/<script>.py`` on (a closing quote of ``bash -c '...'`` dropped)."""
    match = _COMMAND.search(text)
    if not match:
        return None
    rest = text[match.start("script"):].strip()
    quote = match.group("quote")
    if quote and quote in rest:
        rest = rest[:rest.index(quote)]
    return rest


def _markdown_snippets(path: Path) -> Iterator[tuple[int, str]]:
    """Lines of fenced code blocks (continuations joined), and inline code spans of the rest of the text."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []
    in_fence = False
    for number, line in enumerate(lines, 1):
        if _FENCE.match(line):
            if in_fence:
                yield from _joined(fenced)
                fenced = []
            in_fence = not in_fence
            continue
        (fenced if in_fence else prose).append((number, line))
    yield from _joined(fenced)
    # inline code may run over a line break inside a paragraph: paragraphs are searched whole
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            text = "\n".join(line for _, line in paragraph)
            for span in _INLINE_CODE.finditer(text):
                first = paragraph[text.count("\n", 0, span.start())][0]
                yield first, " ".join(span.group(2).split())
        paragraph = []


def _yaml_snippets(path: Path) -> Iterator[tuple[int, str]]:
    """The comment lines of a config (continuations joined), without the ``#``."""
    comments = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("#"):
            comments.append((number, line.lstrip()[1:]))
        else:
            yield from _joined(comments)
            comments = []
    yield from _joined(comments)


def documented_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(CONFIGS.rglob("*.yaml"))]


def collect_commands() -> list[DocCommand]:
    found = []
    for path in documented_files():
        snippets = _yaml_snippets(path) if path.suffix == ".yaml" else _markdown_snippets(path)
        for number, text in snippets:
            command = _command_in(text)
            if command:
                found.append(DocCommand(f"{path.relative_to(REPO)}:{number}", command))
    return found


def documented_configs() -> dict[str, str]:
    """Config files the documentation adds (a worked example's ``yaml`` block that opens with its path,
    ``# configs/trainer/CustomMethod.yaml``) and the tree does not have: path under configs/ -> text (the path
    line is the block's caption, not part of the file: Hydra reads ``# @package`` only from the first lines)."""
    found = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for body in re.findall(r"^```ya?ml\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M):
            first, _, rest = body.partition("\n")
            match = re.fullmatch(r"#\s*configs/(\S+\.yaml)\s*", first)
            if match and not (CONFIGS / match.group(1)).exists():
                found[match.group(1)] = rest
    return found


# ----- from the documented text to arguments ----------------------------------------------------------------
class CommandError(Exception):
    """The documented text cannot be turned into a command (an unknown placeholder, an unknown flag, ...)."""


_PLACEHOLDER = re.compile(r"<([^<>\n]+)>")
# ``...`` alone, or ``...same settings...``: left out
_ELISION = re.compile(r"(?<!\S)(?:\.\.\.|…)(?:[^.…\n]*?(?:\.\.\.|…))?(?!\S)")


@dataclass(frozen=True)
class Placeholders:
    folder: str  # an existing folder
    json_file: str  # an existing (evaluation) JSON file


def _placeholder_value(text: str, values: Placeholders) -> str:
    """The test value of ``<text>``, by the kind of thing it describes."""
    lowered = text.lower()
    if "null" in lowered:  # <retain model's TOFU_EVAL.json or null>: the optional file left out
        return "null"
    if re.search(r"\.json\b", lowered):  # <retain TOFU_EVAL.json>
        return values.json_file
    if re.search(r"folder|model|hub id|tofu|corpora|dir|path", lowered):  # <model folder>, <folder or Hub id>
        return values.folder
    if re.search(r"name|run|partition", lowered):  # task_name=<name>, saves/unlearn/<run>, <partition>
        return "doc_check"
    if re.search(r"eps|value|number", lowered):  # trainer.method_args.retain_loss_eps=<eps>
        return "0.1"
    raise CommandError(f"unknown placeholder <{text}>: give it a test value in {Path(__file__).name}")


def _without_brackets(tokens: list[str]) -> list[str]:
    """``[optional parts]`` kept without their brackets (one token or several); ``key=[a,b]`` lists untouched."""
    out, depth = [], 0
    for token in tokens:
        if depth == 0 and token.startswith("["):
            token, depth = token[1:], 1
        if depth:
            depth += token.count("[") - token.count("]")
            if depth < 0 or (depth == 0 and not token.endswith("]")):
                raise CommandError(f"unbalanced [optional part] at {token!r}")
            if depth == 0:
                token = token[:-1]
        if token:
            out.append(token)
    if depth:
        raise CommandError("an [optional part] is not closed")
    return out


def command_arguments(text: str, values: Placeholders) -> list[str]:
    """The arguments of a documented command (``src/<script>.py`` left out): placeholders replaced, elisions
    and a trailing ``# comment`` dropped, optional parts kept."""
    text = _PLACEHOLDER.sub(lambda m: _placeholder_value(m.group(1), values), text)
    text = _ELISION.sub(" ", text)
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise CommandError(f"not a shell command line: {error}") from None
    for i, token in enumerate(tokens):
        if token.startswith("#"):
            tokens = tokens[:i]
            break
    return _without_brackets(tokens[1:])


# ----- Hydra entry points -----------------------------------------------------------------------------------
_HYDRA_MAIN = re.compile(r"@hydra\.main\((?P<args>[^)]*)\)")
_DROPPED_FLAGS = {"--help": 0, "-h": 0, "--hydra-help": 0, "--info": 0, "--resolve": 0, "--cfg": 1, "-c": 1,
                  "--package": 1, "-p": 1}  # flag -> number of values it takes


@dataclass(frozen=True)
class HydraCommand:
    config_name: str
    overrides: tuple[str, ...]
    multirun: bool


def _hydra_entry(script: str) -> tuple[str, list] | None:
    """(default config name, pre-processing of the overrides) of a ``@hydra.main`` script; None for another."""
    source = (REPO / script).read_text(encoding="utf-8")
    main = _HYDRA_MAIN.search(source)
    if not main:
        return None
    name = re.search(r"config_name\s*=\s*['\"]([^'\"]+)['\"]", main.group("args"))
    block = source.split('if __name__ == "__main__":', 1)[-1]
    steps = []  # the __main__ block's own order: the check, then the rewrite
    if "check_moved_overrides(sys.argv[1:])" in block:
        steps.append(lambda overrides: (check_moved_overrides(overrides), overrides)[1])
    if "command_line_overrides(sys.argv[1:])" in block:
        steps.append(command_line_overrides)
    return (name.group(1) if name else ""), steps


def hydra_command(arguments: list[str], default_config: str) -> HydraCommand:
    """Hydra's own flags read (``--config-name``, ``-m``; ``--cfg job``, ``--help`` dropped); the rest are overrides."""
    config_name, overrides, multirun = default_config, [], False
    i = 0
    while i < len(arguments):
        arg = arguments[i]
        flag, equals, value = arg.partition("=")
        if flag in ("--config-name", "-cn"):
            if not equals:
                i += 1
                value = arguments[i] if i < len(arguments) else ""
            config_name = value
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif flag in _DROPPED_FLAGS:
            i += 0 if equals else _DROPPED_FLAGS[flag]
        elif arg.startswith("-"):
            raise CommandError(f"Hydra flag {arg} is not supported by this test")
        else:
            overrides.append(arg)
        i += 1
    if not config_name:
        raise CommandError("no --config-name and no default config")
    return HydraCommand(config_name, tuple(overrides), multirun)


def one_combination(overrides: list[str]) -> list[str]:
    """A multirun's first combination: each swept override (``a=1,2``, ``choice(...)``, ``range(...)``) at its
    first value."""
    out = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            first = next(override.sweep_string_iterator())  # an interval() sweep cannot be enumerated: an error
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(override.input_line)
    return out


#: Hydra configs that come with a plugin of an optional extra: option -> (plugin module, extra)
PLUGIN_CONFIGS = {"hydra/sweeper/optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
                  "hydra/launcher/submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
                  "hydra/launcher/submitit_local": ("hydra_plugins.hydra_submitit_launcher", "cluster")}


class NeedsPlugin(Exception):
    """The command composes only with a Hydra plugin that is not installed here."""


def _missing_plugin(error: Exception) -> str | None:
    """Why ``error`` is only a plugin missing here (``pip install -e '.[sweep]'``), or None."""
    if not isinstance(error, MissingConfigException):
        return None
    for option, (module, extra) in PLUGIN_CONFIGS.items():
        if f"'{option}'" in str(error) and not _installed(module):
            return f"needs {module} (pip install -e '.[{extra}]')"
    return None


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (find_spec raises when its parent package, hydra_plugins, is absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def compose_command(command: HydraCommand, preprocessing: list, search_path: Path | None) -> None:
    """Compose as the entry point does (inside ``initialize_config_dir``), compose the names, resolve all."""
    overrides = list(command.overrides)
    for step in preprocessing:
        overrides = step(overrides)
    if command.multirun:
        overrides = one_combination(overrides)
    if search_path is not None:
        overrides.append(f"hydra.searchpath=[file://{search_path}]")
    try:
        cfg = compose(config_name=command.config_name, overrides=overrides)
    except MissingConfigException as error:
        reason = _missing_plugin(error)
        if reason:
            raise NeedsPlugin(reason) from None
        raise
    compose_names(cfg)
    OmegaConf.to_container(cfg, resolve=True)


# ----- argparse scripts -------------------------------------------------------------------------------------
class _Parsed(Exception):
    """Raised right after a script's parser has read its arguments: the work never starts."""


def parse_with_script(script: str, arguments: list[str], monkeypatch) -> None:
    """``main(arguments)`` of ``src/<script>.py`` up to its ``parse_args``; a usage error is a CommandError
    with argparse's message."""
    module = importlib.import_module(Path(script).stem)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    stderr = io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                module.main(arguments)
        except _Parsed:
            return
        except SystemExit as error:
            raise CommandError(stderr.getvalue().strip() or f"exit {error.code}") from None
    raise CommandError(f"{script}'s main returned without calling ArgumentParser.parse_args")


# ----- the tests --------------------------------------------------------------------------------------------
SEED_COMMAND = ("--config-name=unlearn.yaml", "model=SmolLM2-135M-Instruct", "trainer=GradDiff",
                "trainer.method_args.alpha=0.5", "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90",
                "data.eval=TOFU_QA_FORGET10_P", "collator=DataCollatorForSupervisedDataset")


@pytest.fixture(scope="module")
def commands() -> list[DocCommand]:
    return collect_commands()


@pytest.fixture
def placeholders(tmp_path) -> Placeholders:
    folder = tmp_path / "folder"
    folder.mkdir()
    json_file = tmp_path / "TOFU_EVAL.json"
    json_file.write_text("{}")
    return Placeholders(str(folder), str(json_file))


def test_the_collector_finds_the_documented_commands(commands, placeholders):
    assert len(commands) >= 100, len(commands)
    places = {c.where.split(":")[0] for c in commands}
    assert {"README.md", "docs/README.md", "docs/evaluation.md", "docs/methods.md", "configs/unlearn.yaml",
            "configs/eval.yaml", "configs/trainer/GradDiff.yaml"} <= places
    assert {"src/train.py", "src/eval.py", "src/sequential.py", "src/report.py"} <= {c.script for c in commands}
    # the quick start's seed command, its continuation lines joined
    seed = [c for c in commands if c.where.startswith("README.md:")
            and c.script == "src/train.py" and set(SEED_COMMAND) <= set(command_arguments(c.text, placeholders))]
    assert seed, "README.md's quick-start command was not collected"
    # after a launcher's options, inside bash -c '...' (quote left out), a multirun, a config's header (joined)
    by_file = {}
    for c in commands:
        by_file.setdefault(c.where.split(":")[0], []).append(c.text)
    assert ("src/train.py --config-name=unlearn.yaml trainer=NPO data.forget=TOFU_QA_FORGET10 "
            "data.retain=TOFU_QA_RETAIN90") in by_file["docs/distributed.md"]
    assert any(c.text.startswith("src/train.py -m ") for c in commands)
    # the worked examples' configs, for their commands (trainer=CustomMethod, eval=toy), without the caption line
    added = documented_configs()
    assert {"trainer/CustomMethod.yaml", "eval/toy.yaml"} <= set(added)
    assert added["eval/toy.yaml"].startswith("# @package eval.toy\n")
    assert by_file["configs/trainer/PDU.yaml"] == ["src/train.py --config-name=unlearn.yaml trainer=PDU "
                                                   "trainer.method_args.retain_loss_eps=0.05 "
                                                   "data.forget=TOFU_QA_FORGET10 data.retain=TOFU_QA_RETAIN90"]


def test_documented_text_becomes_arguments(placeholders):
    values = placeholders
    args = command_arguments("src/eval.py --config-name=eval.yaml ... task_name=<name> "
                             "retain_logs_path=<retain model's TOFU_EVAL.json or null> "
                             "model.model_args.pretrained_model_name_or_path=<model folder> "
                             "[paths.tofu=<folder>] [data.retain=[A,B]] attack=[quantize,relearn]  # a comment",
                             values)
    assert args == ["--config-name=eval.yaml", "task_name=doc_check", "retain_logs_path=null",
                    f"model.model_args.pretrained_model_name_or_path={values.folder}", f"paths.tofu={values.folder}",
                    "data.retain=[A,B]", "attack=[quantize,relearn]"]
    assert command_arguments("src/report.py saves [--out saves/report] ...same settings...", values) == [
        "saves", "--out", "saves/report"]
    with pytest.raises(CommandError, match="unknown placeholder"):
        command_arguments("src/train.py x=<something new>", values)
    assert _command_in("srun bash -c 'accelerate launch --config_file c.yaml \\ src/train.py a=1'") == "src/train.py a=1"
    command = hydra_command(["-m", "--config-name", "unlearn.yaml", "--cfg", "job", "a=1,2", "b=[x,y]"], "train.yaml")
    assert command == HydraCommand("unlearn.yaml", ("a=1,2", "b=[x,y]"), True)
    assert one_combination(list(command.overrides)) == ["a=1", "b=[x,y]"]


def test_an_argparse_script_stops_once_its_arguments_are_parsed(tmp_path, monkeypatch):
    """src/clean.py builds its parser inside main: the arguments are read by it, and nothing is removed."""
    stale = tmp_path / "run.incomplete-1-2-x"  # what `clean.py <folder> --yes` would remove
    stale.mkdir()
    parse_with_script("src/clean.py", [str(tmp_path), "--yes"], monkeypatch)
    assert stale.is_dir()
    with pytest.raises(CommandError, match="unrecognized arguments: --no-such-flag"):
        parse_with_script("src/clean.py", [str(tmp_path), "--no-such-flag"], monkeypatch)


def _check(script: str, arguments: list[str], search_path: Path | None, monkeypatch) -> Exception | None:
    """None when the command composes (or parses), else the error."""
    if not (REPO / script).is_file():
        return CommandError(f"{script} does not exist")
    entry = _hydra_entry(script)
    try:
        if entry is not None:
            default_config, preprocessing = entry
            compose_command(hydra_command(arguments, default_config), preprocessing, search_path)
        elif "argparse" in (REPO / script).read_text(encoding="utf-8"):
            parse_with_script(script, arguments, monkeypatch)
        else:
            raise CommandError(f"{script} is neither a Hydra nor an argparse script: teach "
                               f"{Path(__file__).name} to check it")
    except Exception as error:  # noqa: BLE001 - every failure is reported
        return error
    return None


def _described(error: Exception) -> str:
    message = " ".join(str(error).split())
    message = message if len(message) <= 600 else message[:600] + " ..."
    return message if isinstance(error, CommandError) else f"{type(error).__name__}: {message}"


def _memoized(compose_config):
    """``data.compose_config`` composing each (group, name, package) once: ``compose_names`` composes the same
    few dataset configs for most commands (~0.1 s each); every caller gets a copy of its own."""
    composed = {}

    def memoized(group: str, name: str, package: str):
        if (group, name, package) not in composed:
            composed[group, name, package] = compose_config(group, name, package)
        return copy.deepcopy(composed[group, name, package])

    return memoized


def check_commands(commands: list[DocCommand], values: Placeholders, search_path: Path | None,
                   monkeypatch) -> tuple[list[str], list[str]]:
    """(failures, commands not checked for a missing plugin), each ``<file>:<line>: ...`` with the error; run
    inside ``initialize_config_dir``. A command documented more than once is checked once."""
    failures: list[str] = []
    not_checked: list[str] = []
    checked: dict[tuple[str, ...], Exception | None] = {}
    for command in commands:
        try:
            arguments = command_arguments(command.text, values)
        except CommandError as e:
            error: Exception | None = e
        else:
            key = (command.script, *arguments)
            if key not in checked:
                checked[key] = _check(command.script, arguments, search_path, monkeypatch)
            error = checked[key]
        if isinstance(error, NeedsPlugin):
            not_checked.append(f"{command.where}: {error}")
        elif error is not None:
            failures.append(f"{command.where}: {command.text}\n    {_described(error)}")
    return failures, not_checked


def test_every_documented_command_composes(commands, placeholders, tmp_path, monkeypatch):
    """Each command's config composes and resolves (Hydra scripts), or its arguments parse (argparse scripts);
    every failure is listed, with where it is documented."""
    import data
    import resolvers

    register_resolvers()
    monkeypatch.chdir(REPO)  # the relative paths of the commands, as typed in the repository root
    memoized = _memoized(data.compose_config)
    monkeypatch.setattr(data, "compose_config", memoized)
    monkeypatch.setattr(resolvers, "compose_config", memoized)
    search_path = None
    added = documented_configs()
    if added:
        search_path = tmp_path / "documented_configs"
        for relative, text in added.items():
            (search_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (search_path / relative).write_text(text)
    started = time.perf_counter()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        failures, not_checked = check_commands(commands, placeholders, search_path, monkeypatch)
    elapsed = time.perf_counter() - started
    if not_checked:
        warnings.warn(f"{len(not_checked)} documented commands not checked:\n" + "\n".join(not_checked),
                      stacklevel=1)
    assert not failures, f"{len(failures)} of {len(commands)} documented commands fail:\n" + "\n".join(failures)
    # ~0.3-1.5 s a composition (Hydra's merging): a guard against the check outgrowing a fast test
    assert elapsed < 180, f"checking {len(commands)} commands took {elapsed:.0f} s"


def test_every_failure_is_listed_with_its_place(placeholders, monkeypatch):
    """A wrong group, an unknown dataset name, an unresolvable value, a sweep without -m, a bad report flag and
    an unknown placeholder: all reported, each with its file:line; the good command is not."""
    register_resolvers()
    texts = ["src/train.py --config-name=unlearn.yaml trainer=NoSuchMethod",
             "src/train.py --config-name=unlearn.yaml data.forget=NO_SUCH_DATASET",
             "src/eval.py --config-name=eval.yaml eval=muse data_split=NoSuchCorpus",
             "src/train.py --config-name=unlearn.yaml trainer.method_args.alpha=0.5,1",
             "src/report.py saves --no-such-flag",
             "src/eval.py --config-name=eval.yaml task_name=<something new>",
             "src/train.py -m --config-name=unlearn.yaml trainer=GradAscent trainer.args.learning_rate=1e-5,2e-5"]
    commands = [DocCommand(f"doc.md:{i}", text) for i, text in enumerate(texts, 1)]
    monkeypatch.chdir(REPO)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        failures, not_checked = check_commands(commands, placeholders, None, monkeypatch)
    assert not not_checked
    assert [f.split(":", 2)[:2] for f in failures] == [["doc.md", str(i)] for i in range(1, 7)], failures
    for failure, expected in zip(failures, ["trainer/NoSuchMethod", "NO_SUCH_DATASET", "NoSuchCorpus",
                                            "Ambiguous value", "--no-such-flag", "unknown placeholder"]):
        assert expected in failure, failure
