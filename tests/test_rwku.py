"""RWKU (Jin et al. 2024, arXiv:2406.10890): its data in the Hub's file format (a generated fixture), target
selection, RWKU's prompts, its metrics by hand, and the whole loop: unlearn one target, evaluate, report."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, train_in_process
from data import build_dataset, compose_dataset
from data.utils import IGNORE_INDEX, PromptFormat, RowFilter
from evals.metrics import TokenStats, get_metric, ngram_entropy, weighted_ngram_entropy

sys.path.insert(0, str(REPO / "scripts"))
from synthetic_rwku import generate_rwku_like  # noqa: E402

PROBE_FIELDS = {"subject", "level", "type", "query", "answer"}


@pytest.fixture(scope="module")
def rwku_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rwku")
    generate_rwku_like(folder, n_targets=3, seed=0)
    return folder


def _targets(folder: Path) -> list[str]:
    return [row["target"] for row in json.loads((folder / "forget_target.json").read_text())]


def _context(folder: Path, targets: object = 1, retain: object = 2) -> dict:
    return {"paths": {"rwku": str(folder)}, "rwku": {"targets": targets, "retain_targets": retain}}


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config, overrides=overrides)


def test_fixture_has_the_hubs_subsets_and_fields(rwku_dir):
    """One JSON array per Hub subset, with the fields RWKU's own code reads (its eval_*.py and data_process.py)."""
    probes = ["forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2"]
    for name in probes:
        rows = json.loads((rwku_dir / f"{name}.json").read_text())
        assert rows and all(set(r) == PROBE_FIELDS for r in rows)
        assert {r["level"] for r in rows} == {name[-1]}
    assert all("___" in r["query"] for r in json.loads((rwku_dir / "forget_level1.json").read_text()))
    level3_types = {r["type"] for r in json.loads((rwku_dir / "forget_level3.json").read_text())}
    assert {"affirmative suffix", "incontext learning"} <= level3_types
    for name in ("mia_forget", "mia_retain", "train_positive_llama3", "train_positive_phi3", "train_original_passage"):
        assert all(set(r) == {"subject", "text"} for r in json.loads((rwku_dir / f"{name}.json").read_text()))
    assert all(set(r) == {"target", "intro"} for r in json.loads((rwku_dir / "forget_target.json").read_text()))
    # the same arguments give the same bytes
    again = rwku_dir.parent / "again"
    generate_rwku_like(again, n_targets=3, seed=0)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in rwku_dir.glob("*.json"))


def _subjects(folder: Path, dataset: str, tokenizer, targets: object = 1, retain: object = 2) -> list[str]:
    """The targets whose rows the dataset ``dataset`` keeps with these settings."""
    ds = build_dataset(compose_dataset(dataset, _context(folder, targets, retain)), tokenizer, {"apply_chat_template": True})
    return sorted(set(ds.rows["subject"]))


def test_targets_by_name_or_count(rwku_dir, smollm2_tokenizer):
    """rwku.targets: a count N is the first N targets of forget_target; names are checked against it. The retain
    texts (rwku.retain_targets) are the first targets not unlearned, never an unlearned one."""
    names = _targets(rwku_dir)
    listed = RowFilter.from_config({"column": "subject", "values": 2, "values_key": "rwku.targets",
                                    "values_from": {"name": "forget_target", "column": "target"}}, "X")
    assert listed.resolve(names, "X", "forget_target").values == tuple(names[:2])
    assert _subjects(rwku_dir, "RWKU_forget_level2", smollm2_tokenizer, targets=2) == sorted(names[:2])
    assert _subjects(rwku_dir, "RWKU_forget_level2", smollm2_tokenizer, targets=[names[2]]) == [names[2]]
    assert _subjects(rwku_dir, "RWKU_forget_level2", smollm2_tokenizer, targets=names[1]) == [names[1]]
    retain = RowFilter.from_config({"column": "subject", "values": 1, "skip": [names[0]],
                                    "values_from": {"name": "forget_target", "column": "target"}}, "X")
    assert retain.resolve(names, "X", "f").values == (names[1],)
    mia = build_dataset(compose_dataset("RWKU_mia_forget", _context(rwku_dir, 1)), smollm2_tokenizer)
    assert len(mia) == 2  # the first target's two texts

    def refused(targets: object, retain: object = 1) -> str:
        with pytest.raises(ValueError) as error:
            build_dataset(compose_dataset("RWKU_retain_positive", _context(rwku_dir, targets, retain)), smollm2_tokenizer)
        return str(error.value)

    assert "rwku.retain_targets=3, but forget_target (target; paths.rwku=" in refused(1, 3)
    assert "lists 2 values besides those of rwku.targets; give a count from 1 to 2" in refused(1, 3)
    assert "rwku.targets=4, but forget_target (target; paths.rwku=" in refused(4)
    assert "rwku.targets and rwku.retain_targets both name" not in refused(1, [names[0]])
    assert f"rwku.retain_targets and rwku.targets both name ['{names[0]}']" in refused(1, [names[0]])
    typo = names[0].lower()
    assert f"rwku.targets: '{typo}' (close: '{names[0]}') not listed in forget_target" in refused([typo])
    assert "names a value twice" in refused([names[0], names[0]])
    assert "rwku.targets=0; give a count of at least 1" in refused(0)
    assert "rwku.targets=True; give a list of names or a count" in refused(True)


