"""DeepSpeed ZeRO-3 on 2 CPU processes (gloo, torchrun): NPO with its partitioned reference model, the
reference precomputation and a TOFU evaluation during training give one process's numbers, and the
consolidated save loads with from_pretrained. Skipped where DeepSpeed is not installed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODEL_CACHE, REPO, run_cli

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")

TWO_PROCESSES = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
ZERO3 = f"trainer.args.deepspeed={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"
SHORT_GENERATION = ["eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=8",
                    *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=8"
                      for p in ("retain", "ra", "wf")]]


def _npo(model_dir, tofu_dir, output_dir, batch_size: int) -> list[str]:
    return ["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama",
            f"model.model_args.pretrained_model_name_or_path={model_dir}", "trainer=NPO",
            "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90", "data.eval=null", f"paths.tofu={tofu_dir}",
            "trainer.args.max_steps=2", f"trainer.args.per_device_train_batch_size={batch_size}",
            "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1",
            "trainer.args.disable_tqdm=true", "trainer.args.warmup_steps=0", f"paths.output_dir={output_dir}",
            "eval=tofu", "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=2", *SHORT_GENERATION]


def _steps(folder) -> list[dict]:
    return [e for e in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """tiny-random-llama saved as a pretrained folder: from_pretrained is the path ZeRO-3 partitions (zero.Init)."""
    from model import get_model

    folder = tmp_path_factory.mktemp("tiny_pretrained")
    model, tokenizer = get_model(_tiny_config())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_config() -> dict:
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    return {**config, "cache_dir": str(MODEL_CACHE)}


@pytest.mark.slow
def test_zero3_npo_on_two_processes_equals_one_process(pretrained_tiny, tofu_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "zero3"
    result = run_cli(_npo(pretrained_tiny, tofu_dir, one, batch_size=2))
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_cli([*TWO_PROCESSES, *_npo(pretrained_tiny, tofu_dir, two, batch_size=1), ZERO3])
    assert result.returncode == 0, result.stderr[-4000:]
    # the reference was built from the partitioned policy, not as a whole copy per process
    assert "a ZeRO-3 copy holding this process's partition" in result.stdout + result.stderr
    single, sharded = _steps(one), _steps(two)
    assert [e["step"] for e in sharded] == [1, 2]
    # step 1 runs before any update: NPO's forget loss is (2 / beta) log 2 when the reference equals the policy
    assert sharded[0]["forget_loss"] == pytest.approx(20 * torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    for a, b in zip(single, sharded):
        for key in ("loss", "forget_loss", "retain_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
        # ZeRO-3 reduces each gradient partition on its own: the norm's float32 sums run in another order
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    # one consolidated model (stage3_gather_16bit_weights_on_model_save; float32 here), loadable whole
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    assert all(weights_two[k].shape == weights_one[k].shape for k in weights_one)
    assert max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one) < 1e-5
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(two)
    assert torch.equal(loaded.state_dict()["model.norm.weight"], weights_two["model.norm.weight"])
    # the TOFU evaluation during training ran on the partitioned model and matches the one process's
    summary_one = json.loads((one / "checkpoint-2" / "evals" / "TOFU_SUMMARY.json").read_text())
    summary_two = json.loads((two / "checkpoint-2" / "evals" / "TOFU_SUMMARY.json").read_text())
    assert summary_one.keys() == summary_two.keys() and "forget_quality" in summary_two
    for key, value in summary_one.items():
        if isinstance(value, float):
            assert summary_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_random_weight_model_is_built_whole_and_seeded_under_zero3():
    """Under ZeRO-3, from_config would create the weights partitioned and uninitialised; a random-weight
    (test) model is built whole instead, with the same seeded weights as without DeepSpeed."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from model import get_model

    config = _tiny_config()
    plain, _ = get_model(config)
    active = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        under_zero3, _ = get_model(config)
    finally:
        del active
    assert not any(hasattr(p, "ds_id") for p in under_zero3.parameters())
    for (name, a), b in zip(plain.state_dict().items(), under_zero3.state_dict().values()):
        assert torch.equal(a, b), name
