"""benchmarks/train_throughput.py runs and prints what its README says (a smoke run on the tiny model; no timing)."""

import json

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow  # ~11 s: the benchmark script (make test-slow)
def test_train_throughput_prints_one_json_object_with_the_losses(tofu_dir, tmp_path):
    out = tmp_path / "train.json"
    proc = run_cli([str(REPO / "benchmarks" / "train_throughput.py"), "--model", "tiny-random-llama", "--method", "NPO",
                    "--batch-size", "2", "--forget-split", "forget01", "--tofu", str(tofu_dir), "--warmup-steps", "1",
                    "--steps", "2", "--out", str(out), "trainer.args.joint_forward=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["method"] == "NPO" and printed["method_args"]["beta"] == 0.1
    # the implementation options are reported as trainer arguments, not as method hyperparameters
    assert printed["trainer_args"]["joint_forward"] is True and "joint_forward" not in printed["method_args"]
    assert len(printed["loss_first_steps"]) == 3 and printed["finite"] is True
    assert printed["steps_per_s"] > 0
