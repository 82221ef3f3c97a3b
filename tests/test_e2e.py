"""End to end through the public command line (src/train.py), on tiny-random-llama."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from model import get_model

SEED_COMMAND = [
    "src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", "trainer=GradDiff",
    "trainer.method_args.alpha=0.5", "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90",
    "data.eval=TOFU_QA_FORGET10_P", "collator=DataCollatorForSupervisedDataset",
]
FAST = ["trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true"]


def _run_ok(args):
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _tiny(path):
    return get_model({"model_args": {"pretrained_model_name_or_path": str(path)},
                      "tokenizer_args": {"pretrained_model_name_or_path": str(path)}})


def _check_run_folder(out, logged_terms):
    assert out.is_dir() and not list(out.parent.glob(out.name + ".incomplete*"))
    assert (out / "run_complete.json").is_file()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "train_log.jsonl"):
        assert (out / name).is_file(), name
    steps = [e for e in _log(out) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for term in logged_terms:
        assert all(term in e for e in steps), term
    model, _ = _tiny(out)
    return model


def test_seed_quick_start_on_generated_data(tofu_dir, tmp_path):
    out = tmp_path / "unlearned"
    _run_ok([*SEED_COMMAND, f"paths.tofu={tofu_dir}", *FAST, f"paths.output_dir={out}",
             "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=2"])
    model = _check_run_folder(out, ["forget_loss", "retain_loss"])
    assert any("eval_loss" in e for e in _log(out))
    # Unlearning moved the weights away from the (seeded) random start.
    start, _ = get_model(_tiny_cfg())
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, start.model.layers[0].mlp.down_proj.weight)


def _tiny_cfg():
    from omegaconf import OmegaConf

    from conftest import MODEL_CACHE, REPO

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    return cfg


def test_seed_quick_start_on_real_tofu(shared_tofu, tmp_path):
    out = tmp_path / "unlearned"
    _run_ok([*SEED_COMMAND, f"paths.tofu={shared_tofu}", *FAST, f"paths.output_dir={out}"])
    _check_run_folder(out, ["forget_loss", "retain_loss"])


@pytest.mark.slow  # ~20 s: two command-line runs (make test-slow)
def test_finetune_then_unlearn_from_the_saved_model(tofu_dir, tmp_path):
    target = tmp_path / "target"
    _run_ok(["src/train.py", "--config-name=train.yaml", "model=tiny-random-llama", "data.train=TOFU_QA_FULL",
             f"paths.tofu={tofu_dir}", *FAST, f"paths.output_dir={target}"])
    _check_run_folder(target, [])
    out = tmp_path / "npo"
    _run_ok(["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama",
             f"model.model_args.pretrained_model_name_or_path={target}", "trainer=NPO",
             "data.forget=TOFU_QA_FORGET05", "data.retain=TOFU_QA_RETAIN95", f"paths.tofu={tofu_dir}", *FAST,
             f"paths.output_dir={out}"])
    _check_run_folder(out, ["forget_loss", "retain_loss"])


@pytest.mark.parametrize("overrides, message", [
    (["data.forget=TOFU_QA_FORGET11"], "unknown dataset 'TOFU_QA_FORGET11'; valid names: MUSE_MIA_forget, MUSE_MIA_holdout, "
                                      "MUSE_MIA_retain, MUSE_forget, MUSE_forget_knowmem, MUSE_forget_scal, MUSE_forget_sust, "
                                      "MUSE_forget_verbmem, MUSE_retain, MUSE_retain_knowmem, RWKU_fluency"),
    (["data.retain=null"], "data.retain"),
    pytest.param(["data.dataset_args.max_length=8"], "max_length=8", marks=pytest.mark.slow),  # ~10 s each: a command-line run
    pytest.param(["model=tiny-random-lama"], "tiny-random-llama", marks=pytest.mark.slow),  # ~10 s each: a command-line run
    pytest.param(["trainer=GradDif"], "GradDiff", marks=pytest.mark.slow),  # ~10 s each: a command-line run
    pytest.param(["trainer.method_args.alpha=0.5", "+trainer.method_args.beta=1"], "not accepted by GradDiff",
                 marks=pytest.mark.slow),  # ~10 s each: a command-line run
])
def test_bad_input_fails_clearly_and_writes_nothing(tofu_dir, tmp_path, overrides, message):
    out = tmp_path / "run"
    args = [*SEED_COMMAND, f"paths.tofu={tofu_dir}", *FAST, f"paths.output_dir={out}"]
    args = [a for a in args if a.split("=")[0] not in {o.split("=")[0] for o in overrides}] + overrides
    result = run_cli(args)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not out.exists() and not list(out.parent.glob("run.incomplete*"))


@pytest.mark.slow  # ~10 s: a command-line run (make test-slow)
def test_missing_data_folder_names_file_and_setting(tmp_path):
    out = tmp_path / "run"
    result = run_cli([*SEED_COMMAND, f"paths.tofu={tmp_path / 'nowhere'}", *FAST, f"paths.output_dir={out}"])
    assert result.returncode != 0
    assert "forget10.json not found" in result.stderr and "paths.tofu=" in result.stderr
    assert not out.exists()


@pytest.mark.slow  # ~15 s: a command-line run (make test-slow)
def test_failure_during_training_leaves_no_result(tofu_dir, tmp_path):
    out = tmp_path / "run"
    # An absurd learning rate makes the loss non-finite within a few steps.
    result = run_cli([*SEED_COMMAND, f"paths.tofu={tofu_dir}", *FAST, "trainer.args.max_steps=6",
                      "trainer.args.learning_rate=1e30", "trainer.args.max_grad_norm=0", "trainer.args.warmup_steps=0",
                      "trainer.args.save_strategy=steps", "trainer.args.save_steps=1", f"paths.output_dir={out}"])
    assert result.returncode != 0
    assert "non-finite loss" in result.stderr
    assert not out.exists()
    # The checkpoints saved before the failure are kept for a resume, under a name no one takes for a result.
    (kept,) = out.parent.glob("run.incomplete-*")
    assert f"checkpoints are kept in {kept}" in result.stdout + result.stderr
    assert not (kept / "run_complete.json").exists() and (kept / "checkpoint-1" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_one_step_of_smollm2(tofu_dir, tmp_path):
    out = tmp_path / "smol"
    _run_ok([*[a.replace("tiny-random-llama", "SmolLM2-135M-Instruct") for a in SEED_COMMAND],
             f"paths.tofu={tofu_dir}", "trainer.args.max_steps=1", "trainer.args.per_device_train_batch_size=2",
             "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "data.eval=null",
             f"paths.output_dir={out}"])
    assert (out / "model.safetensors").is_file()
    assert any("forget_loss" in e for e in _log(out))


@pytest.mark.slow  # ~25 s: torchrun on 2 processes (test_distributed.py covers the numbers) (make test-slow)
def test_two_processes_on_cpu(tofu_dir, tmp_path):
    """Distributed data parallel (2 CPU processes, gloo): ranks share the work, rank 0 writes once.

    Includes a TOFU evaluation at step 2, whose passes are split between the ranks and gathered.
    """
    out = tmp_path / "ddp"
    # torchrun, not `accelerate launch --cpu --num_processes 2`: the latter starts ONE process on a CPU
    # (its simple launcher), so nothing would be distributed.
    _run_ok(["-m", "torch.distributed.run", "--nproc_per_node", "2",
             *[a for a in SEED_COMMAND if a != "trainer=GradDiff"],
             "trainer=NPO", f"paths.tofu={tofu_dir}", *FAST, "data.eval=null", f"paths.output_dir={out}",
             "eval=tofu", "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=2",
             "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=8",
             *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=8"
               for p in ("retain", "ra", "wf")]])
    model = _check_run_folder(out, ["forget_loss", "retain_loss"])
    # 2 ranks x batch 2 per step over 8 forget samples: each step covers half an epoch (one process
    # would cover a quarter).
    steps = [e for e in _log(out) if "loss" in e]
    assert [e["epoch"] for e in steps] == [0.5, 1.0]
    # The logged loss is the mean over the ranks, and so are its terms: they add up to it
    # (gamma 1, alpha 0.5). Rank 0's own terms would not, since each rank draws other retain rows.
    for e in steps:
        assert e["loss"] == pytest.approx(e["forget_loss"] + 0.5 * e["retain_loss"], rel=1e-5), e
    assert model is not None
    logs = json.loads((out / "checkpoint-2" / "evals" / "TOFU_EVAL.json").read_text())
    # every forget sample evaluated once, although each rank computed only half of them
    assert sorted(int(i) for i in logs["forget_Q_A_Prob"]["value_by_index"]) == list(range(8))
    assert [e["step"] for e in _log(out) if "eval_tofu_model_utility" in e] == [2]
