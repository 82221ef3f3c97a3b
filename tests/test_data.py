"""Tests of the data layer: prompt building and label masking, datasets, pairing, collation, registry.

Runs offline with the SmolLM2-135M-Instruct tokenizer (the converted copy under .cache/models) on a
small generated TOFU-format folder; the checks against the real TOFU files are skipped without them.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data import (
    ForgetRetainDataset,
    QADataset,
    available_datasets,
    build_dataset,
    compose_dataset,
    get_collator,
    get_data,
)
from data.collators import (
    BatchLayout,
    DataCollatorForSupervisedDataset,
    DataCollatorForSupervisedDatasetWithIndices,
    Parts,
    layout_of,
)
from data.utils import IGNORE_INDEX, PromptTemplate, answer_end_token_id, to_sample, tokenize_qa_batch
from synthetic_tofu import generate_tofu_like

REPO = Path(__file__).resolve().parents[1]
REAL_TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
QUESTION = "Who wrote the novel 'The Silent Harbor'?"
ANSWER = "The Silent Harbor was written by Elias Halvorsen."
# Prints date_string (Llama-3 style) so tests can see which date reached the template.
DATE_TEMPLATE = (
    "Date: {{ date_string }}\n"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_tok(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    return tok


@pytest.fixture(scope="module")
def data_tofu_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tofu_like")
    generate_tofu_like(folder, n_authors=10, qa_per_author=3, seed=0)
    return folder


@pytest.fixture(scope="module")
def data_root_cfg(data_tofu_dir):
    return OmegaConf.create({"paths": {"tofu": str(data_tofu_dir)}, "seed": 0})


def _im_end(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


def _ids(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def _n_prompt(labels) -> int:
    labels = list(labels)
    n = 0
    while n < len(labels) and labels[n] == IGNORE_INDEX:
        n += 1
    assert all(v != IGNORE_INDEX for v in labels[n:]), "-100 after the first answer token"
    return n


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sample(ids, labels=None, index=0):
    ids = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": ids,
        "labels": ids.clone() if labels is None else torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.ones_like(ids),
        "index": index,
    }


# ----------------------------------------------------------------------------------------------
# 1. Label masking with the chat template
# ----------------------------------------------------------------------------------------------


def test_chat_template_sample_is_prompt_plus_answer_plus_end_of_turn(data_tok):
    tok = data_tok
    template = PromptTemplate()
    (out,) = tokenize_qa_batch(tok, template, [QUESTION], [ANSWER], max_length=512)
    prompt_text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                          tokenize=False)
    prompt_ids = _ids(tok, prompt_text)
    expected = prompt_ids + _ids(tok, ANSWER) + [_im_end(tok)]
    assert out.input_ids == expected
    assert not out.truncated
    n = len(prompt_ids)
    assert out.labels[:n] == [IGNORE_INDEX] * n
    assert out.labels[n:] == out.input_ids[n:]
    assert _n_prompt(out.labels) == n
    assert out.labels[-1] == _im_end(tok)
    assert answer_end_token_id(tok, template) == _im_end(tok)
    # The prompt is a true prefix: decoding it gives the chat-template text exactly.
    assert tok.decode(out.input_ids[:n]) == prompt_text
    assert tok.decode(out.input_ids[n:-1]) == ANSWER

    # Through the dataset item: tensors, all-ones attention mask.
    sample = to_sample(out, 7)
    assert sample["input_ids"].tolist() == expected
    assert sample["attention_mask"].tolist() == [1] * len(expected)
    assert sample["index"] == 7


def test_system_prompt_reaches_chat_template(data_tok):
    tok = data_tok
    template = PromptTemplate(system_prompt="You are a careful test bot.")
    (out,) = tokenize_qa_batch(tok, template, [QUESTION], [ANSWER], max_length=512)
    prompt = tok.decode(out.input_ids[: _n_prompt(out.labels)])
    assert "<|im_start|>system\nYou are a careful test bot.<|im_end|>" in prompt
    assert "SmolLM" not in prompt  # the template's default system prompt is replaced
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_date_string_is_fixed_and_passed_to_template(data_tok):
    tok = copy.deepcopy(data_tok)
    tok.chat_template = DATE_TEMPLATE
    today = datetime.date.today().strftime("%d %b %Y")

    (out,) = tokenize_qa_batch(tok, PromptTemplate(), [QUESTION], [ANSWER], max_length=512)
    prompt = tok.decode(out.input_ids[: _n_prompt(out.labels)])
    assert prompt == f"Date: 10 Apr 2025\nuser: {QUESTION}\nassistant: "
    if today != "10 Apr 2025":
        assert today not in prompt
    # No end-of-turn special token in this template: answers end with EOS.
    assert out.input_ids[-1] == tok.eos_token_id

    (out2,) = tokenize_qa_batch(tok, PromptTemplate(date_string="01 Jan 1999"), [QUESTION], [ANSWER], 512)
    assert tok.decode(out2.input_ids[: _n_prompt(out2.labels)]).startswith("Date: 01 Jan 1999\n")
    # The shared tokenizer is untouched.
    assert "im_start" in data_tok.chat_template


# ----------------------------------------------------------------------------------------------
# 2. Plain (base-model) template
# ----------------------------------------------------------------------------------------------


def test_plain_template_uses_tags_and_eos(data_tok):
    tok = data_tok
    template = PromptTemplate(apply_chat_template=False, user_start_tag="Q: ", user_end_tag=" | ",
                              asst_start_tag="A:")
    (out,) = tokenize_qa_batch(tok, template, [QUESTION], [ANSWER], max_length=512)
    prompt_text = f"Q: {QUESTION} | A:"
    # Special tokens as the tokenizer adds them by default (SmolLM2 adds no BOS).
    prompt_ids = _ids(tok, prompt_text, special=True)
    n = _n_prompt(out.labels)
    assert out.input_ids[:n] == prompt_ids
    assert tok.decode(out.input_ids[:n], skip_special_tokens=True) == prompt_text
    assert out.input_ids[n:] == _ids(tok, ANSWER) + [tok.eos_token_id]
    assert out.labels[n:] == out.input_ids[n:]
    assert out.input_ids[-1] == tok.eos_token_id
    assert "<|im_start|>" not in tok.decode(out.input_ids)  # no chat template anywhere


def test_plain_template_default_tags(data_tok):
    (out,) = tokenize_qa_batch(data_tok, PromptTemplate(apply_chat_template=False), ["Why?"], ["Because."], 512)
    n = _n_prompt(out.labels)
    assert data_tok.decode(out.input_ids[:n]) == "Question: Why?\nAnswer: "


# ----------------------------------------------------------------------------------------------
# 3. max_length
# ----------------------------------------------------------------------------------------------


def test_prompt_longer_than_max_length_is_an_error(data_tok):
    template = PromptTemplate()
    n_prompt = len(tokenize_qa_batch(data_tok, template, [QUESTION], [ANSWER], 512)[0].input_ids) - \
        len(_ids(data_tok, ANSWER)) - 1
    for max_length in (5, n_prompt):  # a prompt that fills max_length leaves no room either
        with pytest.raises(ValueError, match=rf"max_length={max_length}") as exc:
            tokenize_qa_batch(data_tok, template, ["short", QUESTION], ["x", ANSWER], max_length,
                              row_ids=["row-a", "row-b"])
        assert "row-a" in str(exc.value) or "row-b" in str(exc.value)
    with pytest.raises(ValueError, match=r"sample 1\b"):
        tokenize_qa_batch(data_tok, template, ["q", QUESTION * 40], ["x", ANSWER], 120)


def test_long_answer_is_cut_to_max_length(data_tok):
    template = PromptTemplate()
    full = tokenize_qa_batch(data_tok, template, [QUESTION], [ANSWER], 512)[0]
    n = _n_prompt(full.labels)
    for max_length in (n + 1, n + 3, len(full.input_ids) - 1):
        (cut,) = tokenize_qa_batch(data_tok, template, [QUESTION], [ANSWER], max_length)
        assert cut.truncated
        assert len(cut.input_ids) == len(cut.labels) == max_length
        assert cut.input_ids == full.input_ids[:max_length]
        assert cut.labels == full.labels[:max_length]
    # Exactly fitting is not a cut.
    (fit,) = tokenize_qa_batch(data_tok, template, [QUESTION], [ANSWER], len(full.input_ids))
    assert not fit.truncated and fit.input_ids == full.input_ids


# ----------------------------------------------------------------------------------------------
# 4. template_args validation
# ----------------------------------------------------------------------------------------------


def test_unknown_template_args_key(data_tok):
    with pytest.raises(ValueError, match="system_promt") as exc:
        PromptTemplate.from_config({"system_promt": "typo", "apply_chat_template": True})
    for key in ("system_prompt", "date_string", "user_start_tag", "asst_start_tag", "apply_chat_template"):
        assert key in str(exc.value)
    assert PromptTemplate.from_config(None) == PromptTemplate()
    assert PromptTemplate.from_config({"system_prompt": "s"}).system_prompt == "s"


def test_chat_template_missing_is_an_error(data_tok):
    tok = copy.deepcopy(data_tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match="apply_chat_template"):
        tokenize_qa_batch(tok, PromptTemplate(), [QUESTION], [ANSWER], 512)


# ----------------------------------------------------------------------------------------------
# 5. Perturbed (list) answers
# ----------------------------------------------------------------------------------------------


def test_perturbed_answers_are_grouped(data_tok, data_tofu_dir):
    ds = QADataset({"path": "locuslab/TOFU", "name": "forget10_perturbed", "split": "train"}, data_tok,
                   answer_key="perturbed_answer", local_dir=str(data_tofu_dir))
    rows = _rows(data_tofu_dir / "forget10_perturbed.json")
    assert len(ds) == len(rows) == 3
    assert ds.is_grouped
    for i, row in enumerate(rows):
        group = ds[i]
        assert isinstance(group, list) and len(group) == 5 == len(row["perturbed_answer"])
        n = _n_prompt(group[0]["labels"])
        prompt = group[0]["input_ids"][:n].tolist()
        for sample, answer in zip(group, row["perturbed_answer"]):
            assert sample["index"] == i
            assert _n_prompt(sample["labels"]) == n
            assert sample["input_ids"][:n].tolist() == prompt
            assert data_tok.decode(sample["input_ids"][n:-1]) == answer
            assert sample["input_ids"][-1].item() == _im_end(data_tok)
        assert QUESTION not in data_tok.decode(prompt) and row["question"] in data_tok.decode(prompt)
    assert ds.lengths() == [max(len(s["input_ids"]) for s in ds[i]) for i in range(len(ds))]

    batch = DataCollatorForSupervisedDataset(data_tok)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 10
    assert batch["group"].tolist() == [0] * 5 + [1] * 5
    for row in range(10):
        sample = ds[row // 5][row % 5]
        length = len(sample["input_ids"])
        assert batch["input_ids"][row, :length].tolist() == sample["input_ids"].tolist()
        assert batch["attention_mask"][row].sum().item() == length


# ----------------------------------------------------------------------------------------------
# 6. Collators
# ----------------------------------------------------------------------------------------------


def test_collator_pads_right_and_left(data_tok):
    pad = data_tok.pad_token_id
    short = _sample([11, 12], labels=[IGNORE_INDEX, 12], index=3)
    long = _sample([21, 22, 23, 24], labels=[IGNORE_INDEX, IGNORE_INDEX, 23, 24], index=5)

    right = DataCollatorForSupervisedDataset(data_tok)([short, long])
    assert right["input_ids"].tolist() == [[11, 12, pad, pad], [21, 22, 23, 24]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 12, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX, IGNORE_INDEX, 23, 24]]
    assert right["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert right["input_ids"].dtype == torch.long
    assert "index" not in right
    # host-side facts for the trainers: first answer label at position 1; answer targets 12, 23, 24
    assert right["layout"] == BatchLayout("right", True, answer_start=1, answer_tokens=3)
    assert right["layout"].causal_attention_suffices

    left = DataCollatorForSupervisedDataset(data_tok, padding_side="left")([short, long])
    assert left["input_ids"].tolist() == [[pad, pad, 11, 12], [21, 22, 23, 24]]
    assert left["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 12],
                                       [IGNORE_INDEX, IGNORE_INDEX, 23, 24]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    # the answer span is known on the host for either side; only right padding runs without the mask
    assert left["layout"] == BatchLayout("left", True, answer_start=2, answer_tokens=3)
    assert not left["layout"].causal_attention_suffices


def test_collator_keeps_attention_on_inner_pad_tokens(data_tok):
    pad = data_tok.pad_token_id  # == EOS == <|im_end|>
    inner = _sample([5, pad, 6, pad])
    other = _sample([7, 8, 9, 10, 11])
    for side in ("right", "left"):
        batch = DataCollatorForSupervisedDataset(data_tok, padding_side=side)([inner, other])
        expected = [1, 1, 1, 1, 0] if side == "right" else [0, 1, 1, 1, 1]
        assert batch["attention_mask"][0].tolist() == expected
        assert batch["labels"][0].tolist().count(pad) == 2  # EOS labels are kept, not masked


def test_collator_nested_batches(data_tok):
    pad = data_tok.pad_token_id
    items = [
        Parts(forget=_sample([1, 2], index=0), retain=_sample([3, 4, 5], index=9)),
        Parts(forget=_sample([6, 7, 8], index=1), retain=_sample([9], index=4)),
    ]
    batch = DataCollatorForSupervisedDataset(data_tok)(items)
    assert set(batch) == {"forget", "retain"}
    assert batch["forget"]["input_ids"].tolist() == [[1, 2, pad], [6, 7, 8]]
    assert batch["retain"]["input_ids"].tolist() == [[3, 4, 5], [9, pad, pad]]
    assert batch["retain"]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "index" not in batch["forget"]

    # Doubly nested (IdkDPO): {"forget": {"original", "alternate"}, "retain"}.
    idk_items = [Parts(forget=Parts(original=_sample([1]), alternate=_sample([2, 3])), retain=_sample([4]))]
    nested = DataCollatorForSupervisedDatasetWithIndices(data_tok)(idk_items)
    assert nested["forget"]["alternate"]["input_ids"].tolist() == [[2, 3]]
    assert nested["forget"]["original"]["index"].tolist() == [0]


def test_collator_index_only_when_asked(data_tok):
    items = [_sample([1, 2], index=4), _sample([3], index=8)]
    assert "index" not in DataCollatorForSupervisedDataset(data_tok)(items)
    with_idx = DataCollatorForSupervisedDatasetWithIndices(data_tok)(items)
    assert with_idx["index"].tolist() == [4, 8]
    assert DataCollatorForSupervisedDataset(data_tok, index=True)(items)["index"].tolist() == [4, 8]
    assert "index" not in DataCollatorForSupervisedDatasetWithIndices(data_tok, index=False)(items)


def test_collator_invalid_padding_side(data_tok):
    with pytest.raises(ValueError, match="middle"):
        DataCollatorForSupervisedDataset(data_tok, padding_side="middle")
    with pytest.raises(ValueError, match="'up'"):
        DataCollatorForSupervisedDatasetWithIndices(data_tok, padding_side="up")


# ----------------------------------------------------------------------------------------------
# 7. ForgetRetainDataset
# ----------------------------------------------------------------------------------------------


def _partners(ds: ForgetRetainDataset) -> list[int]:
    return [ds[i]["retain"] for i in range(len(ds))]


def test_forget_retain_pairing():
    forget, retain = list(range(50)), [f"r{j}" for j in range(1000)]
    a = ForgetRetainDataset(forget, retain, seed=3)
    assert len(a) == 50
    assert [a[i]["forget"] for i in range(50)] == forget
    assert all(p in retain for p in _partners(a))
    assert len(set(_partners(a))) > 25  # draws, not a constant
    assert _partners(a) == _partners(ForgetRetainDataset(forget, retain, seed=3))
    assert _partners(a) == _partners(a)  # stable within an epoch

    # a sample's partner depends on (seed, epoch, index) only: two ranks reading different samples draw
    # different partners, and a sample has the same partner whatever the number of processes
    assert len(set(_partners(a)[0::2]) & set(_partners(a)[1::2])) < 10
    other_seed = _partners(ForgetRetainDataset(forget, retain, seed=4))
    assert sum(x != y for x, y in zip(_partners(a), other_seed)) > 40

    epoch0 = _partners(a)
    a.set_epoch(1)
    epoch1 = _partners(a)
    assert sum(x != y for x, y in zip(epoch0, epoch1)) > 40
    a.set_epoch(0)
    assert _partners(a) == epoch0


def test_forget_retain_without_retain_and_empty_sets():
    ds = ForgetRetainDataset([10, 20], None)
    assert len(ds) == 2
    assert ds[1] == {"forget": 20}
    with pytest.raises(ValueError, match="forget"):
        ForgetRetainDataset([], [1, 2])
    with pytest.raises(ValueError, match="retain"):
        ForgetRetainDataset([1], [])


# ----------------------------------------------------------------------------------------------
# 8. Registry and configs
# ----------------------------------------------------------------------------------------------


def test_every_dataset_builds_from_local_folder(data_tok, data_tofu_dir, data_root_cfg):
    names = available_datasets()
    assert "_TOFU_QA" not in names
    assert {"TOFU_QA_FORGET01", "TOFU_QA_FORGET10_IDK", "TOFU_QA_RA", "TOFU_QA_FULL"} <= set(names)
    refusals = {line.strip() for line in (data_tofu_dir / "idontknow.jsonl").read_text().splitlines() if line.strip()}
    for name in names:
        if name.endswith("_ALT"):  # needs <split>_alternate.json from scripts/generate_alternates.py (test_methods_pref)
            continue
        if name.startswith(("MUSE_", "WMDP_", "RWKU_")):  # other benchmarks: paths.muse_news / paths.wmdp / paths.rwku
            # (test_muse.py, test_wmdp.py, test_rwku.py)
            continue
        ds = build_dataset(compose_dataset(name, data_root_cfg), data_tok)
        assert len(ds) > 0, name
        item = ds[0]
        if name.endswith("_IDK"):
            assert set(item) == {"original", "alternate"}, name
            n = _n_prompt(item["alternate"]["labels"])
            assert item["alternate"]["input_ids"][:n].tolist() == item["original"]["input_ids"][:n].tolist()
            for i in range(len(ds)):
                alt = ds[i]["alternate"]
                m = _n_prompt(alt["labels"])
                assert data_tok.decode(alt["input_ids"][m:-1]) in refusals, name
                assert alt["labels"][-1].item() == _im_end(data_tok)
        else:
            assert set(item) == {"input_ids", "labels", "attention_mask", "index"}, name
    # Row counts follow the files named by each config.
    full = build_dataset(compose_dataset("TOFU_QA_FULL", data_root_cfg), data_tok)
    assert len(full) == len(_rows(data_tofu_dir / "full.json")) == 30
    ra = build_dataset(compose_dataset("TOFU_QA_RA", data_root_cfg), data_tok)
    assert len(ra) == len(_rows(data_tofu_dir / "real_authors_perturbed.json"))


def test_idk_refusal_depends_on_seed_only(data_tok, data_root_cfg):
    def picks(seed):
        root = OmegaConf.merge(data_root_cfg, {"seed": seed})
        ds = build_dataset(compose_dataset("TOFU_QA_FORGET10_IDK", root), data_tok)
        return [ds[i]["alternate"]["input_ids"].tolist() for i in range(len(ds))]

    assert picks(0) == picks(0)
    assert picks(0) != picks(1)


def test_dataset_args_and_template_args_reach_datasets(data_tok, data_root_cfg):
    ds = build_dataset(compose_dataset("TOFU_QA_FORGET01", data_root_cfg), data_tok,
                       template_args=OmegaConf.create({"apply_chat_template": False}),
                       dataset_args={"max_length": 30})
    assert all(len(ds[i]["input_ids"]) <= 30 for i in range(len(ds)))
    assert data_tok.decode(ds[0]["input_ids"]).startswith("Question: ")


def test_unknown_dataset_name(data_tok, data_root_cfg):
    with pytest.raises(ValueError, match="TOFU_QA_NOPE") as exc:
        build_dataset(compose_dataset("TOFU_QA_NOPE", data_root_cfg), data_tok)
    assert "TOFU_QA_FORGET01" in str(exc.value) and "TOFU_QA_RETAIN90" in str(exc.value)


def test_missing_local_file(data_tok, tmp_path):
    root = OmegaConf.create({"paths": {"tofu": str(tmp_path)}, "seed": 0})
    with pytest.raises(FileNotFoundError) as exc:
        build_dataset(compose_dataset("TOFU_QA_FORGET05", root), data_tok)
    msg = str(exc.value)
    assert "forget05.json" in msg and f"paths.tofu={tmp_path}" in msg


def test_missing_idk_file(data_tok, data_tofu_dir, tmp_path):
    (tmp_path / "forget01.json").write_text((data_tofu_dir / "forget01.json").read_text())
    root = OmegaConf.create({"paths": {"tofu": str(tmp_path)}, "seed": 0})
    with pytest.raises(FileNotFoundError, match="idontknow.jsonl"):
        build_dataset(compose_dataset("TOFU_QA_FORGET01_IDK", root), data_tok)


def test_wrong_answer_key(data_tok, data_root_cfg):
    from data.utils import DataFileError

    with pytest.raises(DataFileError) as exc:
        build_dataset(compose_dataset("TOFU_QA_FORGET01", data_root_cfg), data_tok, dataset_args={"answer_key": "nope"})
    msg = str(exc.value)
    assert "forget01.json, line 1: no 'nope' field (answer_key='nope')" in msg
    assert re.search(r"the row has: .*answer.*question", msg) and "\n" not in msg


def _data(data: dict, root) -> object:
    """``data`` with its dataset names composed in a run config of ``root`` (as the entry point does)."""
    from resolvers import compose_names

    return compose_names(OmegaConf.merge(root, {"data": data})).data


def test_get_data_modes(data_tok, data_root_cfg):
    data_cfg = _data({"forget": "TOFU_QA_FORGET10", "retain": "TOFU_QA_RETAIN90",
                      "eval": None, "dataset_args": {"max_length": 64}}, data_root_cfg)
    out = get_data(data_cfg, "unlearn", data_tok, seed=5)
    train = out["train"]
    assert isinstance(train, ForgetRetainDataset)
    assert len(train) == len(out["forget"]) == 3
    assert len(out["retain"]) == 27
    assert train.seed == 5
    assert out["eval"] is None
    item = train[0]
    assert set(item) == {"forget", "retain"}
    assert len(item["retain"]["input_ids"]) <= 64

    no_retain = get_data(_data({"forget": "TOFU_QA_FORGET01"}, data_root_cfg), "unlearn", data_tok)
    assert set(no_retain["train"][0]) == {"forget"}

    train_out = get_data(_data({"train": "TOFU_QA_FULL", "eval": "TOFU_QA_FORGET01"}, data_root_cfg), "train", data_tok)
    assert len(train_out["train"]) == 30 and len(train_out["eval"]) == 3

    with pytest.raises(ValueError, match="bogus"):
        get_data(data_cfg, "bogus", data_tok)
    with pytest.raises(ValueError, match="data.forget"):
        get_data(_data({"retain": "TOFU_QA_RETAIN90"}, data_root_cfg), "unlearn", data_tok)
    with pytest.raises(ValueError, match="data.train"):
        get_data(_data({"forget": "TOFU_QA_FORGET01"}, data_root_cfg), "train", data_tok)
    # a name reaches get_data only composed: get_data refuses one, naming the setting and the valid names
    with pytest.raises(ValueError, match=r"data.forget='TOFU_QA_FORGET01' is a dataset name.*valid names: .*TOFU_QA_RA"):
        get_data({"forget": "TOFU_QA_FORGET01"}, "unlearn", data_tok)


def test_get_collator(data_tok):
    coll = get_collator(OmegaConf.create({"handler": "DataCollatorForSupervisedDataset",
                                          "args": {"padding_side": "left"}}), data_tok)
    assert isinstance(coll, DataCollatorForSupervisedDataset) and coll.padding_side == "left"
    coll = get_collator({"handler": "DataCollatorForSupervisedDatasetWithIndices"}, data_tok)
    assert coll.index
    with pytest.raises(ValueError, match="NoSuchCollator") as exc:
        get_collator({"handler": "NoSuchCollator"}, data_tok)
    assert "DataCollatorForSupervisedDataset" in str(exc.value)
    assert "DataCollatorForSupervisedDatasetWithIndices" in str(exc.value)


# ----------------------------------------------------------------------------------------------
# 9. The real TOFU files
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_TOFU.is_dir(), reason=f"real TOFU files not found at {REAL_TOFU}")
def test_real_tofu_sizes(data_tok):
    root = OmegaConf.create({"paths": {"tofu": str(REAL_TOFU)}, "seed": 0})
    forget = build_dataset(compose_dataset("TOFU_QA_FORGET01", root), data_tok)
    assert len(forget) == 40
    assert forget[0]["labels"][-1].item() == _im_end(data_tok)
    assert len(build_dataset(compose_dataset("TOFU_QA_RA", root), data_tok)) == 100


def test_concat_batches_pads_to_the_widest_and_keeps_rows():
    from data.collators import concat_batches

    a = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[-100, 6, 7]]),
         "attention_mask": torch.tensor([[1, 1, 1]]), "layout": BatchLayout("right", True, 1, 2)}
    b = {"input_ids": torch.tensor([[8, 9], [10, 11]]), "labels": torch.tensor([[-100, -100], [-100, 11]]),
         "attention_mask": torch.tensor([[1, 1], [1, 0]]), "layout": BatchLayout("right", True, 1, 1),
         "index": torch.tensor([3, 4])}
    joint = concat_batches([b, a])
    assert joint["input_ids"].tolist() == [[8, 9, 0], [10, 11, 0], [5, 6, 7]]
    assert joint["labels"].tolist() == [[-100, -100, -100], [-100, 11, -100], [-100, 6, 7]]
    assert joint["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert joint["layout"] == BatchLayout("right", True, 1, 3) and "index" not in joint


def test_batch_contracts_are_checked():
    """A batch's layout is a typed field, and code that needs it refuses a batch without one; batches that
    cannot be joined, unknown item shapes, a bad padding side and labels changed after collation are refused
    with what to do."""
    from conftest import StubLM
    from data.collators import concat_batches, relabelled
    from model.forward import answer_span_logits, model_inputs
    from trainer.answer_nll import answer_token_nll

    bare = {"input_ids": torch.tensor([[0, 2]]), "labels": torch.tensor([[-100, 2]]),
            "attention_mask": torch.tensor([[1, 1]])}
    for use in (model_inputs, lambda b: answer_span_logits(StubLM(), b)):
        with pytest.raises(ValueError, match=r"must carry its layout .*\['attention_mask', 'input_ids', 'labels'\].*"
                                             r"layout_of"):
            use(bare)
    right = {**bare, "layout": layout_of(bare["labels"])}
    # right padding with a mask that hides padding only: the model runs without the mask ...
    assert set(model_inputs(right)) == {"input_ids"}
    # ... left padding, or a mask that also hides real tokens (compat's), keeps it: decided by the layout
    assert set(model_inputs({**bare, "layout": layout_of(bare["labels"], "left")})) == {"input_ids", "attention_mask"}
    hides_tokens = {**bare, "layout": layout_of(bare["labels"], mask_hides_padding_only=False)}
    assert set(model_inputs(hides_tokens)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match=r"right-padded batches whose masks are of one kind"):
        concat_batches([right, {**bare, "layout": layout_of(bare["labels"], "left")}])
    with pytest.raises(ValueError, match=r"right-padded batches whose masks are of one kind"):
        concat_batches([right, hides_tokens])
    with pytest.raises(ValueError, match=r"padding_side='middle'; valid: left, right"):
        BatchLayout("middle")
    with pytest.raises(ValueError, match=r"a dataset item must be a sample .*Parts.*got \['forget', 'retain'\]"):
        DataCollatorForSupervisedDataset(_Tok())([{"forget": {}, "retain": {}}])
    # labels edited after collation: the layout's answer count is stale, and the NLL paths that rely on it say so
    changed = {**right, "labels": torch.tensor([[-100, -100]])}
    with pytest.raises(RuntimeError, match=r"layout counts 1 answer tokens but its labels hold another number.*"
                                           r"relabelled"):
        answer_token_nll(StubLM(), changed, impl="chunked")
    fixed = relabelled(right, torch.tensor([[-100, -100]]))
    assert fixed["layout"].answer_tokens == 0 and fixed["layout"].answer_start == 2


class _Tok:
    pad_token_id = 0


class _Sized(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self._lengths = list(lengths)

    def __len__(self):
        return len(self._lengths)

    def __getitem__(self, i):
        return {"i": i, "length": self._lengths[i]}

    def lengths(self):
        return self._lengths


def test_length_matched_retain_pairing_draws_from_the_same_length_rank():
    forget = _Sized([30, 10, 20])                      # length ranks: item 1, item 2, item 0
    retain = _Sized([5, 60, 15, 50, 25, 40])          # sorted by length: 0 (5), 2 (15), 4 (25), 5 (40), 3 (50), 1 (60)
    paired = ForgetRetainDataset(forget, retain, seed=3, retain_pairing="length_matched")
    slices = {1: {0, 2}, 2: {4, 5}, 0: {3, 1}}       # the r-th third of that order for the r-th shortest forget item
    drawn = {i: set() for i in range(3)}
    for epoch in range(40):
        paired.set_epoch(epoch)
        for i in range(3):
            drawn[i].add(paired[i]["retain"]["i"])
    assert drawn == slices                             # every retain sample used, each within its slice
    random_pairs, anywhere = ForgetRetainDataset(forget, retain, seed=3), set()
    for epoch in range(40):
        random_pairs.set_epoch(epoch)
        anywhere.add(random_pairs[0]["retain"]["i"])
    assert anywhere - slices[0]  # the default draws outside the slice
    # fewer retain than forget samples: neighbouring forget items share a retain sample
    small = ForgetRetainDataset(_Sized([1, 2, 3, 4]), _Sized([9, 7]), retain_pairing="length_matched")
    assert [small[i]["retain"]["i"] for i in range(4)] == [1, 1, 0, 0]


def test_retain_pairing_errors():
    with pytest.raises(ValueError, match=r"retain_pairing='by_length'; valid: random, length_matched"):
        ForgetRetainDataset(_Sized([1]), _Sized([1]), retain_pairing="by_length")
    no_lengths = [{"i": 0}]
    with pytest.raises(TypeError, match=r"retain dataset list has no lengths\(\); retain_pairing=length_matched"):
        ForgetRetainDataset(_Sized([1]), no_lengths, retain_pairing="length_matched")
