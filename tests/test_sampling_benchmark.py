"""benchmarks/sampling.py runs and prints what its README says (a smoke run on the tiny model; no timing)."""

import json

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow  # ~40 s: the benchmark script, each timed run a child process (make test-slow)
def test_sampling_benchmark_prints_one_json_object_with_both_methods(tofu_dir, tmp_path):
    out = tmp_path / "sampling.json"
    proc = run_cli([str(REPO / "benchmarks" / "sampling.py"), "--model", "tiny-random-llama", "--forget-split",
                    "forget01", "--tofu", str(tofu_dir), "--prompts", "3", "--prompts-per-batch", "2",
                    "--num-samples", "2", "--max-new-tokens", "3", "--repeats", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == "sampling" and printed["n"] == 2 and printed["prompts"] == 3
    assert printed["batches"] == 2 and printed["rows_per_batch"] == 4
    assert printed["isolated_processes"] is (printed["device"] == "cpu")
    for method in ("ours", "generate"):
        result = printed["methods"][method]
        assert result["rows"] == 6 and len(result["seconds"]) == 2 and result["median_s"] > 0
        assert 1 <= result["mean_generated_length"] <= 3 and result["tokens_per_s"] > 0
        assert result["reproducible"] is True  # seeded: every run drew the same answers
        assert result["peak_memory_bytes"] >= result["memory_before_decoding_bytes"] > 0
        assert result["peak_memory_kind"] in ("process_peak_rss", "cuda_max_allocated")
    assert printed["speedup"] > 0 and printed["memory_ratio"] > 0
