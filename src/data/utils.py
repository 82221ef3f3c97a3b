"""Prompt building and tokenization of question-answer pairs, shared by every dataset class.

A training sample is ``prompt tokens + answer tokens + end-of-answer token``. The prompt comes from the
tokenizer's chat template (instruct models) or from ``template_args`` tags (base models). It is
tokenized on its own and the answer appended, so the prompt is always an exact token prefix of the
sample and the loss mask (``labels == -100`` on the prompt) is exact. Labels keep the end-of-answer
token, so models learn to stop.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt (the model config's ``template_args``).

    Attributes:
        apply_chat_template: use the tokenizer's chat template (instruct models).
        system_prompt: system message for the chat template; None lets the template use its default.
        date_string: fixed date passed to chat templates that print today's date (Llama 3), so
            tokenization never depends on the day a run happens.
        user_start_tag, user_end_tag, asst_start_tag: tags of the plain-text prompt used when
            ``apply_chat_template`` is false: ``<user_start_tag>question<user_end_tag><asst_start_tag>``.
        asst_end_tag: text a generation stops at for base models (evaluation), not part of labels.
    """

    apply_chat_template: bool = True
    system_prompt: str | None = None
    date_string: str | None = "10 Apr 2025"
    user_start_tag: str = "Question: "
    user_end_tag: str = "\n"
    asst_start_tag: str = "Answer: "
    asst_end_tag: str = "\n\n"

    @classmethod
    def from_config(cls, template_args: Mapping[str, Any] | None) -> PromptTemplate:
        args = dict(template_args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown template_args {unknown}; valid keys: {sorted(known)}")
        return cls(**args)


#: In-context examples placed before a question: ``(question, answer)`` pairs, in order.
Fewshot = Sequence[tuple[str, str]]


def _chat_messages(template: PromptTemplate, question: str, answer: str | None = None,
                   fewshot: Fewshot = ()) -> list[dict]:
    messages = []
    if template.system_prompt is not None:
        messages.append({"role": "system", "content": template.system_prompt})
    for example_question, example_answer in fewshot:
        messages += [{"role": "user", "content": example_question}, {"role": "assistant", "content": example_answer}]
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _render_chat(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str,
                 answer: str | None = None, fewshot: Fewshot = ()) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template_args.apply_chat_template is true but the tokenizer has no chat template; "
            "set model.template_args.apply_chat_template=false and give user/assistant tags for a base model"
        )
    kwargs = {"date_string": template.date_string} if template.date_string is not None else {}
    return tokenizer.apply_chat_template(
        _chat_messages(template, question, answer, fewshot), tokenize=False,
        add_generation_prompt=answer is None, **kwargs,
    )


def format_prompt(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str,
                  fewshot: Fewshot = ()) -> str:
    """The prompt text that precedes the answer (generation starts right after it).

    ``fewshot`` examples come first: with a chat template as earlier user/assistant turns; with plain
    tags each as ``<user_start_tag>q<user_end_tag><asst_start_tag>a<asst_end_tag>`` (MUSE's knowledge
    prompts: ``Question: q\nAnswer: a\n\n`` per example, then ``Question: q\nAnswer: ``).
    """
    if template.apply_chat_template:
        return _render_chat(tokenizer, template, question, fewshot=fewshot)
    examples = "".join(f"{template.user_start_tag}{q}{template.user_end_tag}{template.asst_start_tag}{a}"
                       f"{template.asst_end_tag}" for q, a in fewshot)
    return f"{examples}{template.user_start_tag}{question}{template.user_end_tag}{template.asst_start_tag}"


def answer_end_token_id(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate) -> int:
    """The token that closes an answer: the chat template's end-of-turn token, else EOS.

    Found by rendering a dummy exchange: what the template writes right after the assistant's text
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma).
    """
    if template.apply_chat_template:
        prompt = _render_chat(tokenizer, template, "q")
        full = _render_chat(tokenizer, template, "q", "a")
        if full.startswith(prompt + "a"):
            tail = full[len(prompt) + 1:]
            tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
            if tail_ids and tail_ids[0] in tokenizer.all_special_ids:
                return tail_ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token and its chat template no end-of-turn token")
    return tokenizer.eos_token_id


