"""The numbers do not depend on how many processes computed them (2 CPU processes, gloo, through torchrun)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_cli
from trainer.losses import token_average, tokens_counted_over_processes

# torchrun, not `accelerate launch --cpu --num_processes 2`: the latter starts ONE process on a CPU.
TWO_PROCESSES = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
GRAD_DIFF = ["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", "trainer=GradDiff",
             "trainer.method_args.alpha=0.5", "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90",
             "data.eval=null", "trainer.args.max_steps=3", "trainer.args.gradient_accumulation_steps=1",
             "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true", "trainer.args.learning_rate=1e-3",
             "trainer.args.warmup_steps=0"]


def _steps(folder) -> list[dict]:
    return [e for e in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "loss" in e]


def test_token_average_outside_training_is_the_local_mean():
    import torch

    assert token_average(torch.tensor(6.0), torch.tensor(4)).item() == 1.5
    assert token_average(torch.tensor(0.0), torch.tensor(0)).item() == 0.0  # no tokens: 0, not NaN
    with tokens_counted_over_processes(2):  # no process group: nothing to count with
        assert token_average(torch.tensor(6.0), torch.tensor(4)).item() == 1.5


def test_two_processes_of_batch_one_equal_one_process_of_batch_two(tofu_dir, tmp_path):
    """Same effective batch, same rows per step, same retain partners, same token means: same run."""
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_cli([*GRAD_DIFF, f"paths.tofu={tofu_dir}", "trainer.args.per_device_train_batch_size=2",
                      f"paths.output_dir={one}"])
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_cli([*TWO_PROCESSES, *GRAD_DIFF, f"paths.tofu={tofu_dir}", "trainer.args.per_device_train_batch_size=1",
                      f"paths.output_dir={two}"])
    assert result.returncode == 0, result.stderr[-4000:]
    single, double = _steps(one), _steps(two)
    assert [e["step"] for e in single] == [e["step"] for e in double] == [1, 2, 3]
    for a, b in zip(single, double):
        for key in ("loss", "forget_loss", "retain_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a, b)
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one) < 1e-4
