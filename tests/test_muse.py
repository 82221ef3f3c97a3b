"""MUSE: raw-text datasets, few-shot knowledge prompts, scoring every token of raw text, the benchmark end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, run_cli
from data import build_dataset, compose_dataset
from data.text import CompletionDataset, ConcatenatedDataset, PretrainingDataset, leading_special_tokens
from data.utils import IGNORE_INDEX, PromptTemplate, format_prompt
from evals.metrics import TokenStats, get_metric, harmonic_mean

SHARED_MUSE = REPO.parent / "shared" / "data" / "muse_news"
PLAIN_TAGS = {"apply_chat_template": False, "user_start_tag": "Question: ", "user_end_tag": "\n",
              "asst_start_tag": "Answer: ", "asst_end_tag": "\n\n"}


@pytest.fixture(scope="module")
def muse_dir() -> Path:
    if not SHARED_MUSE.is_dir():
        pytest.skip(f"MUSE-News copy not found at {SHARED_MUSE} (only present on the project's machines)")
    return SHARED_MUSE


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def bos_tokenizer(smollm2_tokenizer):
    """The SmolLM2 tokenizer made to put a BOS token before every text (as Llama's does)."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(smollm2_tokenizer)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                       special_tokens=[("<|im_start|>", bos)])
    assert tok("a", add_special_tokens=True)["input_ids"][0] == bos
    return tok, bos


# ----- PretrainingDataset ------------------------------------------------------------------------------------
def test_pretraining_chunks_hold_every_token_once(smollm2_tokenizer, tmp_path):
    rows = [{"text": f"Article {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i)} for i in range(5)]
    _write_rows(tmp_path / "corpus.json", rows)
    expected = smollm2_tokenizer("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    assert leading_special_tokens(smollm2_tokenizer) == []  # SmolLM2 adds no BOS
    data = PretrainingDataset({"name": "corpus"}, smollm2_tokenizer, text_key="text", max_length=50,
                              local_dir=str(tmp_path))
    sizes = [len(data[i]["input_ids"]) for i in range(len(data))]
    assert len(data) == math.ceil(len(expected) / 50) and sizes[:-1] == [50] * (len(data) - 1)
    assert sizes[-1] == len(expected) - 50 * (len(data) - 1) > 0
    assert sum((data[i]["input_ids"].tolist() for i in range(len(data))), []) == expected  # tokenised once, in order
    assert all(torch.equal(data[i]["labels"], data[i]["input_ids"]) for i in range(len(data)))  # loss on every token
    assert data.lengths() == sizes and data.last_token_is_eos is False and data.template is None
    assert data.answer_texts(0)[0] == smollm2_tokenizer.decode(expected[:50])

    # a length that divides evenly: no empty last chunk
    even = PretrainingDataset({"name": "corpus"}, smollm2_tokenizer, max_length=len(expected) // 2
                              if len(expected) % 2 == 0 else len(expected), local_dir=str(tmp_path))
    assert all(len(even[i]["input_ids"]) > 0 for i in range(len(even)))
    assert sum(len(even[i]["input_ids"]) for i in range(len(even))) == len(expected)
    assert len(even) == (2 if len(expected) % 2 == 0 else 1)


def test_pretraining_chunks_start_with_the_tokenizers_bos(bos_tokenizer, tmp_path):
    tok, bos = bos_tokenizer
    _write_rows(tmp_path / "corpus.json", [{"text": "one two three four five six seven eight nine ten " * 4}])
    data = PretrainingDataset({"name": "corpus"}, tok, max_length=16, local_dir=str(tmp_path))
    content = tok("one two three four five six seven eight nine ten " * 4, add_special_tokens=False)["input_ids"]
    for i in range(len(data)):
        sample = data[i]
        assert sample["input_ids"][0] == bos and sample["labels"][0] == IGNORE_INDEX
        assert sample["labels"][1:].tolist() == content[16 * i:16 * (i + 1)]  # max_length counts content only


def test_pretraining_rejects_bad_input(smollm2_tokenizer, tmp_path):
    _write_rows(tmp_path / "corpus.json", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"no 'text' field \(text_key='text'\)"):
        PretrainingDataset({"name": "corpus"}, smollm2_tokenizer, local_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_length=0"):
        PretrainingDataset({"name": "corpus"}, smollm2_tokenizer, text_key="body", max_length=0,
                           local_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"paths.muse_news="):
        PretrainingDataset({"name": "raw"}, smollm2_tokenizer, local_name="raw_forget", local_dir=str(tmp_path),
                           local_dir_key="paths.muse_news")


def test_a_missing_in_context_examples_file_is_found_before_any_pass(muse_dir, tmp_path):
    """check_inputs reads the few-shot file of the knowledge prompts too (it used to be found only when the
    first generation pass built its dataset)."""
    import shutil

    from hydra import compose, initialize_config_dir

    from evals import get_evaluators
    from resolvers import compose_names

    folder = tmp_path / "muse"
    shutil.copytree(muse_dir, folder)
    (folder / "knowmem_retain_qa_icl.json").unlink()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose_names(compose("eval.yaml", overrides=["eval=muse", f"paths.muse_news={folder}"]))
    bench = get_evaluators(cfg.eval, paths=cfg.paths)["muse"]
    with pytest.raises(FileNotFoundError, match=r"retain_knowmem_ROUGE \(main\) in-context examples: .*"
                                                r"knowmem_retain_qa_icl.json not found \(paths.muse_news="):
        bench.check_inputs()


def test_concatenated_datasets_renumber_their_items(smollm2_tokenizer, tmp_path):
    _write_rows(tmp_path / "a.json", [{"text": "alpha beta gamma " * 20}])
    _write_rows(tmp_path / "b.json", [{"text": "delta epsilon " * 20}])
    a = PretrainingDataset({"name": "a"}, smollm2_tokenizer, max_length=16, local_dir=str(tmp_path))
    b = PretrainingDataset({"name": "b"}, smollm2_tokenizer, max_length=16, local_dir=str(tmp_path))
    both = ConcatenatedDataset([a, b])
    assert len(both) == len(a) + len(b) and both.lengths() == a.lengths() + b.lengths()
    assert [both[i]["index"] for i in range(len(both))] == list(range(len(both)))
    assert torch.equal(both[len(a)]["input_ids"], b[0]["input_ids"])
    with pytest.raises(IndexError):
        both[len(both)]


# ----- CompletionDataset -------------------------------------------------------------------------------------
def test_completion_masks_the_prefix(smollm2_tokenizer, tmp_path):
    rows = [{"prompt": "The minister said on Tuesday that", "gt": "the budget would be cut by ten percent."},
            {"prompt": "Fans queued outside", "gt": "the stadium for hours before the match."}]
    _write_rows(tmp_path / "verbmem.json", rows)
    data = CompletionDataset({"name": "verbmem"}, smollm2_tokenizer, prefix_key="prompt", text_key="gt",
                             insert_space=True, local_dir=str(tmp_path))
    for i, row in enumerate(rows):
        sample = data[i]
        whole = smollm2_tokenizer(row["prompt"] + " " + row["gt"], add_special_tokens=False)["input_ids"]
        assert sample["input_ids"].tolist() == whole  # one tokenisation: the prompt is an exact token prefix
        prompt_len = int((sample["labels"] == IGNORE_INDEX).sum())
        assert smollm2_tokenizer.decode(whole[:prompt_len]) == row["prompt"]
        assert sample["labels"][prompt_len:].tolist() == whole[prompt_len:]
        assert smollm2_tokenizer.decode(whole[prompt_len:]) == " " + row["gt"]
        assert data.prompt_text(i) == row["prompt"] and data.answer_texts(i) == [row["gt"]]

    cut = CompletionDataset({"name": "verbmem"}, smollm2_tokenizer, prefix_key="prompt", text_key="gt",
                            insert_space=True, max_length=3, local_dir=str(tmp_path))
    sample = cut[0]
    kept = sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()
    assert len(kept) == 3 and cut.answer_texts(0) == [smollm2_tokenizer.decode(kept).removeprefix(" ")]

    # no prefix column: every token is text (MUSE's membership chunks)
    _write_rows(tmp_path / "chunks.json", [{"text": r["gt"]} for r in rows])
    whole = CompletionDataset({"name": "chunks"}, smollm2_tokenizer, prefix_key=None, local_dir=str(tmp_path))
    assert torch.equal(whole[0]["labels"], whole[0]["input_ids"]) and whole.prompt_text(0) == ""


# ----- knowledge prompts -------------------------------------------------------------------------------------
def test_knowmem_prompt_golden(muse_dir, smollm2_tokenizer):
    """MUSE's knowledge prompt: the 10 in-context examples as "Question: q\\nAnswer: a\\n\\n", then the question."""
    root = OmegaConf.create({"paths": {"muse_news": str(muse_dir)}})
    data = build_dataset(compose_dataset("MUSE_forget_knowmem", root), smollm2_tokenizer, PLAIN_TAGS)
    icl = [json.loads(line) for line in (muse_dir / "knowmem_forget_qa_icl.json").read_text().splitlines()]
    first = json.loads((muse_dir / "knowmem_forget_qa.json").read_text().splitlines()[0])
    assert len(icl) == 10 and data.fewshot == [(r["question"], r["answer"]) for r in icl]
    prompt = format_prompt(smollm2_tokenizer, PromptTemplate(**PLAIN_TAGS), first["question"], data.fewshot)
    assert prompt.startswith("Question: How much total prize money are Mark Selby and Kyren Wilson set to share for "
                             "making maximum breaks at the Crucible?\nAnswer: £55,000\n\nQuestion: What disciplinary "
                             "measure was imposed on Nahel last September?\nAnswer: \"disciplinary measure\"\n\n")
    assert prompt.endswith(f"\n\nQuestion: {first['question']}\nAnswer: ")
    assert prompt.count("Question: ") == 11 and prompt.count("\n\n") == 10
    sample = data[0]
    prompt_len = int((sample["labels"] == IGNORE_INDEX).sum())
    assert smollm2_tokenizer.decode(sample["input_ids"][:prompt_len]) == prompt
    assert data.prompt_text(0) == first["question"] and data.answer_texts(0) == [first["answer"]]


def test_knowmem_generation_stops_at_muse_stop_strings(smollm2_tokenizer):
    from evals.passes import _generation_records, _stop_criteria

    cfg = _compose(["eval=muse"])
    gen = cfg.eval.muse.metrics.forget_knowmem_ROUGE.generation_args
    assert gen.max_new_tokens == 32 and list(gen.stop_strings) == ["\n\n", "\nQuestion", "Question:"]
    stop_strings, stop_ids = _stop_criteria(smollm2_tokenizer, PromptTemplate(**PLAIN_TAGS), gen.stop_strings)
    assert stop_strings[:3] == ["\n\n", "\nQuestion", "Question:"] and smollm2_tokenizer.eos_token_id in stop_ids

    class Rows:
        def prompt_text(self, i):
            return "q"

        def answer_texts(self, i):
            return ["Sarah Bentley"]

    texts = ["Sarah Bentley\nQuestion: who else?", " 97%\n\nQuestion: next", "Trademark laws Question: more"]
    tokens = [smollm2_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    records = _generation_records(Rows(), smollm2_tokenizer, [0, 1, 2], tokens, stop_strings)
    assert [records[i]["generation"] for i in range(3)] == ["Sarah Bentley", "97%", "Trademark laws"]
    # raw text (no template) stops at EOS only
    assert _stop_criteria(smollm2_tokenizer, None, []) == ([], [smollm2_tokenizer.eos_token_id])


# ----- every token of raw text counts ----------------------------------------------------------------------
def test_min_k_and_memorisation_score_every_token_of_raw_text():
    logp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    match = [True, False, True, True, True]

    def stats(eos: bool) -> dict:
        ts = TokenStats(logp=logp, mean_logp=None, std_logp=None, argmax_match=match, answer_text="x",
                        ends_with_eos=eos)
        return {"forget": {0: [ts]}, "holdout": {0: [ts]}}

    min_k = get_metric("mia_min_k").fn
    raw, qa = min_k(token_stats=stats(False), k=0.4), min_k(token_stats=stats(True), k=0.4)
    # raw: n = int(0.4 * 5) = 2 lowest of all 5 -> (5 + 4) / 2; QA: the EOS (-5) left out, n = int(0.4 * 4) = 1 -> 4
    assert raw["forget"]["value_by_index"]["0"]["score"] == pytest.approx(4.5)
    assert qa["forget"]["value_by_index"]["0"]["score"] == pytest.approx(4.0)
    em = get_metric("exact_memorization").fn
    assert em(token_stats={"forget": stats(False)["forget"]})["agg_value"] == pytest.approx(4 / 5)
    assert em(token_stats={"forget": stats(True)["forget"]})["agg_value"] == pytest.approx(3 / 4)
    es = get_metric("extraction_strength").fn  # last wrong at position 1: k = 2 of T'
    assert es(token_stats={"forget": stats(False)["forget"]})["agg_value"] == pytest.approx(1 - 2 / 5)
    assert es(token_stats={"forget": stats(True)["forget"]})["agg_value"] == pytest.approx(1 - 2 / 4)


def test_token_stats_of_a_raw_chunk_cover_every_predicted_token(smollm2_tokenizer, tmp_path):
    from evals.passes import plain_token_stats_pass, token_stats_passes
    from model import get_model

    _write_rows(tmp_path / "chunks.json", [{"text": "a short news chunk about the weather in Leeds"},
                                          {"text": "another chunk, this one about football and rain"}])
    data = CompletionDataset({"name": "chunks"}, smollm2_tokenizer, prefix_key=None, local_dir=str(tmp_path))
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(REPO / ".cache" / "models")
    model, _ = get_model(cfg)
    fast = token_stats_passes(model, [data], smollm2_tokenizer)[0]
    plain = plain_token_stats_pass(model, data, smollm2_tokenizer)
    for i in range(2):
        n = len(data[i]["input_ids"])
        assert fast[i][0].num_tokens == n - 1 == fast[i][0].num_content_tokens  # all but the first (nothing predicts it)
        assert fast[i][0].ends_with_eos is False and plain[i][0].ends_with_eos is False
        np.testing.assert_allclose(fast[i][0].logp, plain[i][0].logp, atol=1e-4)


# ----- configs ---------------------------------------------------------------------------------------------------
def _compose(overrides: list[str], config: str = "eval.yaml"):
    """The config as the command line composes it (``data.train=[A,B]`` included: ``command_line_overrides``)."""
    from resolvers import command_line_overrides

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        return compose(config, overrides=command_line_overrides(overrides))


def _dataset(name: str, cfg) -> dict:
    """The dataset config ``name`` composed by Hydra, resolved in the run config ``cfg``."""
    return OmegaConf.to_container(compose_dataset(name, cfg))


def test_muse_configs_follow_data_split_and_paths(muse_dir):
    cfg = _compose(["eval=muse", f"paths.muse_news={muse_dir}"])
    forget = _dataset("MUSE_forget", cfg)["args"]
    assert forget["hf_args"] == {"path": "muse-bench/MUSE-News", "name": "raw", "split": "forget"}
    assert forget["local_dir"] == str(muse_dir) and forget["local_name"] == "raw_forget"
    assert _dataset("MUSE_retain", cfg)["args"]["local_name"] == "privleak_retain2"  # the local stand-in
    assert OmegaConf.to_container(cfg.eval.muse, resolve=True)["metrics"]["privleak"]["ref_value"] == 0.5228

    books = _compose(["eval=muse", f"paths.muse_news={muse_dir}", "data_split=Books"])
    args = _dataset("MUSE_forget_knowmem", books)["args"]
    assert args["hf_args"]["path"] == "muse-bench/MUSE-Books" and args["local_dir"] is None  # no local Books copy
    assert args["fewshot"]["hf_args"]["path"] == "muse-bench/MUSE-Books"
    assert OmegaConf.to_container(books.eval.muse, resolve=True)["metrics"]["privleak"]["ref_value"] == 0.4607
    bad = _compose(["eval=muse", "data_split=news"])
    with pytest.raises(Exception, match="data_split='news' is not a MUSE corpus; valid: News, Books"):
        OmegaConf.to_container(bad.eval.muse, resolve=True)


# ----- the benchmark end to end --------------------------------------------------------------------------------
def test_muse_eval_end_to_end(muse_dir, tmp_path):
    out = tmp_path / "muse"
    args = ["src/eval.py", "--config-name=eval.yaml", "eval=muse", "model=tiny-random-llama",
            f"paths.muse_news={muse_dir}", f"paths.output_dir={out}", "eval.muse.limit=6",
            "eval.muse.metrics.forget_verbmem_ROUGE.generation_args.max_new_tokens=16"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = json.loads((out / "MUSE_EVAL.json").read_text())
    summary = json.loads((out / "MUSE_SUMMARY.json").read_text())
    expected = ["forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak",
                "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"]
    aggregates = ["memorization_score", "privacy_score", "utility_score", "overall_score"]
    assert list(summary) == expected + aggregates and all(summary[m] is not None for m in expected)
    # the aggregate scores, from the reported numbers (the 16-token verbmem generations: no pass of their own);
    # privacy and overall need the retrained model's AUCs of all four attacks
    memorised = [summary[m] for m in ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "extraction_strength",
                                      "exact_memorization")]
    assert summary["memorization_score"] == pytest.approx(harmonic_mean([1 - x for x in memorised]))
    assert summary["utility_score"] == summary["retain_knowmem_ROUGE"]
    assert summary["privacy_score"] is None and summary["overall_score"] is None
    assert "retain_logs_path not given" in logs["privacy_score"]["note"]
    assert logs["_meta"]["limit"] == 6 and logs["_meta"]["split_sizes"] == {"forget": 6, "holdout": 6}
    assert set(logs["forget_knowmem_ROUGE"]["value_by_index"]) == {str(i) for i in range(6)}
    verbmem = logs["forget_verbmem_ROUGE"]["value_by_index"]["0"]
    first = json.loads((muse_dir / "verbmem_forget.json").read_text().splitlines()[0])
    assert verbmem["input"] == first["prompt"] and first["gt"].startswith(verbmem["ground_truth"][:200])
    assert "rougeL_f1" in verbmem
    privleak = logs["privleak"]
    assert privleak["ref_auc"] == 0.5228 and "published" in privleak["note"]
    assert privleak["agg_value"] == pytest.approx(((1 - privleak["auc"]) - 0.4772) / 0.4772 * 100)
    assert "muse summary" in result.stdout

    # against its own logs: the reference AUCs are this model's, so privleak is 0 and every sMIA 1; nothing but
    # the three metrics reading the retain file (privleak, privacy_score, overall_score) recomputed
    again = run_cli([*args, f"retain_logs_path={out / 'MUSE_EVAL.json'}"])
    assert again.returncode == 0, again.stderr[-4000:]
    second = json.loads((out / "MUSE_SUMMARY.json").read_text())
    assert second["privleak"] == pytest.approx(0.0) and second["mia_min_k"] == summary["mia_min_k"]
    assert second["privacy_score"] == 1.0
    assert "reusing 11 metric(s)" in again.stdout + again.stderr


@pytest.mark.slow  # ~15 s: a compat MUSE evaluation (make test-slow)
def test_muse_eval_with_open_unlearnings_conventions(muse_dir, tmp_path, smollm2_tokenizer):
    """compat=open_unlearning covers MUSE: the knowledge prompts with their in-context examples are prepared as
    open-unlearning prepares them (one text tokenized at once, the labels every token after the prompt)."""
    out = tmp_path / "muse_ou"
    result = run_cli(["src/eval.py", "--config-name=eval.yaml", "eval=muse", "model=tiny-random-llama",
                      f"paths.muse_news={muse_dir}", f"paths.output_dir={out}", "eval.muse.limit=3",
                      "compat=open_unlearning", "eval/muse_metrics@eval.muse.muse_metrics=[forget_knowmem_ROUGE,"
                      "forget_verbmem_ROUGE,extraction_strength]",
                      "eval.muse.metrics.forget_verbmem_ROUGE.generation_args.max_new_tokens=8"])
    assert result.returncode == 0, result.stderr[-4000:]
    logs = json.loads((out / "MUSE_EVAL.json").read_text())
    assert logs["_meta"]["passes"] == "plain" and all(logs["_meta"]["plain_pass_options"].values())
    record = logs["forget_knowmem_ROUGE"]["value_by_index"]["0"]
    first = json.loads((muse_dir / "knowmem_forget_qa.json").read_text().splitlines()[0])
    # open-unlearning's ROUGE texts: the decoded prompt (a chat model's: its 10 examples as earlier turns) and
    # the decoded answer
    assert record["input"].count("\nassistant\n") == 11 and record["input"].rstrip().endswith("assistant")
    assert first["question"] in record["input"]
    assert record["ground_truth"] == first["answer"].strip()
    assert 0.0 <= logs["extraction_strength"]["agg_value"] <= 1.0


# ----- fine-tuning and unlearning on the MUSE corpora ------------------------------------------------------
TRAIN_FAST = ["model=tiny-random-llama", "trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
              "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1",
              "trainer.args.disable_tqdm=true", "data.dataset_args.max_length=64"]


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~15 s: fine-tuning on both corpora (make test-slow)
def test_target_model_trains_on_both_corpora(muse_dir, tmp_path):
    """data.train=[MUSE_forget,MUSE_retain]: the corpora one after the other, in 64-token chunks."""
    out = tmp_path / "target"
    result = run_cli(["src/train.py", "--config-name=train.yaml", "data.train=[MUSE_forget,MUSE_retain]",
                      f"paths.muse_news={muse_dir}", f"paths.output_dir={out}", *TRAIN_FAST])
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "model.safetensors").is_file()
    cfg = _compose(["data.train=[MUSE_forget,MUSE_retain]"], "train.yaml")
    assert cfg.task_name == "finetune_MUSE_forget+MUSE_retain"
    saved = OmegaConf.load(out / "config.yaml").data.train  # the run recorded the composed datasets
    assert [(d.name, d.handler, d.args.local_name) for d in saved] == [
        ("MUSE_forget", "PretrainingDataset", "raw_forget"), ("MUSE_retain", "PretrainingDataset", "privleak_retain2")]


@pytest.mark.slow  # ~15 s: RMU on MUSE chunks (make test-slow)
def test_rmu_two_steps_on_muse_chunks(muse_dir, tmp_path):
    out = tmp_path / "rmu"
    result = run_cli(["src/train.py", "--config-name=unlearn.yaml", "trainer=RMU", "trainer.method_args.layer_id=1",
                      "data.forget=MUSE_forget", "data.retain=MUSE_retain", "data.eval=null",
                      f"paths.muse_news={muse_dir}", f"paths.output_dir={out}", *TRAIN_FAST])
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [r for r in _log(out) if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert (out / "model.safetensors").is_file()


# ----- scalability / sustainability: folds unlearned in turn (src/sequential.py) ----------------------------
def test_fold_rows_by_hand():
    from data.text import fold_rows

    # 10 rows in 4 parts: boundaries floor(10 j / 4) = 2, 5, 7, 10
    assert [list(fold_rows(10, k, 4, nested=False)) for k in (1, 2, 3, 4)] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [len(fold_rows(10, k, 4, nested=True)) for k in (1, 2, 3, 4)] == [2, 5, 7, 10]
    with pytest.raises(ValueError, match=r"local_fold.index=5; must be an integer in \[1, 4\]"):
        fold_rows(10, 5, 4, nested=False)
    with pytest.raises(ValueError, match="local_fold.count=4 folds of 3 rows"):
        fold_rows(3, 1, 4, nested=False)


def test_muse_fold_datasets_cut_raw_forget(muse_dir, smollm2_tokenizer):
    """Locally, sust folds are disjoint quarters of raw_forget and scal folds nested ones; the Hub split follows fold."""
    texts = [json.loads(line)["text"] for line in (muse_dir / "raw_forget.json").read_text().splitlines()]
    quarter = [range(k * len(texts) // 4, (k + 1) * len(texts) // 4) for k in range(4)]

    def fold_tokens(name: str, fold: int) -> tuple[int, dict]:
        root = _compose(["eval=muse", f"paths.muse_news={muse_dir}", f"+fold={fold}"])
        cfg = _dataset(name, root)
        ds = build_dataset(compose_dataset(name, root), smollm2_tokenizer, dataset_args={"max_length": 4096})
        return ds.num_tokens, cfg

    def tokens_of(rows) -> int:
        return len(smollm2_tokenizer("\n\n".join(texts[i] for i in rows), add_special_tokens=False)["input_ids"])

    sust2, cfg = fold_tokens("MUSE_forget_sust", 2)
    assert cfg["args"]["hf_args"] == {"path": "muse-bench/MUSE-News", "name": "sust", "split": "forget_2"}
    assert sust2 == tokens_of(quarter[1])
    scal2, cfg = fold_tokens("MUSE_forget_scal", 2)
    assert cfg["args"]["hf_args"]["split"] == "forget_2" and scal2 == tokens_of([*quarter[0], *quarter[1]])


SEQUENCE = ["src/sequential.py", "--config-name=unlearn.yaml", "sequence=muse_sust", "sequence.folds=[1,2]",
            "trainer=GradDiff", "data.retain=MUSE_retain", "data.eval=null", "eval=muse", "eval.muse.limit=3",
            "eval.muse.metrics.forget_verbmem_ROUGE.generation_args.max_new_tokens=8",
            "trainer.args.learning_rate=1e-2", *TRAIN_FAST]


@pytest.mark.slow  # ~1 min on 2 cores: two folds trained and evaluated twice through the command line (make test-slow)
def test_sequential_driver_runs_two_folds(muse_dir, tmp_path):
    out = tmp_path / "sust"
    args = [*SEQUENCE, f"paths.muse_news={muse_dir}", f"paths.output_dir={out}"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.loads((out / "SEQUENCE_SUMMARY.json").read_text())
    assert table["sequence"] == {"forget": "MUSE_forget_sust", "folds": [1, 2], "start_from": "previous",
                                 "evaluate_start": True}
    rows = table["rows"]
    assert [(r["stage"], r["steps"]) for r in rows] == [("start", 0), ("fold_1", 2), ("fold_2", 2)]
    for row, folder in zip(rows, ["start", "fold_1", "fold_2"]):
        summary = json.loads((out / "eval" / folder / "MUSE_SUMMARY.json").read_text())
        assert {k: row[k] for k in summary} == summary
    assert rows[2]["exact_memorization"] != rows[0]["exact_memorization"]  # the folds did change the model
    # each fold is a run of its own fold, fold 2 starting from fold 1's model
    first, second = (OmegaConf.load(out / f"fold_{k}" / "config.yaml") for k in (1, 2))
    assert (first.fold, second.fold) == (1, 2) and first.data.forget.name == second.data.forget.name == "MUSE_forget_sust"
    # the saved configs hold the composed fold datasets, each resolved for its fold
    assert (first.data.forget.args.hf_args.split, second.data.forget.args.local_fold.index) == ("forget_1", 2)
    assert first.model.model_args.pretrained_model_name_or_path is None  # the original (random-init) model
    assert second.model.model_args.pretrained_model_name_or_path == str(out / "fold_1")
    markdown = (out / "SEQUENCE_SUMMARY.md").read_text()
    assert markdown.startswith("| stage | steps | forget_verbmem_ROUGE |") and "| fold_2 | 2 |" in markdown

    # run again: both folds are finished runs of the same config (not retrained), the evaluations are cached
    weights = (out / "fold_2" / "model.safetensors").stat().st_mtime_ns
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-4000:]
    log = again.stdout + again.stderr
    assert log.count("reusing the finished run") == 2 and "reusing 14 metric(s)" in log
    assert (out / "fold_2" / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((out / "SEQUENCE_SUMMARY.json").read_text())["rows"] == rows


@pytest.mark.slow  # ~20 s: command-line refusals (make test-slow)
def test_sequential_driver_refuses_bad_settings(muse_dir, tmp_path):
    bad = run_cli([*SEQUENCE, "sequence.start_from=first", f"paths.muse_news={muse_dir}",
                   f"paths.output_dir={tmp_path / 'x'}"])
    assert bad.returncode != 0 and "sequence.start_from='first'; valid: previous, target" in bad.stderr
    assert not (tmp_path / "x").exists()
    direct = run_cli(["src/train.py", "--config-name=unlearn.yaml", "sequence=muse_scal", "model=tiny-random-llama"])
    assert direct.returncode != 0 and "run it with src/sequential.py" in direct.stderr
