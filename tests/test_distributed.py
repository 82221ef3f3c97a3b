"""The numbers do not depend on how many processes computed them (2 CPU processes, gloo, through torchrun)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_cli
from trainer.losses import token_average

# torchrun, not `accelerate launch --cpu --num_processes 2`: the latter starts ONE process on a CPU.
TWO_PROCESSES = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
GRAD_DIFF = ["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", "trainer=GradDiff",
             "trainer.method_args.alpha=0.5", "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90",
             "data.eval=null", "trainer.args.max_steps=3", "trainer.args.gradient_accumulation_steps=1",
             "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true", "trainer.args.learning_rate=1e-3",
             "trainer.args.warmup_steps=0"]


def _steps(folder) -> list[dict]:
    return [e for e in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "loss" in e]


def test_token_average_without_a_process_group_is_the_local_mean():
    import torch

    assert token_average(torch.tensor(6.0), torch.tensor(4)).item() == 1.5
    assert token_average(torch.tensor(0.0), torch.tensor(0)).item() == 0.0  # no tokens: 0, not NaN
    # the process count is an argument; without a process group there is nothing to count with
    assert token_average(torch.tensor(6.0), torch.tensor(4), num_processes=2).item() == 1.5


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


def _same(a, b, where: str = "") -> None:
    """Equal structures, numbers within float rounding (the batches differ, so the padding does)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-9, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.slow  # ~30 s: two evaluations through the command line, one on 2 processes (make test-slow)
def test_distributed_evaluation_equals_one_process(tofu_dir, tmp_path):
    """src/eval.py on 2 processes: every pass split between them, gathered once, the same EVAL file as one process."""
    short = [f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=8"
             for p in ("retain", "ra", "wf")]
    args = ["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama", "eval=tofu", f"paths.tofu={tofu_dir}",
            "forget_split=forget10", "holdout_split=holdout01", "eval.tofu.limit=5",  # 5 rows: uneven shards
            "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=8", *short]
    one = run_cli([*args, f"paths.output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-4000:]
    two = run_cli([*TWO_PROCESSES, *args, f"paths.output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-4000:]
    assert two.stdout.count("tofu summary") == 1  # printed by process 0 only
    single = json.loads((tmp_path / "one" / "TOFU_EVAL.json").read_text())
    double = json.loads((tmp_path / "two" / "TOFU_EVAL.json").read_text())
    for meta in (single, double):
        for volatile in ("timestamp", "code_version", "compute"):  # the cost record: times differ
            meta["_meta"].pop(volatile)
    _same(single, double)
    _same(json.loads((tmp_path / "one" / "TOFU_SUMMARY.json").read_text()),
          json.loads((tmp_path / "two" / "TOFU_SUMMARY.json").read_text()))


@pytest.mark.slow  # ~20 s: an FSDP2 worker on 2 processes (make test-slow)
def test_fsdp2_sharded_reference_passes_stay_in_lockstep(tmp_path):
    """Uneven shards (3 and 2 samples) through an FSDP2-sharded model: padded to the same number of forward
    passes (a sharded forward is collective), the same NLLs as the whole model; RMU's layer capture runs the
    sharded forward to the end instead of stopping it early; the evaluator's plain passes (statistics and
    generate(synced_gpus=True)) stay in lockstep and give the whole model's results."""
    result = run_cli([*TWO_PROCESSES, "tests/fsdp2_worker.py", str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(line["rank"] for line in lines) == [0, 1]
    for line in lines:
        assert line["fsdp2"] and line["cached"] == 5
        assert line["max_nll_diff"] < 1e-4 and line["max_hidden_diff"] < 1e-5
        # the evaluator's plain passes: every question once, the whole model's values, no hang
        assert line["stats_items"] == line["texts_items"] == [0, 1, 2, 3, 4]
        assert line["max_logp_diff"] < 1e-4 and line["same_generations"]
        # the whole TOFU evaluator on the sharded model: every metric, the whole model's values
        assert "forget_quality" in line["summary_keys"] and line["max_summary_diff"] < 1e-4


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED"),
                                        ("deepspeed_zero3_offload", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    """Each launcher file is one accelerate reads, of the engine its name says, opening with its command."""
    from accelerate.commands.config.config_args import load_config_from_file

    from conftest import REPO

    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml src/train.py" in path.read_text()
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] and ds["zero3_save_16bit_model"]
        assert (ds["offload_param_device"] == "cpu") == name.endswith("offload")


@pytest.mark.slow  # ~30 s: LoRA NPO on 1 and on 2 processes (make test-slow)
def test_lora_npo_on_two_processes_equals_one(tofu_dir, tmp_path):
    """LoRA under DDP: the reference (adapters off) and the adapters' updates match one process of the same batch."""
    npo = [a if a != "trainer=GradDiff" else "trainer=NPO" for a in GRAD_DIFF if not a.startswith("trainer.method_args")]
    args = [*npo, "peft=lora", f"paths.tofu={tofu_dir}", "trainer.args.max_steps=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_cli([*args, "trainer.args.per_device_train_batch_size=2", f"paths.output_dir={one}"])
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_cli([*TWO_PROCESSES, *args, "trainer.args.per_device_train_batch_size=1", f"paths.output_dir={two}"])
    assert result.returncode == 0, result.stderr[-4000:]
    for a, b in zip(_steps(one), _steps(two), strict=True):
        for key in ("loss", "forget_loss", "retain_loss"):  # float32 rounding of terms near 14 and 25
            assert b[key] == pytest.approx(a[key], rel=2e-6, abs=1e-5), (key, a, b)
    adapters_one = load_file(str(one / "adapter_model.safetensors"))
    adapters_two = load_file(str(two / "adapter_model.safetensors"))
    assert max((adapters_one[k] - adapters_two[k]).abs().max().item() for k in adapters_one) < 1e-4


def test_a_launcher_that_started_fewer_processes_than_asked_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts ONE process on a CPU: the run says so and stops, naming
    torchrun, instead of silently training alone with another effective batch."""
    from core import distributed

    assert distributed.requested_processes(["/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2",
                                            "src/train.py"]) == 2
    assert distributed.requested_processes(["python", "-m", "torch.distributed.run", "src/train.py"]) is None
    config = tmp_path / "ddp.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\n")
    assert distributed.requested_processes(["accelerate", "launch", "--config_file", str(config), "x.py"]) == 4

    monkeypatch.setattr(distributed, "_launcher_command",
                        lambda: ["/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "src/train.py"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    distributed.check_process_count()  # not started by accelerate's launcher: nothing to compare
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(RuntimeError, match=r"asked for 2 processes .* but this run is the only one: .*torchrun "
                                           r"--nproc_per_node 2"):
        distributed.check_process_count()
    monkeypatch.setenv("WORLD_SIZE", "2")  # it did get them
    distributed.check_process_count()
