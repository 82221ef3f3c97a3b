"""LoRA / PEFT: only adapters train, the reference is the model with adapters off, save -> load -> evaluate."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import MODEL_CACHE, REPO, train_in_process
from data import build_dataset, compose_dataset
from data.collators import DataCollatorForSupervisedDataset
from model import get_model
from model.forward import unwrap
from model.peft import AdapterDisabled, apply_peft, merged_name, peft_settings
from trainer.utils import decoder_layers, hidden_states_at

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAST = ["model=tiny-random-llama", "peft=lora", "trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true",
        "trainer.args.learning_rate=1e-2", "trainer.args.warmup_steps=0", "data.eval=null"]


def _cfg(overrides: list[str], name: str = "unlearn.yaml"):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(name, overrides=[*overrides, f"paths.model_cache_dir={MODEL_CACHE}"])


def _base_weights():
    model, _ = get_model(_cfg(["model=tiny-random-llama"]).model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_peft_settings_by_name_and_bad_values():
    settings = peft_settings("lora")
    assert settings["r"] == 8 and settings["lora_alpha"] == 16 and list(settings["target_modules"]) == list(TARGETS)
    assert peft_settings(None) is None
    with pytest.raises(ValueError, match="model.peft='lorra': no configs/peft/lorra.yaml; valid: lora"):
        peft_settings("lorra")
    with pytest.raises(ValueError, match=r"not peft.LoraConfig fields: \['rank'\]"):
        peft_settings({"rank": 8})
    with pytest.raises(ValueError, match="model.peft.method='ia3'; valid: lora"):
        peft_settings({"method": "ia3"})
    # both spellings compose to the same settings: peft=lora by Hydra's defaults, model.peft=lora (a name) by the
    # entry point (resolvers.compose_names, Hydra's compose API), which the run's saved config then records
    from resolvers import compose_names

    assert OmegaConf.to_container(_cfg(["peft=lora"]).model.peft) == {**settings, "target_modules": list(TARGETS)}
    assert _cfg(["model.peft=lora"]).model.peft == "lora"
    assert OmegaConf.to_container(compose_names(_cfg(["model.peft=lora"])).model.peft) == \
        OmegaConf.to_container(_cfg(["peft=lora"]).model.peft)
    with pytest.raises(ValueError, match="model.peft='lorra': no configs/peft/lorra.yaml; valid: lora, qlora"):
        compose_names(_cfg(["model.peft=lorra"]))


def _perturbed_lora_model():
    model, tokenizer = get_model(_cfg(["model=tiny-random-llama"]).model)
    base_copy = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_peft(model, peft_settings("lora"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return peft_model, base_copy, tokenizer


def test_reference_with_adapters_off_is_the_base_model():
    """The reference of NPO-family methods under LoRA: the same modules, adapters off = the base model's outputs."""
    peft_model, base_copy, _ = _perturbed_lora_model()
    base, _ = get_model(_cfg(["model=tiny-random-llama"]).model)
    base.load_state_dict(base_copy)
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    reference = AdapterDisabled(peft_model)
    with torch.no_grad():
        ref_logits, base_logits = reference(input_ids=ids).logits, base(input_ids=ids).logits
        policy_logits = peft_model(input_ids=ids).logits
    assert torch.allclose(ref_logits, base_logits, atol=1e-6)
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)  # the adapters do act on the policy
    # helpers see through both wrappers to the same layers (RMU's activations of the frozen model)
    assert unwrap(reference) is unwrap(peft_model) is peft_model.get_base_model()
    assert decoder_layers(reference) is decoder_layers(peft_model)
    with torch.no_grad():
        assert torch.allclose(hidden_states_at(reference, 1, input_ids=ids), hidden_states_at(base, 1, input_ids=ids),
                              atol=1e-6)


@pytest.mark.parametrize("method", ["GradDiff", "NPO"])
def test_lora_unlearning_trains_only_adapters(method, tofu_dir, tmp_path):
    out = tmp_path / method
    steps = train_in_process(out, [*FAST, f"trainer={method}", f"paths.tofu={tofu_dir}"])
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # adapters only, no second full copy
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    if method == "NPO":  # step 1: policy == reference (adapters off), so the NPO term is (2/beta) log 2
        assert steps[0]["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    # save -> load: the adapter folder loads as base + adapter merged; only target-module weights moved
    loaded, _ = get_model(_cfg(["model=tiny-random-llama", f"model.model_args.pretrained_model_name_or_path={out}"],
                               "eval.yaml").model)
    base = _base_weights()
    moved = {k for k, v in loaded.state_dict().items() if not torch.equal(v, base[k])}
    assert moved and all(k.split(".")[-2] in TARGETS for k in moved)


def test_adapter_folder_evaluates_like_its_merged_model(tofu_dir, tmp_path):
    """model.peft.merge=true also writes <output>/merged; src/eval.py gives the same numbers on both folders."""
    import eval as eval_script

    out = tmp_path / "run"
    train_in_process(out, [*FAST, "trainer=GradDiff", f"paths.tofu={tofu_dir}", "model.peft.merge=true"])
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    summaries = []
    for folder, name in ((out, "adapter"), (out / "merged", "merged")):
        cfg = _cfg(["model=tiny-random-llama", f"model.model_args.pretrained_model_name_or_path={folder}", "eval=tofu",
                    f"paths.tofu={tofu_dir}", "holdout_split=holdout01", "forget_split=forget10",
                    f"paths.output_dir={tmp_path / name}", "eval.tofu.limit=2",
                    "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
                    *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
                      for p in ("retain", "ra", "wf")]], "eval.yaml")
        summaries.append(eval_script.run(cfg)["tofu"].summary)
    assert summaries[0].keys() == summaries[1].keys()
    for key in summaries[0]:
        assert summaries[0][key] == pytest.approx(summaries[1][key], abs=1e-6, nan_ok=True), key


