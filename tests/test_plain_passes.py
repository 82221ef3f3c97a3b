"""The plain reference path (``eval.tofu.passes=plain``): without the speed tricks, the same EVAL file."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch

from conftest import MODEL_CACHE, REPO
from evals.passes import answer_token_stats, plain_token_stats

SHORT_GENERATION = ["eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=16"] + [
    f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=16"
    for p in ("retain", "ra", "wf")]
REL_TOL = 1e-5
#: SmolLM2's sequence probabilities are exponentials of sums of ~40 float32 log-probabilities from
#: [rows, 49152] blocks: the two passes' summation orders move them by up to 1.2e-5 relative (seen on
#: wf_Q_A_Prob_normalised), varying from run to run with the threads' blocking.
SMOLLM2_REL_TOL = 5e-5


def assert_same_eval(a, b, path: str = "", rel_tol: float = REL_TOL) -> None:
    """``a`` and ``b`` (loaded EVAL files) have the same keys recursively, equal strings, booleans and
    None, and numbers equal within ``rel_tol`` relative (both NaN counts as equal); ``_meta`` is skipped."""
    where = path or "<root>"
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
        for key in a:
            if not (path == "" and key == "_meta"):
                assert_same_eval(a[key], b[key], f"{path}.{key}" if path else key, rel_tol)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_eval(x, y, f"{where}[{k}]", rel_tol)
    elif isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12)
        assert same, f"{where}: {a!r} != {b!r} (relative tolerance {rel_tol})"
    else:
        raise AssertionError(f"{where}: {type(a).__name__} vs {type(b).__name__}")


def _largest_relative_gap(a, b) -> float:
    if isinstance(a, dict):
        return max([_largest_relative_gap(a[k], b[k]) for k in a if k != "_meta"], default=0.0)
    if isinstance(a, list):
        return max([_largest_relative_gap(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a != b:
        return abs(a - b) / max(abs(a), abs(b))
    return 0.0


def _evaluate_both_modes(tmp_path: Path, overrides: list[str], caplog,
                         before_plain=None) -> tuple[dict, dict, dict]:
    """The tofu evaluation of the model of ``overrides`` in fast mode, then (after ``before_plain()``) in
    plain mode into the same folder: a plain run must not reuse the fast metrics. Returns (fast EVAL,
    plain EVAL, seconds per mode)."""
    from hydra import compose, initialize_config_dir

    from evals import get_evaluators
    from model import get_model

    out = tmp_path / "eval"
    logs, seconds = {}, {}
    model = None
    for mode in ("fast", "plain"):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            cfg = compose(config_name="eval.yaml", overrides=[
                *overrides, f"paths.output_dir={out}", f"paths.model_cache_dir={MODEL_CACHE}", *SHORT_GENERATION,
                f"eval.tofu.passes={mode}"])
        if model is None:
            model, tokenizer = get_model(cfg.model)
        evaluator = get_evaluators(cfg.eval, tokenizer=tokenizer, template_args=cfg.model.get("template_args"),
                                   paths=cfg.paths)["tofu"]
        assert evaluator.passes_mode == mode
        if mode == "plain" and before_plain is not None:
            before_plain()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="evals.base"):
            start = time.perf_counter()
            evaluator.evaluate(model, output_dir=out, model_id="model-under-test")
            seconds[mode] = time.perf_counter() - start
        assert "reusing" not in caplog.text  # the mode is part of every fingerprint
        logs[mode] = json.loads((out / "TOFU_EVAL.json").read_text())
    fast, plain = logs["fast"], logs["plain"]
    assert (fast["_meta"]["passes"], plain["_meta"]["passes"]) == ("fast", "plain")
    assert set(fast["_meta"]["fingerprints"]) == set(plain["_meta"]["fingerprints"])
    assert all(fast["_meta"]["fingerprints"][k] != v for k, v in plain["_meta"]["fingerprints"].items())
    return fast, plain, seconds


def _forbid_fast_passes(monkeypatch) -> None:
    """In plain mode, none of the fast passes' machinery may run."""
    from evals import passes

    def forbidden(*args, **kwargs):
        raise AssertionError("a fast pass ran in plain mode")

    for name in ("token_stats_passes", "generation_pass", "greedy_decode", "prefill_prompts", "answer_token_stats",
                 "answer_logits"):
        monkeypatch.setattr(passes, name, forbidden)


