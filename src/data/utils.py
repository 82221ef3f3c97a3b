"""Prompt building and tokenization of question-answer pairs, shared by every dataset class.

A training sample is ``prompt tokens + answer tokens + end-of-answer token``. The prompt comes from the
tokenizer's chat template (instruct models) or from ``template_args`` tags (base models). It is
tokenized on its own and the answer appended, so the prompt is always an exact token prefix of the
sample and the loss mask (``labels == -100`` on the prompt) is exact. Labels keep the end-of-answer
token, so models learn to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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


def _chat_messages(template: PromptTemplate, question: str, answer: str | None = None) -> list[dict]:
    messages = []
    if template.system_prompt is not None:
        messages.append({"role": "system", "content": template.system_prompt})
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _render_chat(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str,
                 answer: str | None = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template_args.apply_chat_template is true but the tokenizer has no chat template; "
            "set model.template_args.apply_chat_template=false and give user/assistant tags for a base model"
        )
    kwargs = {"date_string": template.date_string} if template.date_string is not None else {}
    return tokenizer.apply_chat_template(
        _chat_messages(template, question, answer), tokenize=False,
        add_generation_prompt=answer is None, **kwargs,
    )


def format_prompt(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str) -> str:
    """The prompt text that precedes the answer (generation starts right after it)."""
    if template.apply_chat_template:
        return _render_chat(tokenizer, template, question)
    return f"{template.user_start_tag}{question}{template.user_end_tag}{template.asst_start_tag}"


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
) -> list[TokenizedQA]:
    """Tokenize (question, answer) pairs; labels are -100 on prompt tokens.

    The answer is cut (and the sample flagged ``truncated``) when prompt + answer exceed
    ``max_length``; a prompt that alone does not fit is an error, never a silent cut.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    prompts = [format_prompt(tokenizer, template, q) for q in questions]
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


def to_sample(tok: TokenizedQA, index: int) -> dict[str, Any]:
    ids = torch.tensor(tok.input_ids, dtype=torch.long)
    return {
        "input_ids": ids,
        "labels": torch.tensor(tok.labels, dtype=torch.long),
        "attention_mask": torch.ones_like(ids),
        "index": index,
    }


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (e.g. the refusal answers of idontknow.jsonl)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} has no non-empty lines")
    return lines
