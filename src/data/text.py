"""Raw-text datasets: a corpus cut into fixed-size chunks, and prefix -> continuation pairs (MUSE, WMDP).

No chat template and no end-of-answer token: the text is the model's input as it is.

- ``PretrainingDataset``: the rows of a text column joined into one document, tokenised once and cut
  into ``max_length``-token chunks; the loss covers every token (MUSE's forget/retain corpora, WMDP's
  corpora). Fine-tuning the MUSE target models and unlearning on MUSE both read it.
- ``CompletionDataset``: one sample per row, ``prefix + continuation``; the labels cover the
  continuation only (MUSE's verbatim-memorisation prompts, and with no prefix column the whole text:
  MUSE's membership-inference chunks).

Both follow the evaluation contract of ``data.tofu.QADataset`` (``prompt_text``, ``answer_texts``,
``lengths``, ``template``, ``last_token_is_eos``), so every pass and metric reads them unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from checks import check_bool, check_choice, check_number
from data.tofu import load_rows
from data.utils import IGNORE_INDEX, RowFilter

log = logging.getLogger(__name__)

CHUNKING = ("concatenate", "per_row")


def leading_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids the tokenizer puts before a text with ``add_special_tokens=True`` (Llama's BOS; none for
    GPT-2-style tokenizers such as SmolLM2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start:start + len(plain)] == plain:
            return list(special[:start])
    return []


def fold_rows(num_rows: int, index: int, count: int, nested: bool) -> range:
    """Rows of fold ``index`` (1-based) of ``count`` contiguous, near-equal parts of ``num_rows`` rows.

    Part ``j`` holds rows ``[floor((j - 1) n / count), floor(j n / count))``. ``nested=False``: part
    ``index`` alone (disjoint folds, MUSE's sustainability sets); ``nested=True``: parts 1..``index``
    (each fold contains the previous one, MUSE's scalability sets).
    """
    count = check_number("local_fold.count", count, integer=True, low=1)
    index = check_number("local_fold.index", index, integer=True, low=1, high=count)
    if count > num_rows:
        raise ValueError(f"local_fold.count={count} folds of {num_rows} rows would leave empty folds; "
                         f"use at most {num_rows}")
    start = 0 if nested else (index - 1) * num_rows // count
    return range(start, index * num_rows // count)


def _filter_field(args: dict) -> dict[str, str]:
    """The column a dataset's ``keep_rows`` reads, which its local file must have."""
    row_filter = RowFilter.from_config(args.get("keep_rows"), args.get("name", "dataset"))
    return {row_filter.column: "keep_rows.column"} if row_filter else {}


def _sample(input_ids: list[int], labels: list[int], index: int) -> dict[str, Any]:
    ids = torch.tensor(input_ids, dtype=torch.long)
    return {"input_ids": ids, "labels": torch.tensor(labels, dtype=torch.long), "attention_mask": torch.ones_like(ids),
            "index": index}


class _TextDataset(Dataset):
    """What both raw-text datasets share: the evaluation contract and the row loading.

    Two options reproduce open-unlearning's conventions for raw text (``compat=open_unlearning`` sets both;
    docs/evaluation.md): ``last_token_is_eos`` makes the metrics that leave out a final end-of-answer token
    (exact memorisation, extraction strength, Min-K%, Min-K%++) leave out the sample's last token, a real
    token of the text; ``unlabelled_first_token`` gives a sample's first token no label when no special token
    precedes it (nothing predicts it, so no loss changes; the text of the labelled tokens, which mia_zlib
    compresses, then starts at the second token)."""

    template = None  # raw text: generation stops at EOS only, no prompt tags

    def __init__(self, name: str, last_token_is_eos: bool = False, unlabelled_first_token: bool = False) -> None:
        self.name = name
        self.last_token_is_eos = check_bool("last_token_is_eos", last_token_is_eos, owner=name)
        self.unlabelled_first_token = check_bool("unlabelled_first_token", unlabelled_first_token, owner=name)
        self._samples: list[tuple[list[int], list[int]]] = []

    def _add(self, input_ids: list[int], labels: list[int]) -> None:
        if self.unlabelled_first_token and labels and labels[0] != IGNORE_INDEX:
            labels = [IGNORE_INDEX, *labels[1:]]
        self._samples.append((input_ids, labels))

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        input_ids, labels = self._samples[index]
        return _sample(input_ids, labels, index)

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self._samples]


class PretrainingDataset(_TextDataset):
    """A text corpus in ``max_length``-token samples, the loss on every token.

    ``chunking: concatenate`` (MUSE): the rows of ``text_key`` are joined with ``separator`` and tokenised
    ONCE (no special tokens); chunk ``k`` holds tokens ``[k * max_length, (k + 1) * max_length)``, so the
    last chunk holds the remainder and there is no empty chunk when the length divides evenly
    (``ceil(n / max_length)`` chunks). ``chunking: per_row`` (RMU's WMDP corpora): each row is one
    sample, its first ``max_length`` tokens (the rest of a longer document is not used).

    Each sample is preceded by the special tokens the tokenizer puts before a text (Llama's BOS; none
    for SmolLM2), as a document start, and unlabelled. Labels are the sample's tokens themselves (the
    first one is predicted by nothing when there is no BOS; the loss's shift drops it).

    Args:
        hf_args: ``datasets.load_dataset`` arguments (Hub), e.g. ``{path: muse-bench/MUSE-News, name: raw,
            split: forget}``.
        text_key: the column holding the text.
        max_length: tokens per sample (BOS not counted).
        separator: text placed between two rows before tokenising (``concatenate``).
        chunking: ``concatenate`` or ``per_row`` (above).
        min_len_chars: rows whose text has at most this many characters are dropped before anything else
            (RMU's ``min_len``: 50 for the WMDP corpora); 0 keeps every row.
        local_dir, local_name: read ``<local_dir>/<local_name>.json`` instead of the Hub; ``local_dir_key``
            names the setting that gives ``local_dir`` (``paths.muse_news``) in error messages.
        keep_rows: only the rows it selects (``data.utils.RowFilter``: RWKU's targets), before anything else.
        local_fold: ``{index, count, nested}``: from a local file, keep only the rows of that fold
            (``fold_rows``), the stand-in for fold splits the Hub has and the local copy has not (MUSE's
            ``scal``/``sust`` subsets). Ignored when reading the Hub.
        last_token_is_eos, unlabelled_first_token: open-unlearning's conventions (``_TextDataset``).
    """

    @staticmethod
    def file_fields(args: dict) -> tuple[dict[str, str], tuple[str, ...]]:
        return {args.get("text_key", "text"): "text_key", **_filter_field(args)}, ()

    def __init__(self, hf_args: dict, tokenizer: PreTrainedTokenizerBase, template_args: Any = None,
                 text_key: str = "text", max_length: int = 2048, separator: str = "\n\n",
                 local_dir: str | None = None, local_name: str | None = None, name: str = "PretrainingDataset",
                 local_dir_key: str = "paths.tofu", local_fold: dict | None = None,
                 chunking: str = "concatenate", min_len_chars: int = 0, last_token_is_eos: bool = False,
                 unlabelled_first_token: bool = False, keep_rows: dict | None = None) -> None:
        super().__init__(name, last_token_is_eos, unlabelled_first_token)
        self.max_length = check_number("max_length", max_length, integer=True, low=1, owner=name,
                                       hint="data.dataset_args.max_length, or the dataset config's args.max_length")
        check_choice("chunking", chunking, CHUNKING, owner=name)
        check_number("min_len_chars", min_len_chars, integer=True, low=0, owner=name)
        rows = load_rows(dict(hf_args), local_dir, name, fields={text_key: "text_key"}, local_name=local_name,
                         local_dir_key=local_dir_key, keep_rows=RowFilter.from_config(keep_rows, name))
        if len(rows) == 0:
            raise ValueError(f"{name}: dataset {dict(hf_args)} (local_dir={local_dir}) has no rows")
        if text_key not in rows.column_names:
            raise KeyError(f"{name}: text_key={text_key!r} is not a column of {dict(hf_args)}; columns: "
                           f"{rows.column_names}")
        if local_fold is not None and local_dir:
            unknown = set(local_fold) - {"index", "count", "nested"}
            if unknown:
                raise ValueError(f"{name}: local_fold has unknown keys {sorted(unknown)}; valid: index, count, nested")
            try:
                picked = fold_rows(len(rows), local_fold.get("index"), local_fold.get("count"),
                                   check_bool("local_fold.nested", local_fold.get("nested", False)))
            except ValueError as e:
                raise type(e)(f"{name}: {e}") from None
            rows = rows.select(picked)
        self.tokenizer = tokenizer
        texts = [t for t in rows[text_key] if len(t) > min_len_chars]
        if chunking == "concatenate":
            tokens = tokenizer(separator.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
            pieces = [tokens[offset:offset + self.max_length] for offset in range(0, len(tokens), self.max_length)]
        else:
            encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length,
                                verbose=False)["input_ids"] if texts else []
            pieces = [ids for ids in encoded if ids]
        if not pieces:
            kept = f" ({len(texts)} of {len(rows)} rows longer than min_len_chars={min_len_chars})" if min_len_chars else ""
            raise ValueError(f"{name}: the text of {dict(hf_args)} is empty{kept}: nothing to train or score")
        start = leading_special_tokens(tokenizer)
        for piece in pieces:
            self._add(start + piece, [IGNORE_INDEX] * len(start) + piece)
        self.num_tokens = sum(len(p) for p in pieces)

    def prompt_text(self, index: int) -> str:
        return ""

    def answer_texts(self, index: int) -> list[str]:
        """The chunk's text (decoded on demand: zlib sizes and generation records read it, training never does)."""
        input_ids, labels = self._samples[index]
        return [self.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])]


