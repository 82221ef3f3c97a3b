"""Question-answer datasets in the TOFU format (one JSON object per row).

``QADataset`` is the workhorse: it reads rows from the Hub (``datasets.load_dataset``) or from a local
folder of JSON-lines files, tokenizes every (question, answer) pair once at construction, and returns
samples whose labels cover the answer only. An answer column holding a list (TOFU's
``perturbed_answer``) gives one sample per answer, grouped under the question's index.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any

import datasets
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from checks import check_bool, check_number
from data.collators import Parts
from data.utils import (
    DataFileError,
    PromptFormat,
    PromptTemplate,
    RowFilter,
    ValuesSource,
    check_rows_file,
    read_text_lines,
    to_sample,
    tokenize_qa_batch,
)

log = logging.getLogger(__name__)


def local_stem(args: dict) -> str | None:
    """The name of a dataset's local file (without ``.json``): its ``local_name``, else its Hub config
    name (``hf_args.name``: TOFU's ``forget10`` -> ``forget10.json``)."""
    return args.get("local_name") or (args.get("hf_args") or {}).get("name")


def local_data_file(local_dir: str, stem: str | None, name: str = "dataset", hint: str = "",
                    local_dir_key: str = "paths.tofu") -> Path:
    """``<local_dir>/<stem>.json`` (or ``.jsonl``), or a FileNotFoundError naming the missing file, the
    setting that chose the folder (``local_dir_key``), the files the folder has, and ``hint`` (what to
    override instead)."""
    if not stem:
        raise ValueError(f"{name}: local_name (or hf_args.name) is needed to find the local file in {local_dir}")
    folder = Path(local_dir)
    candidates = [folder / f"{stem}.json", folder / f"{stem}.jsonl"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        present = sorted(p.name for p in folder.glob("*.json*")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{name}: {candidates[0]} not found ({local_dir_key}={local_dir}). The folder must hold JSON-lines "
            f"files named after the Hub configs; it has: "
            f"{', '.join(present) or 'nothing (missing folder?)'}" + (f". {hint}" if hint else "")
        )
    return path


def load_rows(hf_args: dict, local_dir: str | None, name: str = "dataset", fields: dict[str, str] | None = None,
              lists: tuple[str, ...] = (), local_name: str | None = None,
              local_dir_key: str = "paths.tofu", keep_rows: RowFilter | None = None) -> datasets.Dataset:
    """Rows of one dataset: ``<local_dir>/<local_name or hf_args.name>.json`` when ``local_dir`` is set, else the Hub.

    ``local_dir`` is how ``paths.tofu=<folder>`` switches every TOFU config to local files named after
    the Hub config (``forget10`` -> ``forget10.json``); ``local_name`` names the file where the Hub
    config name alone does not (MUSE: subset ``raw``, split ``forget`` -> ``raw_forget.json``). A local
    file is first checked line by line (``data.utils.check_rows_file``: UTF-8, one JSON object per line,
    the ``fields`` present), so a bad file is a one-line DataFileError naming the file, the line and the
    field, not a pyarrow traceback. ``keep_rows``: only the rows it keeps (``RowFilter``).
    """
    if keep_rows is not None and keep_rows.values_from is not None:
        where = f"{local_dir_key}={local_dir}" if local_dir else f"the Hub dataset {hf_args.get('path')}"
        listing = keep_rows.values_from
        keep_rows = keep_rows.resolve(_listed_values(hf_args.get("path"), local_dir, listing, local_dir_key), name,
                                      f"{listing.name} ({listing.column}; {where})")
    filter_field = {keep_rows.column: "keep_rows.column"} if keep_rows else {}
    rows = _load_all_rows(hf_args, local_dir, name, {**(fields or {}), **filter_field}, lists, local_name,
                          local_dir_key)
    if keep_rows is None:
        return rows
    if keep_rows.column not in rows.column_names:
        raise KeyError(f"{name}: keep_rows.column={keep_rows.column!r} is not a column of {dict(hf_args)}; "
                       f"columns: {rows.column_names}")
    source = f"{local_dir_key}={local_dir}" if local_dir else f"the Hub dataset {dict(hf_args)}"
    return rows.select(keep_rows.apply(rows[keep_rows.column], name, source))


@functools.lru_cache(maxsize=32)
def _listed_values(hub_path: str | None, local_dir: str | None, listing: ValuesSource,
                   local_dir_key: str) -> tuple[str, ...]:
    """The values of ``listing`` (``keep_rows.values_from``) in order, read once per process and source."""
    rows = _load_all_rows({"path": hub_path, "name": listing.name, "split": listing.split}, local_dir,
                          f"keep_rows.values_from ({listing.name})", {listing.column: "keep_rows.values_from.column"},
                          (), None, local_dir_key)
    if listing.column not in rows.column_names:
        raise KeyError(f"keep_rows.values_from: {listing.column!r} is not a column of {listing.name}; columns: "
                       f"{rows.column_names}")
    return tuple(str(v) for v in rows[listing.column])


def _load_all_rows(hf_args: dict, local_dir: str | None, name: str, fields: dict[str, str], lists: tuple[str, ...],
                   local_name: str | None, local_dir_key: str) -> datasets.Dataset:
    if local_dir:
        path = local_data_file(local_dir, local_name or hf_args.get("name"), name, local_dir_key=local_dir_key)
        try:
            check_rows_file(path, fields, lists)
        except DataFileError as e:
            raise DataFileError(f"{name}: {e}") from None
        try:
            return datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as e:  # pyarrow's and datasets' errors: a multi-line traceback otherwise
            first = (str(e).strip().splitlines() or [""])[0]
            raise DataFileError(f"{name}: {path}: could not be loaded as JSON lines ({type(e).__name__}: {first})") from e
    return datasets.load_dataset(**hf_args)


class QADataset(Dataset):
    """Tokenized question-answer pairs; item ``i`` is a sample dict, or a list of them for list answers.

    Args:
        hf_args: ``datasets.load_dataset`` arguments (``path``, ``name``, ``split``).
        tokenizer: the model's tokenizer.
        template_args: the model config's prompt settings (``PromptTemplate``).
        question_key, answer_key: column names of the question and the answer(s).
        max_length: token budget of prompt + answer; answers are cut to fit, prompts never.
        local_dir: folder of JSON-lines files replacing the Hub (``paths.tofu``).
        name: the dataset's config name, used in messages.
        local_name: the local file's name (without ``.json``) when it is not ``hf_args.name``.
        local_dir_key: the setting that gives ``local_dir`` (``paths.tofu``), named in error messages.
        fewshot: in-context examples placed before every question (MUSE's knowledge QA): ``{"hf_args":
            ..., "local_name": ...}`` of a file of the same question and answer columns, read like the
            main one (from ``local_dir`` when set); ``max_examples`` keeps the first ones only.
        name: the dataset's config name, used in messages.
        labels_cover_chat_tail: prepare the samples as open-unlearning does
            (``tokenize_qa_like_open_unlearning``: the whole chat tokenized at once, the labels every token
            after the prompt); ``compat=open_unlearning`` sets it.
        answer_key: null for questions without a reference answer (RWKU's fluency instructions): each sample's
            answer is empty (only the end-of-answer token), for metrics that read generations only.
        prompt_format: how each question is put (``data.utils.PromptFormat``: a user-message template of the
            row's columns, an answer prefix, and per-value cases of a column); null: the question as it is.
        keep_rows: only the rows whose ``column`` holds one of ``values`` (``data.utils.RowFilter``: names, or a
            count N of the values another subset lists, ``values_from``), e.g. RWKU's targets; null: every row.

    The evaluation passes read a dataset through ``prompt_text(i)``, ``answer_texts(i)``, ``lengths()``,
    ``template`` (how prompts were built) and ``last_token_is_eos`` (True here: each answer ends with
    the end-of-answer token, which the memorisation and Min-K% metrics leave out).
    """

    last_token_is_eos = True

    @staticmethod
    def file_fields(args: dict) -> tuple[dict[str, str], tuple[str, ...]]:
        """``({column: config key}, list columns)`` a local file of this dataset must have (checked before any pass)."""
        question_key, answer_key = args.get("question_key", "question"), args.get("answer_key", "answer")
        fields = {question_key: "question_key"}
        if answer_key is not None:
            fields[answer_key] = "answer_key"
        name = args.get("name", "dataset")
        fields.update({c: "prompt_format" for c in PromptFormat.from_config(args.get("prompt_format"), name).columns()})
        row_filter = RowFilter.from_config(args.get("keep_rows"), name)
        if row_filter is not None:
            fields[row_filter.column] = "keep_rows.column"
        return fields, (() if answer_key is None else (answer_key,))

    def __init__(self, hf_args: dict, tokenizer: PreTrainedTokenizerBase, template_args: dict | None = None,
                 question_key: str = "question", answer_key: str | None = "answer", max_length: int = 512,
                 local_dir: str | None = None, name: str = "QADataset", labels_cover_chat_tail: bool = False,
                 local_name: str | None = None, fewshot: dict | None = None, local_dir_key: str = "paths.tofu",
                 prompt_format: dict | None = None, keep_rows: dict | None = None):
        self.name = name
        self.local_dir_key = local_dir_key
        self.labels_cover_chat_tail = check_bool("labels_cover_chat_tail", labels_cover_chat_tail, owner=name)
        max_length = check_number("max_length", max_length, integer=True, low=1, owner=name,
                                  hint="data.dataset_args.max_length, or the dataset config's args.max_length")
        self.question_key, self.answer_key = question_key, answer_key
        self.template = PromptTemplate.from_config(template_args)
        self.prompt_format = PromptFormat.from_config(prompt_format, name)
        extra = dict(getattr(self, "_extra_list_fields", {}))  # columns a subclass reads too (alternate_key)
        fields, lists = self.file_fields({"question_key": question_key, "answer_key": answer_key, "name": name,
                                          "prompt_format": prompt_format})
        fields, lists = {**fields, **extra}, (*lists, *extra)
        self.rows = load_rows(dict(hf_args), local_dir, name, fields=fields, lists=lists, local_name=local_name,
                              local_dir_key=local_dir_key, keep_rows=RowFilter.from_config(keep_rows, name))
        if len(self.rows) == 0:
            raise ValueError(f"{name}: dataset {dict(hf_args)} ({local_dir_key}={local_dir}) has no rows")
        for key, role in fields.items():
            if key not in self.rows.column_names:
                raise KeyError(
                    f"{name}: {role}={key!r} is not a column of {dict(hf_args)} ({local_dir_key}={local_dir}); "
                    f"columns: {self.rows.column_names}"
                )
        self.questions, self.answer_prefixes = self._put_questions()
        answers = self.rows[answer_key] if answer_key is not None else [""] * len(self.rows)
        self.is_grouped = isinstance(answers[0], list)
        # Flatten list answers so everything is tokenized in one batched call.
        flat_q, flat_a, flat_prefix, owner = [], [], [], []
        for i, (q, prefix, a) in enumerate(zip(self.questions, self.answer_prefixes, answers)):
            for ans in (a if self.is_grouped else [a]):
                flat_q.append(q)
                flat_a.append(ans)
                flat_prefix.append(prefix)
                owner.append(i)
        self.fewshot = self._read_fewshot(fewshot, local_dir)
        tokenized = tokenize_qa_batch(tokenizer, self.template, flat_q, flat_a, max_length, row_ids=owner,
                                      labels_cover_chat_tail=self.labels_cover_chat_tail,
                                      fewshot=self.fewshot, answer_prefixes=flat_prefix)
        n_cut = sum(t.truncated for t in tokenized)
        if n_cut:
            log.warning("%s: %d of %d answers cut to max_length=%d", name, n_cut, len(tokenized), max_length)
        self._samples: list[list] = [[] for _ in range(len(self.questions))]
        for i, tok in zip(owner, tokenized):
            self._samples[i].append(tok)

    def _put_questions(self) -> tuple[list[str], list[str]]:
        """Every row's user message and answer prefix (``prompt_format``; the bare question without one)."""
        questions = list(self.rows[self.question_key])
        if self.prompt_format == PromptFormat():
            return questions, [""] * len(questions)
        columns = sorted(self.prompt_format.columns())
        records = self.rows.select_columns(columns).to_list() if columns else [{} for _ in questions]
        rendered = [self.prompt_format.render(row, q, self.name, i) for i, (row, q) in enumerate(zip(records, questions))]
        return [text for text, _ in rendered], [prefix for _, prefix in rendered]

    def _read_fewshot(self, fewshot: dict | None, local_dir: str | None) -> list[tuple[str, str]]:
        """The in-context ``(question, answer)`` examples of the ``fewshot`` argument, or none."""
        if not fewshot:
            return []
        if self.answer_key is None:
            raise ValueError(f"{self.name}: fewshot examples need answers; set answer_key")
        unknown = sorted(set(fewshot) - {"hf_args", "local_name", "max_examples"})
        if unknown or "hf_args" not in fewshot:
            raise ValueError(f"{self.name}: fewshot={dict(fewshot)}; give hf_args (and optionally local_name, "
                             f"max_examples){f'; unknown keys {unknown}' if unknown else ''}")
        keys = {self.question_key: "question_key", self.answer_key: "answer_key"}
        rows = load_rows(dict(fewshot["hf_args"]), local_dir, f"{self.name} (fewshot)", fields=keys,
                         local_name=fewshot.get("local_name"), local_dir_key=self.local_dir_key)
        examples = list(zip(rows[self.question_key], rows[self.answer_key]))
        limit = fewshot.get("max_examples")
        if limit is not None:
            check_number("fewshot.max_examples", limit, integer=True, low=0, owner=self.name)
            examples = examples[:limit]
        if any(not isinstance(a, str) for _, a in examples):
            raise ValueError(f"{self.name}: fewshot answers must be strings (column {self.answer_key!r})")
        return examples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Any:
        samples = [to_sample(t, index) for t in self._samples[index]]
        return samples if self.is_grouped else samples[0]

    def prompt_text(self, index: int) -> str:
        """The question of row ``index`` as put to the model (what a generation record shows as its input)."""
        return self.questions[index]

    def answer_texts(self, index: int) -> list[str]:
        """The answer(s) of row ``index``, one per sample, in sample order ("" without an answer column)."""
        if self.answer_key is None:
            return [""]
        answer = self.rows[index][self.answer_key]
        return answer if isinstance(answer, list) else [answer]

    def lengths(self) -> list[int]:
        """Token length of each item (the longest answer of a group), for length-grouped sampling."""
        return [max(len(t.input_ids) for t in group) for group in self._samples]


class QAwithIdkDataset(QADataset):
    """Forget questions paired with a refusal answer (IdkDPO / IdkNLL).

    Item ``i`` is ``{"original": <sample with the true answer>, "alternate": <sample with a refusal>}``.
    The refusal for question ``i`` is drawn from ``idk_file`` with a generator seeded by (seed, i), so a
    question always gets the same refusal for a given seed.
    """

    def __init__(self, *args: Any, idk_file: str = "idontknow.jsonl", idk_repo: str = "locuslab/TOFU",
                 seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        local_dir = kwargs.get("local_dir")
        if local_dir:
            path = Path(local_dir) / idk_file
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: refusal file {path} not found (paths.tofu={local_dir})")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(idk_repo, idk_file, repo_type="dataset")
        refusals = read_text_lines(path)
        picks = [random.Random(f"{seed}-{i}").choice(refusals) for i in range(len(self.questions))]
        tokenizer = kwargs.get("tokenizer") or args[1]
        max_length = kwargs.get("max_length", 512)
        self._idk = tokenize_qa_batch(tokenizer, self.template, self.questions, picks, max_length,
                                      labels_cover_chat_tail=self.labels_cover_chat_tail,
                                      answer_prefixes=self.answer_prefixes)

    def __getitem__(self, index: int) -> Parts:
        return Parts(original=super().__getitem__(index), alternate=to_sample(self._idk[index], index))


class QAwithAlternateDataset(QADataset):
    """Forget questions paired with an alternate plausible answer (AltPO, Mekala et al. 2025, arXiv:2409.13474).

    Item ``i`` is ``{"original": <sample with the true answer>, "alternate": <sample with the alternate>}``.
    The alternate comes from the ``alternate_key`` column of the same rows. TOFU has no such column:
    ``scripts/generate_alternates.py`` adds it (e.g. ``forget10.json`` -> ``forget10_alternate.json``). A
    list column holds several alternates per question; one is drawn per question with a generator seeded
    by (seed, i), so a question always gets the same alternate for a given seed.
    """

    def __init__(self, hf_args: dict, tokenizer: PreTrainedTokenizerBase, *args: Any,
                 alternate_key: str = "alternate_answer", seed: int = 0, **kwargs: Any):
        how = ("alternate answers are not part of TOFU: write them with scripts/generate_alternates.py "
               "--input <paths.tofu>/<split>.json (it writes <split>_alternate.json) and set paths.tofu")
        if not kwargs.get("local_dir"):
            raise ValueError(f"{kwargs.get('name', type(self).__name__)}: paths.tofu is not set; {how}")
        self._extra_list_fields = {alternate_key: "alternate_key"}
        try:
            super().__init__(hf_args, tokenizer, *args, **kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; {how}") from e
        except DataFileError as e:
            if f"no {alternate_key!r} field" not in str(e):
                raise
            raise DataFileError(f"{e}; {how}") from None
        if alternate_key not in self.rows.column_names:
            raise KeyError(
                f"{self.name}: alternate_key={alternate_key!r} is not a column of {dict(hf_args)} "
                f"(paths.tofu={kwargs.get('local_dir')}); columns: {self.rows.column_names}. TOFU has no alternate "
                "answers: make them with scripts/generate_alternates.py"
            )
        picks = []
        for i, alt in enumerate(self.rows[alternate_key]):
            if isinstance(alt, list):
                alt = [a for a in alt if isinstance(a, str)]
                if not alt:
                    raise ValueError(f"{self.name}: row {i} has no alternate answer in column {alternate_key!r}")
                alt = random.Random(f"{seed}-{i}").choice(alt)
            if not isinstance(alt, str):
                raise ValueError(f"{self.name}: row {i} of column {alternate_key!r} is {alt!r}, not a string")
            picks.append(alt)
        max_length = kwargs.get("max_length", 512)
        self._alternates = tokenize_qa_batch(tokenizer, self.template, self.questions, picks, max_length,
                                             labels_cover_chat_tail=self.labels_cover_chat_tail,
                                             answer_prefixes=self.answer_prefixes)
        n_cut = sum(t.truncated for t in self._alternates)
        if n_cut:
            log.warning("%s: %d of %d alternate answers cut to max_length=%d", self.name, n_cut, len(picks), max_length)

    def __getitem__(self, index: int) -> Parts:
        return Parts(original=super().__getitem__(index), alternate=to_sample(self._alternates[index], index))
