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
from dataclasses import dataclass, fields
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
) -> list[TokenizedQA]:
    """Tokenize (question, answer) pairs; labels are -100 on prompt tokens.

    The answer is cut (and the sample flagged ``truncated``) when prompt + answer exceed
    ``max_length``; a prompt that alone does not fit is an error, never a silent cut.

    ``labels_cover_chat_tail`` (open-unlearning's preparation): ``tokenize_qa_like_open_unlearning``.
    ``fewshot``: in-context examples before every question (``format_prompt``).
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if labels_cover_chat_tail:
        return [tokenize_qa_like_open_unlearning(tokenizer, template, q, a, max_length, fewshot)
                for q, a in zip(questions, answers)]
    prompts = [format_prompt(tokenizer, template, q, fewshot) for q in questions]
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