@dataclass
class TokenizedQA:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenize_qa_batch(
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    questions: Sequence[str],
    answers: Sequence[str],
    max_length: int,
    row_ids: Sequence[Any] | None = None,
    labels_cover_chat_tail: bool = False,
    fewshot: Fewshot = (),
    answer_prefixes: Sequence[str] | None = None,
) -> list[TokenizedQA]:
    """Tokenize (question, answer) pairs; labels are -100 on prompt tokens.

    The answer is cut (and the sample flagged ``truncated``) when prompt + answer exceed
    ``max_length``; a prompt that alone does not fit is an error, never a silent cut.

    ``labels_cover_chat_tail`` (open-unlearning's preparation): ``tokenize_qa_like_open_unlearning``.
    ``fewshot``: in-context examples before every question (``format_prompt``).
    ``answer_prefixes``: per pair, text appended to the prompt (the start of the assistant's turn, e.g. RWKU's
    ``Answer:``); it belongs to the prompt, so it is unlabelled and a generation continues after it.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if answer_prefixes is not None and len(answer_prefixes) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(answer_prefixes)} answer prefixes")
    if labels_cover_chat_tail:
        if answer_prefixes is not None and any(answer_prefixes):
            raise ValueError("labels_cover_chat_tail (open-unlearning's preparation) has no answer prefix; "
                             "set prompt_format.answer_prefix='' or labels_cover_chat_tail=false")
        return [tokenize_qa_like_open_unlearning(tokenizer, template, q, a, max_length, fewshot)
                for q, a in zip(questions, answers)]
    prompts = [format_prompt(tokenizer, template, q, fewshot) for q in questions]
    if answer_prefixes is not None:
        prompts = [p + prefix for p, prefix in zip(prompts, answer_prefixes)]
    # Chat templates write their own BOS; plain prompts get the tokenizer's special tokens.
    prompt_ids = tokenizer(prompts, add_special_tokens=not template.apply_chat_template)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    end_id = answer_end_token_id(tokenizer, template)
    out = []
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if len(p) >= max_length:
            row = row_ids[i] if row_ids is not None else i
            raise ValueError(
                f"max_length={max_length} leaves no room for the answer of sample {row}: its prompt alone is "
                f"{len(p)} tokens; raise max_length (data.dataset_args.max_length=...) above {len(p)}"
            )
        a = list(a) + [end_id]
        room = max_length - len(p)
        truncated = len(a) > room
        a = a[:room]
        out.append(TokenizedQA(input_ids=list(p) + a, labels=[IGNORE_INDEX] * len(p) + a, truncated=truncated))
    return out


def tokenize_qa_like_open_unlearning(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str,
                                     answer: str, max_length: int, fewshot: Fewshot = ()) -> TokenizedQA:
    """One (question, answer) pair as open-unlearning prepares it (its ``preprocess_chat_instance``).

    The whole exchange (the ``fewshot`` examples as earlier turns, then the question and its answer) is
    rendered and tokenized at once; the labels are every token after the prompt: the answer, the
    end-of-turn token and whatever the chat template writes after it (ChatML's ``"\n"``), plus the
    tokenizer's EOS appended when the tokens do not already end with it. With a chat template nothing
    is cut (``max_length`` is not applied, as there); a plain-tags prompt is tokenized with the
    tokenizer's special tokens and cut to ``max_length`` before the EOS is appended.
    """
    prompt_text = format_prompt(tokenizer, template, question, fewshot)
    if template.apply_chat_template:
        full_text = _render_chat(tokenizer, template, question, answer, fewshot)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        truncated = False
    else:
        prompt = tokenizer(prompt_text, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
        whole = tokenizer(prompt_text + answer, add_special_tokens=True)["input_ids"]
        truncated = len(whole) > max_length
        full = whole[:max_length]
    full = list(full)
    if full[-1] != tokenizer.eos_token_id:
        full.append(tokenizer.eos_token_id)
    return TokenizedQA(input_ids=full, labels=[IGNORE_INDEX] * len(prompt) + full[len(prompt):], truncated=truncated)


def to_sample(tok: TokenizedQA, index: int) -> dict[str, Any]:
    ids = torch.tensor(tok.input_ids, dtype=torch.long)
    return {
        "input_ids": ids,
        "labels": torch.tensor(tok.labels, dtype=torch.long),
        "attention_mask": torch.ones_like(ids),
        "index": index,
    }


class DataFileError(ValueError):
    """A local data file the run cannot use; the one-line message names the file, the line (1-based) and
    what is wrong with it."""


def _decoded_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every line of a UTF-8 file, or a DataFileError naming the first line
    that is not UTF-8."""
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}, line {number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1}); save the file as UTF-8") from None
            out.append((number, text.lstrip("\ufeff") if number == 1 else text))
    return out


