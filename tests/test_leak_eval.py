"""Sampled leakage end to end (issue 33): the leak@k metric in a TOFU evaluation through src/eval.py, the fast and
plain sampling passes giving the same EVAL entry, and bad settings refused before any model pass."""

from __future__ import annotations

import json

import pytest

from test_eval import _eval_in_process

LEAK = ["eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_leak_at_k]", "eval.tofu.limit=3",
        "eval.tofu.metrics.forget_leak_at_k.sampling_args.num_samples=4",
        "eval.tofu.metrics.forget_leak_at_k.sampling_args.max_new_tokens=12",
        "eval.tofu.metrics.forget_leak_at_k.k=[1,2,4]",
        # a low bar, so that the random tiny model's answers leak now and then
        "eval.tofu.metrics.forget_leak_at_k.scorer.threshold=0.05"]


def _leak_entry(tofu_dir, out, *extra):
    _eval_in_process(tofu_dir, out, *LEAK, *extra, generation=[])
    return json.loads((out / "TOFU_EVAL.json").read_text())["forget_leak_at_k"]


def test_leak_at_k_in_a_tofu_evaluation(tofu_dir, tmp_path):
    entry = _leak_entry(tofu_dir, tmp_path / "fast")
    assert set(entry["leak_at_k"]) == {"1", "2", "4"} and entry["num_samples"] == 4 and entry["unparsed"] == 0
    assert entry["scorer"] == {"kind": "rouge", "field": "rougeL_recall", "threshold": 0.05}
    assert entry["agg_value"] == entry["leak_at_k"]["4"]
    curve = [entry["leak_at_k"][k] for k in ("1", "2", "4")]
    assert curve == sorted(curve)  # leak@k never falls as k grows
    assert len(entry["value_by_index"]) == 3
    for item in entry["value_by_index"].values():
        assert item["input"] and item["ground_truth"] and len(item["samples"]) == 4
        assert item["leaks"] == sum(s["leaked"] for s in item["samples"])
        assert item["best_score"] == max(s["score"] for s in item["samples"])
    texts = [s["text"] for item in entry["value_by_index"].values() for s in item["samples"]]
    assert len(set(texts)) > 3  # sampled, not one greedy answer repeated
    # speed knob (one prefill per question, shared by its samples; finished rows leave): the plain passes decode
    # every answer alone with the same random numbers, and give the same entry
    plain = _leak_entry(tofu_dir, tmp_path / "plain", "eval.tofu.passes=plain")
    assert plain == entry
    # the seed decides the samples
    other = _leak_entry(tofu_dir, tmp_path / "seed", "eval.tofu.metrics.forget_leak_at_k.sampling_args.seed=1")
    assert [s["text"] for i in other["value_by_index"].values() for s in i["samples"]] != texts