def test_row_filter_names_a_value_no_row_has():
    keep = RowFilter.from_config({"column": "subject", "values": ["Ann", "Bo"]}, "X")
    assert keep.apply(["Ann", "Cy", "Bo", "Ann"], "X", "f.json") == [0, 2, 3]
    drop = RowFilter.from_config({"column": "subject", "values": ["Ann"], "exclude": True}, "X")
    assert drop.apply(["Ann", "Cy", "Bo"], "X", "f.json") == [1, 2]
    with pytest.raises(ValueError, match=r"X: keep_rows: no row of f.json has subject='Anne' \(close: 'Ann'\)"):
        RowFilter("subject", ("Anne",)).apply(["Ann", "Bo"], "X", "f.json")
    with pytest.raises(ValueError, match="keep_rows has unknown keys"):
        RowFilter.from_config({"column": "subject", "value": ["Ann"]}, "X")
    with pytest.raises(ValueError, match="keep_rows.values=3: a count needs keep_rows.values_from"):
        RowFilter.from_config({"column": "subject", "values": 3}, "X")
    with pytest.raises(ValueError, match="keep_rows.values_from="):
        RowFilter.from_config({"column": "subject", "values": 3, "values_from": {"name": "t"}}, "X")


def test_probes_are_asked_as_rwku_asks_them(rwku_dir, smollm2_tokenizer):
    """RWKU's eval_forget.py prompts: the instruction and question in one user turn, then "Answer:" after the
    assistant's turn starts; an affirmative-suffix probe ends its user turn and gets no "Answer:"."""
    template = {"apply_chat_template": True, "system_prompt": None}
    ctx = _context(rwku_dir)
    target = _targets(rwku_dir)[0]
    level1 = build_dataset(compose_dataset("RWKU_forget_level1", ctx), smollm2_tokenizer, template)
    rows = [r for r in json.loads((rwku_dir / "forget_level1.json").read_text()) if r["subject"] == target]
    assert len(level1) == len(rows)
    sample = level1[0]
    prompt_len = int((sample["labels"] == IGNORE_INDEX).sum())
    prompt = smollm2_tokenizer.decode(sample["input_ids"][:prompt_len])
    user = f"Please complete the blank in the following question.\nQuestion: {rows[0]['query']}\n"
    expected = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                     add_generation_prompt=True) + "Answer:"
    assert prompt == expected
    assert smollm2_tokenizer.decode(sample["input_ids"][prompt_len:-1]) == rows[0]["answer"]

    level3 = build_dataset(compose_dataset("RWKU_forget_level3", ctx), smollm2_tokenizer, template)
    rows3 = [r for r in json.loads((rwku_dir / "forget_level3.json").read_text()) if r["subject"] == target]
    for i, row in enumerate(rows3):
        text = level3.prompt_text(i)
        if row["type"] == "affirmative suffix":
            assert text == f"Please briefly answer the following question.\nQuestion: {row['query']}"
            assert level3.answer_prefixes[i] == ""
        elif row["type"] == "incontext learning":
            assert text == f"Please briefly answer the following question.\n{row['query']}\n"
            assert level3.answer_prefixes[i] == "Answer:"
        else:
            assert text == f"Please briefly answer the following question.\nQuestion: {row['query']}\n"