def _kind(value: Any, list_ok: bool) -> str | None:
    """``str`` or ``list`` for a usable field value, None for anything else."""
    if isinstance(value, str):
        return "str"
    if list_ok and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "list"
    return None


def _check_row(row: Any, where: str, fields: Mapping[str, str], lists: Collection[str],
               kinds: dict[str, tuple[str, str]]) -> None:
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: a JSON object expected, got a {type(row).__name__}")
    for key, role in fields.items():
        list_ok = key in lists
        if key not in row:
            raise DataFileError(f"{where}: no {key!r} field ({role}={key!r}); the row has: "
                                f"{', '.join(sorted(row)) or 'no fields'}")
        kind = _kind(row[key], list_ok)
        if kind is None:
            valid = "a string or a non-empty list of strings" if list_ok else "a string"
            raise DataFileError(f"{where}: field {key!r} is {json.dumps(row[key])[:60]}; must be {valid}")
        first = kinds.setdefault(key, (kind, where))
        if first[0] != kind:
            raise DataFileError(f"{where}: field {key!r} is a {kind} but a {first[0]} in {first[1]}; "
                                "every row must have the same kind")


_CHECKED_FILES: dict[tuple, int] = {}


def check_rows_file(path: str | Path, fields: Mapping[str, str], lists: Collection[str] = ()) -> int:
    """Check a local JSON-lines file line by line before ``datasets`` loads it; return its row count.

    ``fields`` maps each column the dataset reads to the config key naming it (``{"question":
    "question_key"}``); its value must be a string, or, for a column in ``lists``, a string or a
    non-empty list of strings, of the same kind on every row. A DataFileError names the file, the
    1-based line and the problem: bytes that are not UTF-8, a line that is not JSON, a row that is not
    an object or lacks a field, an empty file. A file holding one JSON array of objects is accepted too
    (its items are numbered instead of its lines). A file is checked once per (size, time) and fields.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, tuple(sorted(fields.items())), tuple(sorted(lists)))
    if key in _CHECKED_FILES:
        return _CHECKED_FILES[key]
    lines = [(n, text) for n, text in _decoded_lines(path) if text.strip()]
    if not lines:
        raise DataFileError(f"{path}: empty file (no rows; one JSON object per line expected)")
    kinds: dict[str, tuple[str, str]] = {}
    if lines[0][1].lstrip().startswith("["):  # one JSON document: an array of rows
        text = "".join(t for _, t in _decoded_lines(path))
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rows, list) or not rows:
            raise DataFileError(f"{path}: a JSON array of row objects (or one object per line) expected")
        for i, row in enumerate(rows, 1):
            _check_row(row, f"{path}, item {i}", fields, lists, kinds)
        count = len(rows)
    else:
        for number, text in lines:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); one JSON "
                                    "object per line expected") from None
            _check_row(row, f"{path}, line {number}", fields, lists, kinds)
        count = len(lines)
    _CHECKED_FILES[key] = count
    return count


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (e.g. the refusal answers of idontknow.jsonl).

    A DataFileError names the file, and the line for bytes that are not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" + (" (it is a folder)" if os.path.isdir(path) else ""))
    lines = [text.strip() for _, text in _decoded_lines(path)]
    lines = [line for line in lines if line]
    if not lines:
        raise DataFileError(f"{path}: empty file (no non-empty lines; one refusal answer per line expected)")
    return lines


#: A ``keep_rows`` choice: names, or a count N (the first N values of ``values_from``).
Choice = tuple[str, ...] | int


@dataclass(frozen=True)
class ValuesSource:
    """Where a filter's values are listed in order (``keep_rows.values_from``): the column ``column`` of the subset
    ``name`` (split ``split``) of the dataset's own source (its Hub dataset, or ``<local_dir>/<name>.json``)."""

    name: str
    column: str
    split: str = "train"


