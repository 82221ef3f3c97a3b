"""benchmarks/eval_time.py runs and prints what its README says (a smoke run on the tiny model; no timing)."""

import json

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow  # ~9 s: the benchmark script (make test-slow)
def test_eval_time_prints_one_json_object_with_the_summary(tofu_dir, tmp_path):
    out = tmp_path / "eval_time.json"
    proc = run_cli([str(REPO / "benchmarks" / "eval_time.py"), "--model", "tiny-random-llama",
                    "--forget-split", "forget01", "--tofu", str(tofu_dir), "--metrics", "forget_Q_A_Prob,forget_Q_A_ROUGE",
                    "--max-new-tokens", "3", "--decoder", "generate", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["complete"] is True and printed["decoder"] == "generate"
    assert printed["metrics"] == ["forget_Q_A_Prob", "forget_Q_A_ROUGE"]
    summary = printed["summary"]["tofu"]
    assert set(summary) == {"forget_Q_A_Prob", "forget_Q_A_ROUGE"} and all(0 <= v <= 1 for v in summary.values())
    # --decoder generate: the generation ran through model.generate, not our decoding loop
    assert printed["generate_calls"] >= 1 and printed["prompts_generated"] > 0
    assert printed["wall_s"] >= printed["forward_s"] + printed["generation_s"]