@pytest.mark.parametrize(("override", "message"), [
    ("eval.tofu.metrics.forget_leak_at_k.k=[1,8]", r"k=\[1, 8\]; give distinct integers from 1 to "
                                                   r"sampling_args.num_samples=4"),
    ("eval.tofu.metrics.forget_leak_at_k.sampling_args.top_p=0", r"sampling_args.top_p=0; give a number in \(0, 1\]"),
    ("+eval.tofu.metrics.forget_leak_at_k.sampling_args.beams=2", r"sampling_args has unknown keys \['beams'\]"),
    ("eval.tofu.metrics.forget_leak_at_k.answers=greedy", r"leak_at_k needs sampled answers"),
    ("eval.tofu.metrics.forget_leak_at_k.answers=beam", r"answers='beam'; valid: sampled, greedy"),
    ("eval.tofu.metrics.forget_leak_at_k.scorer.kind=bleu", r"scorer.kind='bleu'; valid: entailment, judge, rouge"),
])
def test_bad_sampling_settings_fail_before_any_pass(tofu_dir, tmp_path, override, message, monkeypatch):
    from evals import sampling

    monkeypatch.setattr(sampling, "sample_answers", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(ValueError, match=r"metric forget_leak_at_k: .*" + message):
        _eval_in_process(tofu_dir, tmp_path / "out", *LEAK, override, generation=[])
    assert not (tmp_path / "out").exists()


def test_a_judge_metric_without_a_judge_says_how_to_choose_one(tofu_dir, tmp_path):
    with pytest.raises(ValueError, match=r"metric forget_llm_judge: scorer kind judge needs scorer.judge.*judge=openai"):
        _eval_in_process(tofu_dir, tmp_path / "out", "eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_llm_judge]",
                         generation=[])


@pytest.mark.slow  # ~40 s: the same evaluation through the command line on 1 and on 2 processes (make test-slow)
def test_sampled_answers_are_the_same_on_two_processes(tofu_dir, tmp_path):
    """Each answer is seeded by (seed, question index, sample number): 2 processes sampling their shares of the
    questions give the EVAL entry of one process (5 questions: uneven shards)."""
    from conftest import run_cli
    from test_distributed import TWO_PROCESSES

    args = ["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama", f"paths.tofu={tofu_dir}",
            *LEAK, "eval.tofu.limit=5"]
    entries = []
    for launcher, name in (([], "one"), (TWO_PROCESSES, "two")):
        result = run_cli([*launcher, *args, f"paths.output_dir={tmp_path / name}"])
        assert result.returncode == 0, result.stderr[-4000:]
        entries.append(json.loads((tmp_path / name / "TOFU_EVAL.json").read_text())["forget_leak_at_k"])
    assert len(entries[0]["value_by_index"]) == 5 and entries[0] == entries[1]


JUDGE = ["eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_llm_judge]", "eval.tofu.limit=2",
         "eval.tofu.metrics.forget_llm_judge.generation_args.max_new_tokens=8", "judge.max_new_tokens=6"]


def test_llm_judge_in_a_tofu_evaluation_with_an_in_process_judge(tofu_dir, tmp_path):
    """judge=transformers: the local SmolLM2 judges the tiny model's greedy answers; every reply is kept, read as a
    verdict or counted as unparsed; a second evaluation takes every judgment from the cache."""
    from test_judge import smollm2_folder

    folder = smollm2_folder.__wrapped__()
    cache = tmp_path / "judgments.sqlite"
    settings = [*JUDGE, "judge=transformers", f"judge.model={folder}", f"judge.cache_path={cache}"]
    _eval_in_process(tofu_dir, tmp_path / "one", *settings, generation=[])
    entry = json.loads((tmp_path / "one" / "TOFU_EVAL.json").read_text())["forget_llm_judge"]
    assert entry["judge"]["backend"] == "transformers" and entry["judge"]["model"] == str(folder)
    assert entry["judged"] + entry["unparsed"] == 2 and len(entry["value_by_index"]) == 2
    for item in entry["value_by_index"].values():
        (answer,) = item["answers"]
        assert answer["raw"].strip() and set(answer) == {"text", "score", "leaked", "raw"}
        assert (answer["score"], answer["leaked"]) in ((1.0, True), (0.0, False), (None, None))
    assert cache.is_file()
    from evals import judge as judge_module

    def no_model(config):
        raise AssertionError("the judge model was loaded although every judgment is cached")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(judge_module, "make_backend", no_model)
        _eval_in_process(tofu_dir, tmp_path / "two", *settings, generation=[])
    again = json.loads((tmp_path / "two" / "TOFU_EVAL.json").read_text())["forget_llm_judge"]
    assert again == entry


def test_leak_at_k_scored_by_a_judge_behind_a_real_server(tofu_dir, tmp_path):
    """leak@k with the judge as its scorer, the judge behind a real OpenAI-compatible server (`transformers serve`
    with SmolLM2): each sampled answer is sent once and judged; the EVAL entry names the judge."""
    from test_judge import Server, smollm2_folder

    pytest.importorskip("fastapi", reason="`transformers serve` needs the serving extra: pip install -e '.[serving]'")
    folder = smollm2_folder.__wrapped__()
    server = Server(folder, tmp_path / "serve.log")
    try:
        server.wait_healthy()
        _eval_in_process(tofu_dir, tmp_path / "out", *LEAK[:-1], "eval.tofu.limit=2",  # no ROUGE threshold
                         "eval/scorer@eval.tofu.metrics.forget_leak_at_k.scorer=judge", "judge=openai",
                         f"judge.base_url={server.base_url}", f"judge.model={server.model}", "judge.max_new_tokens=4",
                         "judge.max_retries=0", "judge.timeout_s=120", f"judge.cache_path={tmp_path / 'j.sqlite'}",
                         generation=[])
    finally:
        server.stop()
    entry = json.loads((tmp_path / "out" / "TOFU_EVAL.json").read_text())["forget_leak_at_k"]
    assert entry["scorer"]["kind"] == "judge" and entry["scorer"]["base_url"] == server.base_url
    samples = [s for item in entry["value_by_index"].values() for s in item["samples"]]
    assert len(samples) == 8 and all(s["raw"].strip() for s in samples)
    assert sum(s["leaked"] is None for s in samples) == entry["unparsed"]
    distinct = len({s["text"] for s in samples})
    assert server.log.read_text().count("POST /v1/chat/completions") == distinct  # one request per distinct answer