def test_every_rwku_dataset_keeps_only_its_targets(rwku_dir, smollm2_tokenizer):
    names = _targets(rwku_dir)
    ctx = _context(rwku_dir, targets=[names[1]], retain=1)
    sizes = {}
    for name in ("RWKU_forget_level1", "RWKU_forget_level2", "RWKU_forget_level3", "RWKU_neighbor_level1",
                 "RWKU_neighbor_level2", "RWKU_mia_forget", "RWKU_mia_retain", "RWKU_fluency", "RWKU_forget_positive",
                 "RWKU_forget_positive_phi3", "RWKU_forget_passage", "RWKU_retain_positive"):
        cfg = compose_dataset(name, ctx)
        ds = build_dataset(cfg, smollm2_tokenizer, {"apply_chat_template": True})
        if name.startswith(("RWKU_forget_level", "RWKU_neighbor", "RWKU_fluency")):
            expected = names[0] if name == "RWKU_retain_positive" else names[1]
            assert set(ds.rows["subject"]) == {expected}, name
        sizes[name] = len(ds)
    assert sizes == {"RWKU_forget_level1": 2, "RWKU_forget_level2": 2, "RWKU_forget_level3": 4, "RWKU_neighbor_level1": 1,
                     "RWKU_neighbor_level2": 1, "RWKU_mia_forget": 2, "RWKU_mia_retain": 2, "RWKU_fluency": 2,
                     "RWKU_forget_positive": 3, "RWKU_forget_positive_phi3": 3, "RWKU_forget_passage": 1,
                     "RWKU_retain_positive": 3}
    # without paths.rwku the configs read the Hub
    hub = OmegaConf.to_container(compose_dataset("RWKU_forget_level2"))["args"]
    assert hub["hf_args"] == {"path": "jinzhuoran/RWKU", "name": "forget_level2", "split": "test"}
    assert hub["local_dir_key"] == "paths.rwku"


def test_prompt_format_rejects_bad_settings():
    with pytest.raises(ValueError, match="has no {question} placeholder"):
        PromptFormat.from_config({"question": "Q:"}, "X")
    with pytest.raises(ValueError, match="give by_column and cases together"):
        PromptFormat.from_config({"by_column": "type"}, "X")
    with pytest.raises(ValueError, match="prompt_format has unknown keys"):
        PromptFormat.from_config({"prefix": "A:"}, "X")
    fmt = PromptFormat.from_config({"question": "{question} ({subject})"}, "X")
    assert fmt.columns() == {"subject"}
    with pytest.raises(ValueError, match="cannot be filled from row 3"):
        fmt.render({}, "q", "X", 3)


def test_fluency_entropy_by_hand():
    """"a b a b": bigrams ab, ba, ab (H2 = -(2/3 log2 2/3 + 1/3 log2 1/3) = 0.918296), trigrams aba, bab (H3 = 1);
    the score is (2/3 * H2 + 4/3 * H3) / 2."""
    assert ngram_entropy(["a", "b", "a", "b"], 2) == pytest.approx(0.9182958, abs=1e-6)
    assert ngram_entropy(["a", "b", "a", "b"], 3) == pytest.approx(1.0)
    assert weighted_ngram_entropy("a b a b") == pytest.approx((2 / 3 * 0.9182958 + 4 / 3 * 1.0) / 2, abs=1e-6)
    assert weighted_ngram_entropy("same") == 0.0  # fewer tokens than n: no n-gram
    # punctuation is a token; sentences are split before the word tokenizer
    assert weighted_ngram_entropy("Go. Go.") == weighted_ngram_entropy("Go . Go .")
    out = get_metric("ngram_entropy").fn(generations={"main": {0: {"generation": "a b a b"}, 1: {"generation": None}}})
    assert out["agg_value"] == pytest.approx(0.9727653, abs=1e-6) and out["excluded"] == [1]


def test_member_score_by_hand():
    """The mean over one set of a membership statistic: loss = mean NLL per sample, averaged over samples."""
    stats = {"members": {0: [TokenStats([-1.0, -3.0], None, None, [True, False], "ab", ends_with_eos=False)],
                         1: [TokenStats([-0.5], None, None, [True], "c", ends_with_eos=False)]}}
    loss = get_metric("member_score").fn(token_stats=stats, statistic="loss")
    assert loss["agg_value"] == pytest.approx((2.0 + 0.5) / 2)
    assert loss["value_by_index"]["0"]["score"] == pytest.approx(2.0)
    min_k = get_metric("member_score").fn(token_stats=stats, statistic="min_k", k=0.5)
    assert min_k["agg_value"] == pytest.approx((3.0 + 0.5) / 2)  # the lowest half: -3 of sample 0, -0.5 of 1
    with pytest.raises(ValueError, match="statistic='auc'; valid: loss, zlib, min_k, min_k_plus_plus"):
        get_metric("member_score").fn(token_stats=stats, statistic="auc")
    mean = get_metric("mean_aggregate").fn(pre_compute={"a": {"agg_value": 0.2}, "b": {"agg_value": 0.5}, "c": 0.8})
    assert mean["agg_value"] == pytest.approx(0.5)
    assert get_metric("mean_aggregate").fn(pre_compute={"a": {"agg_value": None}, "b": 1.0})["agg_value"] is None