def test_plain_and_fast_passes_write_the_same_eval_file(tofu_dir, tmp_path, caplog, monkeypatch):
    fast, plain, seconds = _evaluate_both_modes(
        tmp_path, ["model=tiny-random-llama", f"paths.tofu={tofu_dir}"], caplog,
        before_plain=lambda: _forbid_fast_passes(monkeypatch))
    assert "forget_Q_A_ROUGE" in plain and len(plain["forget_Q_A_Prob"]["value_by_index"]) == 8
    assert_same_eval(fast, plain)
    print(f"tiny-random-llama eval: fast {seconds['fast']:.1f} s, plain {seconds['plain']:.1f} s; largest relative "
          f"gap {_largest_relative_gap(fast, plain):.2e}")

    # The comparer does catch a difference: a number off by more than the tolerance, a changed
    # generation, a missing key.
    changed = copy.deepcopy(plain)
    changed["forget_Q_A_Prob"]["agg_value"] *= 1 + 10 * REL_TOL
    with pytest.raises(AssertionError, match="forget_Q_A_Prob.agg_value"):
        assert_same_eval(fast, changed)
    changed = copy.deepcopy(plain)
    changed["forget_Q_A_ROUGE"]["value_by_index"]["0"]["generation"] += " more"
    with pytest.raises(AssertionError, match="generation"):
        assert_same_eval(fast, changed)
    changed = copy.deepcopy(plain)
    del changed["mia_min_k"]["holdout"]
    with pytest.raises(AssertionError, match="keys differ"):
        assert_same_eval(fast, changed)
    assert_same_eval({"x": 1.0, "_meta": {"a": 1}}, {"x": 1.0 + 1e-7, "_meta": {"b": 2}})  # within tolerance


def _small_tofu_copy(shared_tofu: Path, folder: Path, rows: int = 4) -> Path:
    """The first ``rows`` lines of each TOFU file the tofu eval reads (forget10 / holdout01 splits)."""
    folder.mkdir()
    for name in ("forget10_perturbed", "holdout01", "retain_perturbed", "real_authors_perturbed",
                 "world_facts_perturbed"):
        lines = (shared_tofu / f"{name}.json").read_text(encoding="utf-8").splitlines()[:rows]
        (folder / f"{name}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_plain_and_fast_passes_agree_on_smollm2(shared_tofu, tmp_path, caplog):
    data = _small_tofu_copy(shared_tofu, tmp_path / "tofu")
    fast, plain, seconds = _evaluate_both_modes(
        tmp_path, ["model=SmolLM2-135M-Instruct", f"paths.tofu={data}", "forget_split=forget10",
                   "holdout_split=holdout01"], caplog)
    assert len(plain["forget_Q_A_ROUGE"]["value_by_index"]) == 4
    assert any(v["generation"] for v in plain["forget_Q_A_ROUGE"]["value_by_index"].values())
    assert_same_eval(fast, plain, rel_tol=SMOLLM2_REL_TOL)
    print(f"SmolLM2 eval on 4 rows: fast {seconds['fast']:.1f} s, plain {seconds['plain']:.1f} s; largest relative "
          f"gap {_largest_relative_gap(fast, plain):.2e}")


def test_plain_token_stats_equal_answer_token_stats_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1.0], [2.0, 5.0, 5.0], [-3.0, 1.0, 0.5],
                           [10.0, -10.0, 0.0]])
    targets = torch.tensor([1, 0, 2, 1, 2])
    plain = plain_token_stats(logits, targets)
    fast = answer_token_stats(logits, targets, chunk_rows=2)
    for a, b in zip(plain[:3], fast[:3], strict=True):
        torch.testing.assert_close(a.float(), b, rtol=1e-6, atol=1e-6)
    assert plain[3].tolist() == fast[3].tolist() == [False, True, False, True, False]  # ties: the first index
    # row 0 by hand: uniform over 3 tokens, so log p = mean = -log 3 and std = 0
    assert torch.allclose(plain[0][0], torch.tensor(-math.log(3.0), dtype=torch.float64))
    assert torch.allclose(plain[1][0], torch.tensor(-math.log(3.0), dtype=torch.float64)) and plain[2][0] < 1e-7
    # the check can fail: another target changes log p(target)
    assert not torch.allclose(plain_token_stats(logits, targets.flip(0))[0].float(), fast[0])


def test_passes_mode_is_validated():
    from evals.base import Evaluator

    metrics = {"metrics": {"rouge": {"handler": "rouge", "datasets": {"main": "TOFU_QA_FORGET10"}}}}
    assert Evaluator(metrics).passes_mode == "fast"
    assert Evaluator({**metrics, "passes": "plain"}).passes_mode == "plain"
    with pytest.raises(ValueError, match=r"passes='bogus'; valid: fast, plain"):
        Evaluator({**metrics, "passes": "bogus"})