class CompletionDataset(_TextDataset):
    """``prefix + continuation`` per row; the labels cover the continuation (at most ``max_length`` tokens).

    The whole text (``prefix``, a space when ``insert_space``, the continuation) is tokenised at once,
    after the tokenizer's leading special tokens; the prompt is the tokens that end within the prefix,
    so it is an exact token prefix of the sample. ``prefix_key: null`` (or a column the rows lack) gives an
    empty prefix: the whole text is scored (MUSE's membership chunks). A slow tokenizer (no offsets)
    tokenises the prefix and the continuation separately instead.

    Args:
        hf_args: ``datasets.load_dataset`` arguments (Hub).
        prefix_key: the column of the prompt, or null.
        text_key: the column of the continuation.
        max_length: continuation tokens kept (the rest is cut, with a warning count).
        insert_space: put a space between prefix and continuation (MUSE's verbatim prompts).
        keep_rows: only the rows it selects (``data.utils.RowFilter``: RWKU's targets).
        local_dir, local_name: read ``<local_dir>/<local_name>.json`` instead of the Hub.
        last_token_is_eos, unlabelled_first_token: open-unlearning's conventions (``_TextDataset``).
    """

    @staticmethod
    def file_fields(args: dict) -> tuple[dict[str, str], tuple[str, ...]]:
        fields = {args.get("text_key", "text"): "text_key", **_filter_field(args)}
        if args.get("prefix_key"):
            fields[args["prefix_key"]] = "prefix_key"
        return fields, ()

    def __init__(self, hf_args: dict, tokenizer: PreTrainedTokenizerBase, template_args: Any = None,
                 prefix_key: str | None = "prompt", text_key: str = "text", max_length: int = 2048,
                 insert_space: bool = False, local_dir: str | None = None, local_name: str | None = None,
                 name: str = "CompletionDataset", local_dir_key: str = "paths.tofu", last_token_is_eos: bool = False,
                 unlabelled_first_token: bool = False, keep_rows: dict | None = None) -> None:
        super().__init__(name, last_token_is_eos, unlabelled_first_token)
        self.max_length = check_number("max_length", max_length, integer=True, low=1, owner=name,
                                       hint="data.dataset_args.max_length, or the dataset config's args.max_length")
        fields = {text_key: "text_key", **({prefix_key: "prefix_key"} if prefix_key else {})}
        rows = load_rows(dict(hf_args), local_dir, name, fields=fields, local_name=local_name,
                         local_dir_key=local_dir_key, keep_rows=RowFilter.from_config(keep_rows, name))
        if len(rows) == 0:
            raise ValueError(f"{name}: dataset {dict(hf_args)} (local_dir={local_dir}) has no rows")
        self.prefixes = list(rows[prefix_key]) if prefix_key else [""] * len(rows)
        self.texts = list(rows[text_key])
        self.tokenizer = tokenizer
        joiner = " " if insert_space else ""
        start = leading_special_tokens(tokenizer)
        cut = 0
        self._cut_texts: dict[int, str] = {}
        for i, (prefix, text) in enumerate(zip(self.prefixes, self.texts)):
            prompt, continuation = self._split_tokens(prefix, joiner + text)
            if len(continuation) > self.max_length:
                continuation = continuation[:self.max_length]
                self._cut_texts[i] = tokenizer.decode(continuation).removeprefix(joiner)
                cut += 1
            if not continuation:
                raise ValueError(f"{name}: row {i} has an empty continuation ({text_key}={text!r})")
            self._add(start + prompt + continuation, [IGNORE_INDEX] * (len(start) + len(prompt)) + continuation)
        if cut:
            log.info("%s: %d of %d continuations cut to max_length=%d tokens", name, cut, len(self.texts), max_length)

    def _split_tokens(self, prefix: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, continuation ids)`` of ``prefix + continuation`` tokenised together."""
        if not prefix:
            return [], self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not getattr(self.tokenizer, "is_fast", False):
            return (self.tokenizer(prefix, add_special_tokens=False)["input_ids"],
                    self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        encoded = self.tokenizer(prefix + continuation, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        boundary = next((k for k, (_, end) in enumerate(offsets) if end > len(prefix)), len(ids))
        return ids[:boundary], ids[boundary:]

    def prompt_text(self, index: int) -> str:
        return self.prefixes[index]

    def answer_texts(self, index: int) -> list[str]:
        """The continuation the labels cover: the row's text, or its first ``max_length`` tokens decoded when cut;
        with ``unlabelled_first_token``, the labelled tokens decoded (special tokens skipped), as open-unlearning
        derives the text."""
        if self.unlabelled_first_token:
            labels = self._samples[index][1]
            return [self.tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)]
        return [self._cut_texts.get(index, self.texts[index])]


class ConcatenatedDataset(Dataset):
    """Several datasets one after the other (``data.train=[MUSE_forget,MUSE_retain]``: a MUSE target model's
    corpus); item ``i`` keeps its sample but its ``index`` becomes ``i``, so indices stay unique."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts = parts
        self.name = "+".join(getattr(p, "name", type(p).__name__) for p in parts)
        self._starts = [0]
        for part in parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range (size {len(self)})")
        part = next(k for k in range(len(self.parts)) if index < self._starts[k + 1])
        item = self.parts[part][index - self._starts[part]]
        return {**item, "index": index} if isinstance(item, dict) and "index" in item else item

    def lengths(self) -> list[int]:
        return [n for part in self.parts for n in part.lengths()]


__all__ = ["PretrainingDataset", "CompletionDataset", "ConcatenatedDataset", "leading_special_tokens"]