def test_experiments_carry_rwkus_settings():
    cfg = OmegaConf.to_container(_compose("unlearn.yaml", ["experiment=unlearn/rwku/default"]))
    assert cfg["model"]["model_args"]["pretrained_model_name_or_path"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg["trainer"]["handler"] == "GradAscent" and cfg["data"]["retain"] is None
    assert cfg["data"]["forget"]["args"]["hf_args"]["name"] == "train_positive_llama3"
    args = cfg["trainer"]["args"]
    assert (args["learning_rate"], args["num_train_epochs"], args["per_device_train_batch_size"],
            args["lr_scheduler_type"], args["warmup_steps"]) == (6e-8, 3, 8, "cosine", 20)
    assert list(cfg["eval"]) == ["rwku"] and cfg["rwku"]["targets"] == 1
    evaluation = OmegaConf.to_container(_compose("eval.yaml", ["experiment=eval/rwku/default"]))
    assert list(evaluation["eval"]) == ["rwku", "lm_eval"]
    assert [t["name"] for t in evaluation["eval"]["lm_eval"]["tasks"]] == \
        ["mmlu", "bbh_cot_fewshot", "truthfulqa_mc1", "triviaqa"]


def test_unlearn_one_target_evaluate_and_report(rwku_dir, tmp_path):
    """GradDiff on one RWKU target (its Llama-3 descriptions; other targets' descriptions as retain texts) with a
    2-layer model, evaluated on RWKU at the end; the report shows RWKU's headline metrics."""
    import report

    out = tmp_path / "saves" / "rwku_GradDiff"
    steps = train_in_process(out, [
        "experiment=unlearn/rwku/default", "model=tiny-random-llama", f"paths.rwku={rwku_dir}", "rwku.targets=1",
        "trainer=GradDiff", "data.retain=RWKU_retain_positive", "rwku.retain_targets=2",
        "trainer.args.learning_rate=1e-3", "trainer.args.max_steps=2", "trainer.args.warmup_steps=0",
        "trainer.args.per_device_train_batch_size=2", "trainer.args.logging_steps=1", "trainer.args.report_to=none",
        "eval.rwku.metrics.fluency_entropy.generation_args.max_new_tokens=8"])
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    summary = json.loads((out / "evals" / "RWKU_SUMMARY.json").read_text())
    assert list(summary) == ["forget_FB_ROUGE", "forget_QA_ROUGE", "forget_AA_ROUGE", "forget_ROUGE",
                             "neighbor_FB_ROUGE", "neighbor_QA_ROUGE", "neighbor_ROUGE", "mia_forget_loss",
                             "mia_retain_loss", "fluency_entropy"]
    assert all(summary[m] is not None for m in summary)
    logs = json.loads((out / "evals" / "RWKU_EVAL.json").read_text())
    levels = [logs[m]["agg_value"] for m in ("forget_FB_ROUGE", "forget_QA_ROUGE", "forget_AA_ROUGE")]
    assert summary["forget_ROUGE"] == pytest.approx(sum(levels) / 3)
    assert len(logs["forget_AA_ROUGE"]["value_by_index"]) == 4  # the first target's adversarial probes only
    assert logs["_meta"]["roles"]["headline_metrics"] == ["neighbor_ROUGE", "forget_ROUGE"]
    assert logs["_meta"]["higher_is_better"]["mia_forget_loss"] is True
    config = OmegaConf.load(out / "config.yaml")
    assert config.rwku.targets == 1 and config.data.forget.args.keep_rows["values"] == 1

    assert report.main([str(tmp_path / "saves"), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv", encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["forget_ROUGE"]) == pytest.approx(summary["forget_ROUGE"])
    assert float(row["neighbor_ROUGE"]) == pytest.approx(summary["neighbor_ROUGE"])


def test_the_worked_example_is_rwkus_actual_diff():
    """docs/components.md, "Worked example: RWKU": its table names every RWKU file of the repository, and each
    file it shows is the repository's, byte for byte."""
    import re

    text = (REPO / "docs" / "components.md").read_text()
    section = re.split(r"\n##+ ", text.split("### Worked example: RWKU, a real benchmark", 1)[1], maxsplit=1)[0]
    shown = re.findall(r"```yaml\n# (\S+)\n(.*?)```", section, flags=re.S)
    assert len(shown) == 4
    for path, body in shown:
        assert (REPO / path).read_text() == body, path
    named = set()
    for cell in re.findall(r"^\| (.*?) \|", section, flags=re.M):
        for pattern in re.findall(r"`([^`]+)`", cell):
            matches = sorted(REPO.glob(pattern))
            assert matches, f"{pattern} names no file"
            named.update(p.relative_to(REPO).as_posix() for p in matches)
    in_repo = {p.relative_to(REPO).as_posix() for folder in ("configs", "scripts", "tests")
               for p in (REPO / folder).rglob("*") if p.is_file() and "rwku" in p.relative_to(REPO).as_posix().lower()
               and "__pycache__" not in p.parts}
    assert in_repo <= named, sorted(in_repo - named)