@dataclass(frozen=True)
class RowFilter:
    """Which rows of a data file a dataset keeps (a dataset config's ``keep_rows``): those whose ``column`` holds
    one of ``values``, or, with ``exclude``, every other row.

    ``values`` is a list of names, or, with ``values_from``, a count N: the first N values that source lists,
    leaving out those of ``skip`` (names or a count, resolved the same way). Names are checked against the source.
    RWKU selects its unlearning targets this way (``values: ${rwku.targets}``, the ``target`` column of its
    ``forget_target`` subset), and its retain texts with ``skip: ${rwku.targets}``. ``values_key`` and
    ``skip_key`` name the settings the values come from, in error messages."""

    column: str
    values: Choice
    exclude: bool = False
    values_from: ValuesSource | None = None
    skip: Choice = ()
    values_key: str = "keep_rows.values"
    skip_key: str = "keep_rows.skip"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, owner: str) -> RowFilter | None:
        """The filter of ``keep_rows`` (None keeps every row); a malformed one is a ValueError naming the key."""
        if cfg is None:
            return None
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{owner}: keep_rows={cfg!r}; give {{column: <name>, values: [...]}} or null")
        valid = {"column", "values", "exclude", "values_from", "skip", "values_key", "skip_key"}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"{owner}: keep_rows has unknown keys {unknown}; valid: {', '.join(sorted(valid))}")
        column = cfg.get("column")
        if not isinstance(column, str) or not column:
            raise ValueError(f"{owner}: keep_rows.column={column!r}; give the name of a column of the data")
        keys = {k: cfg.get(k, f"keep_rows.{k.removesuffix('_key')}") for k in ("values_key", "skip_key")}
        source = cfg.get("values_from")
        if source is not None:
            if not isinstance(source, Mapping) or not {"name", "column"} <= set(source) or set(source) - {
                    "name", "column", "split"} or not all(isinstance(v, str) for v in source.values()):
                raise ValueError(f"{owner}: keep_rows.values_from={source!r}; give {{name: <subset>, column: <column>, "
                                 "split: <split, default train>}}")
            source = ValuesSource(**source)
        values = cls._choice(cfg.get("values"), keys["values_key"], owner, counted=source is not None)
        skip = cls._choice([] if cfg.get("skip") is None else cfg["skip"], keys["skip_key"], owner,
                           counted=source is not None)
        exclude = cfg.get("exclude", False)
        if not isinstance(exclude, bool):
            raise ValueError(f"{owner}: keep_rows.exclude={exclude!r}; give true or false")
        if values == () and not exclude:
            raise ValueError(f"{owner}: {keys['values_key']} is empty: no row would be kept")
        return cls(column, values, exclude, source, skip, keys["values_key"], keys["skip_key"])

    @staticmethod
    def _choice(value: Any, key: str, owner: str, counted: bool) -> Choice:
        if isinstance(value, int) and not isinstance(value, bool):
            if not counted:
                raise ValueError(f"{owner}: {key}={value}: a count needs keep_rows.values_from (where the values are "
                                 "listed in order); give a list of names")
            if value < 1:
                raise ValueError(f"{owner}: {key}={value}; give a count of at least 1 or a list of names")
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{owner}: {key}={value!r}; give a list of names" + (" or a count" if counted else ""))
        if len(set(value)) != len(value):
            raise ValueError(f"{owner}: {key}={list(value)} names a value twice")
        return tuple(value)

    def resolve(self, listed: Sequence[str] | None, owner: str, source: str) -> RowFilter:
        """This filter with its values as names: a count becomes the first N names of ``listed`` (the values of
        ``values_from``, in order) not in ``skip``; names are checked against ``listed``. An error names the
        setting, the value and what is valid."""
        if self.values_from is None:
            return self
        listed = list(listed or [])

        def names(choice: Choice, key: str, pool: list[str]) -> tuple[str, ...]:
            if isinstance(choice, int):
                if choice > len(pool):
                    besides = f" besides those of {self.skip_key}" if len(pool) < len(listed) else ""
                    raise ValueError(f"{owner}: {key}={choice}, but {source} lists {len(pool)} values{besides}; "
                                     f"give a count from 1 to {len(pool)} or a list of names")
                return tuple(pool[:choice])
            unknown = [v for v in choice if v not in listed]
            if unknown:
                raise ValueError(f"{owner}: {key}: {_unknown_names(unknown, listed)} not listed in {source} "
                                 f"(e.g. {', '.join(map(repr, listed[:3]))})")
            return tuple(choice)

        skip = names(self.skip, self.skip_key, listed)
        values = names(self.values, self.values_key, [v for v in listed if v not in skip])
        both = [v for v in values if v in skip]
        if both:
            raise ValueError(f"{owner}: {self.values_key} and {self.skip_key} both name {both}")
        return replace(self, values=values, skip=skip, values_from=None)

    def apply(self, column_values: Sequence[Any], owner: str, source: str) -> list[int]:
        """The indices of the rows kept, given every row's value of ``column``. A value that no row holds is an
        error (a misspelt name would otherwise select nothing, or exclude nothing, silently), naming the value,
        the source and some values the data has."""
        if isinstance(self.values, int) or self.values_from is not None:
            raise ValueError(f"{owner}: keep_rows.values={self.values!r} must be resolved against "
                             f"{self.values_from} first (RowFilter.resolve)")
        present = set(column_values)
        missing = [v for v in self.values if v not in present]
        if missing:
            raise ValueError(f"{owner}: keep_rows: no row of {source} has {self.column}="
                             f"{_unknown_names(missing, sorted(map(str, present)))}; it has {len(present)} distinct "
                             f"values, e.g. {', '.join(map(repr, sorted(map(str, present))[:5]))}")
        wanted = set(self.values)
        kept = [i for i, v in enumerate(column_values) if (v in wanted) != self.exclude]
        if not kept:
            raise ValueError(f"{owner}: keep_rows keeps no row of {source}")
        return kept