def _forget_nll(model, tokenizer, tofu_dir) -> float:
    root = OmegaConf.create({"paths": {"tofu": str(tofu_dir)}, "seed": 0})
    ds = build_dataset(compose_dataset("TOFU_QA_FORGET10", root), tokenizer)
    batch = DataCollatorForSupervisedDataset(tokenizer)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss)


def test_task_vector_with_lora_negates_the_merged_update(tofu_dir, tmp_path):
    """theta = theta_0 - scale * (B A s): merged first, so the forget NLL rises (negating A and B would lower it)."""
    base = _base_weights()
    deltas = {}
    for scale in (1, 2):
        out = tmp_path / f"tv{scale}"
        train_in_process(out, [*FAST, "trainer=TaskVector", f"trainer.method_args.scale={scale}", "data.retain=null",
                               f"paths.tofu={tofu_dir}", "trainer.args.max_steps=3"])
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        weights = load_file(str(out / "model.safetensors"))
        deltas[scale] = {k: weights[k] - base[k] for k in weights}
    moved = [k for k, v in deltas[1].items() if v.abs().max() > 0]
    assert moved and all(k.split(".")[-2] in TARGETS for k in moved)
    for k in moved:  # linear in the scale: the same task vector, subtracted once and twice
        assert torch.allclose(deltas[2][k], 2 * deltas[1][k], atol=1e-6)
    model, tokenizer = get_model(_cfg(["model=tiny-random-llama"]).model)
    before = _forget_nll(model, tokenizer, tofu_dir)
    negated, _ = get_model(_cfg(["model=tiny-random-llama", f"model.model_args.pretrained_model_name_or_path={tmp_path / 'tv1'}"]).model)
    assert _forget_nll(negated, tokenizer, tofu_dir) > before
    assert merged_name("model.layers.0.self_attn.q_proj.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"


def test_rmu_with_lora_trains_the_adapters_it_reaches(tofu_dir, tmp_path):
    out = tmp_path / "rmu"
    common = [*FAST, "trainer=RMU", "trainer.method_args.layer_id=1", f"paths.tofu={tofu_dir}", "model.peft.target_modules=[down_proj]"]
    steps = train_in_process(out, common)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("mlp.down_proj.lora_" in k for k in adapter)
    with pytest.raises(ValueError, match="with model.peft the adapters are what RMU trains"):
        train_in_process(tmp_path / "bad", [*common, "trainer.method_args.trainable_params=[x]"])
    with pytest.raises(ValueError, match="model.peft adapters select parameters after layer_id=0"):
        train_in_process(tmp_path / "bad2", [*FAST, "trainer=RMU", "trainer.method_args.layer_id=0", f"paths.tofu={tofu_dir}"])


@pytest.mark.parametrize("method, forget", [
    ("GradAscent", "TOFU_QA_FORGET10"), ("SimNPO", "TOFU_QA_FORGET10"), ("CEU", "TOFU_QA_FORGET10"),
    ("UNDIAL", "TOFU_QA_FORGET10"), ("WGA", "TOFU_QA_FORGET10"), ("SatImp", "TOFU_QA_FORGET10"),
    ("PDU", "TOFU_QA_FORGET10 trainer.method_args.retain_loss_eps=20"), ("DPO", "TOFU_QA_FORGET10_IDK"), ("IdkNLL", "TOFU_QA_FORGET10_IDK"),
])
def test_every_method_runs_with_lora(method, forget, tofu_dir, tmp_path):
    """The other methods (GradDiff, NPO, TaskVector, RMU above; AltPO runs DPO's loss): a step each, adapters saved."""
    out = tmp_path / method
    retain = "data.retain=null" if method == "GradAscent" else "data.retain=TOFU_QA_RETAIN90"
    forget, *extra = forget.split()
    steps = train_in_process(out, [*FAST, f"trainer={method}", f"data.forget={forget}", *extra, retain, f"paths.tofu={tofu_dir}",
                                   "trainer.args.max_steps=1"])
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"])
    assert all("lora_" in k for k in load_file(str(out / "adapter_model.safetensors")))


def test_qlora_settings_and_where_they_are_refused():
    """peft=qlora: LoRA's keys plus a 4-bit BitsAndBytesConfig; on a machine without CUDA it is refused before loading."""
    from model.peft import compose_peft, quantization_config

    raw = OmegaConf.to_container(compose_peft("qlora"))  # Hydra composes it: lora.yaml, then qlora's own keys
    assert raw["r"] == 8 and raw["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert OmegaConf.to_container(_cfg(["peft=qlora"]).model.peft) == {**raw, "target_modules": list(TARGETS)}
    config = quantization_config(raw)
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(peft_settings("lora")) is None
    with pytest.raises(ValueError, match="merging into a 4-bit base rounds"):
        peft_settings({**raw, "merge": True})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU, and none is available: use peft=lora"):
            peft_settings("qlora")