def _unknown_names(names: Sequence[str], known: Sequence[str]) -> str:
    """``'x' (close: 'y')``-style list of ``names`` with the closest entries of ``known``."""
    import difflib

    return "; ".join(f"{n!r}" + (f" (close: {', '.join(map(repr, close))})" if close else "")
                     for n in names for close in [difflib.get_close_matches(n, list(known), n=3)])


@dataclass(frozen=True)
class PromptFormat:
    """How a row's question is put to the model (a dataset config's ``prompt_format``).

    ``question``: the user message, a ``str.format`` template of ``{question}`` (the row's question column) and
    any other column of the row by name; ``answer_prefix``: text the assistant's turn starts with, after the
    chat template's generation prompt (RWKU's ``Answer:``); the answer (or the generation) follows it. ``cases``
    (with ``by_column``): other formats for rows whose ``by_column`` holds a given value (RWKU's adversarial
    probes: the format depends on the attack type)."""

    question: str = "{question}"
    answer_prefix: str = ""
    by_column: str | None = None
    cases: tuple[tuple[str, PromptFormat], ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, owner: str, nested: bool = False) -> PromptFormat:
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{owner}: prompt_format={cfg!r}; give {{question: ..., answer_prefix: ...}} or null")
        valid = {"question", "answer_prefix"} | (set() if nested else {"by_column", "cases"})
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"{owner}: prompt_format has unknown keys {unknown}; valid: {', '.join(sorted(valid))}")
        question, prefix = cfg.get("question", "{question}"), cfg.get("answer_prefix", "")
        for key, value in (("question", question), ("answer_prefix", prefix)):
            if not isinstance(value, str):
                raise ValueError(f"{owner}: prompt_format.{key}={value!r}; give a string")
        if "{question}" not in question:
            raise ValueError(f"{owner}: prompt_format.question={question!r} has no {{question}} placeholder")
        by_column, cases = cfg.get("by_column"), cfg.get("cases") or {}
        if (by_column is None) != (not cases):
            raise ValueError(f"{owner}: prompt_format: give by_column and cases together (cases: {{<value of "
                             "by_column>: {question: ..., answer_prefix: ...}}), or neither")
        if by_column is not None and not isinstance(by_column, str):
            raise ValueError(f"{owner}: prompt_format.by_column={by_column!r}; give a column name")
        if not isinstance(cases, Mapping):
            raise ValueError(f"{owner}: prompt_format.cases={cases!r}; give {{<value>: {{question: ..., ...}}}}")
        parsed = tuple((str(value), cls.from_config(case, f"{owner} (prompt_format.cases[{value!r}])", nested=True))
                       for value, case in cases.items())
        return cls(question, prefix, by_column, parsed)

    def columns(self) -> set[str]:
        """The row columns the templates read besides the question (and ``by_column``)."""
        import string

        formats = [self, *(case for _, case in self.cases)]
        names = {field for f in formats for _, field, _, _ in string.Formatter().parse(f.question) if field}
        return (names - {"question"}) | ({self.by_column} if self.by_column else set())

    def for_row(self, row: Mapping[str, Any]) -> PromptFormat:
        """The format of ``row``: its case when ``by_column`` holds a value of ``cases``, else this one."""
        if self.by_column is not None:
            for value, case in self.cases:
                if str(row.get(self.by_column)) == value:
                    return case
        return self

    def render(self, row: Mapping[str, Any], question: str, owner: str, index: int) -> tuple[str, str]:
        """``(user message, answer prefix)`` of ``row``."""
        chosen = self.for_row(row)
        try:
            text = chosen.question.format(**{**row, "question": question})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{owner}: prompt_format.question={chosen.question!r} cannot be filled from row {index} "
                             f"({type(e).__name__}: {e}); its columns: {', '.join(sorted(row))}") from None
        return text, chosen.answer_prefix
