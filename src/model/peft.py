"""LoRA / PEFT: adapters on the model, their saving and loading, and the base model seen through them.

``model.peft`` (a model config key; ``peft=lora`` on the command line fills it from
``configs/peft/lora.yaml``; ``model.peft=lora`` names that file, which the entry point composes by Hydra)
holds ``peft.LoraConfig`` keyword arguments (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, any
other ``LoraConfig`` key) plus our own ``merge`` (also save the merged model to ``<output>/merged``).
``get_model`` wraps the model with ``peft.get_peft_model``; only the adapters are trained.

- The frozen reference model of NPO-family methods is the same model with its adapters switched off
  (``AdapterDisabled``), not a second copy.
- A run saves ``adapter_model.safetensors`` and ``adapter_config.json``; ``load_adapter_folder`` puts a
  saved adapter back onto its base model (the Hub id or folder recorded in ``adapter_config.json``, or
  the model config's ``random_init`` recipe when the base had random weights) and merges it, so
  ``src/eval.py`` evaluates an adapter folder like any model folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

PEFT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "peft"
ADAPTER_CONFIG = "adapter_config.json"
#: Our keys of ``model.peft``; every other key goes to ``peft.LoraConfig``.
OWN_KEYS = ("method", "merge", "quantization")
METHODS = ("lora",)


def available_peft_configs() -> list[str]:
    return sorted(p.stem for p in PEFT_CONFIG_DIR.glob("*.yaml"))


def compose_peft(name: str) -> Any:
    """``configs/peft/<name>.yaml`` composed by Hydra (its defaults list applied), as ``peft=<name>`` places it at
    ``model.peft``; the entry point composes ``model.peft=<name>`` with it (``resolvers.compose_names``)."""
    from data import compose_config

    if not isinstance(name, str) or name not in available_peft_configs():
        raise ValueError(f"model.peft={name!r}: no configs/peft/{name}.yaml; valid: "
                         f"{', '.join(available_peft_configs())} (or null)")
    return compose_config("peft", name, "model.peft")


def peft_settings(value: Any) -> dict[str, Any] | None:
    """``model.peft`` as a dict (None: no adapters). A string names a file of ``configs/peft``, composed by Hydra
    (``compose_peft``; a run's entry point has composed it already)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = compose_peft(value)
    if not isinstance(value, dict):
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)
    settings = dict(value)
    method = settings.get("method", "lora")
    if method not in METHODS:
        raise ValueError(f"model.peft.method={method!r}; valid: {', '.join(METHODS)}")
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in settings if k not in known and k not in OWN_KEYS)
    if unknown:
        raise ValueError(f"model.peft has keys that are not peft.LoraConfig fields: {unknown}; "
                         f"see peft.LoraConfig (r, lora_alpha, lora_dropout, target_modules, ...) and {list(OWN_KEYS)}")
    if settings.get("quantization") is not None:
        check_quantization(settings)
    return settings


def check_quantization(settings: dict[str, Any]) -> None:
    """QLoRA (``model.peft.quantization``: ``transformers.BitsAndBytesConfig`` arguments) is refused before any
    loading where it cannot run: without a CUDA GPU or bitsandbytes, or with ``merge`` (merging into 4-bit
    weights rounds the update away)."""
    quantization = settings["quantization"]
    if not isinstance(quantization, dict):
        raise ValueError(f"model.peft.quantization={quantization!r}; give BitsAndBytesConfig arguments, e.g. "
                         "{load_in_4bit: true, bnb_4bit_quant_type: nf4}, or null")
    if settings.get("merge"):
        raise ValueError("model.peft.merge=true with model.peft.quantization: merging into a 4-bit base rounds the "
                         "adapters' update away; keep merge=false (the adapter folder loads on the full-precision base)")
    if not torch.cuda.is_available():
        raise ValueError("model.peft.quantization (QLoRA) loads the base model in 4 bits with bitsandbytes, which needs "
                         "a CUDA GPU, and none is available: use peft=lora here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("model.peft.quantization (QLoRA) needs bitsandbytes: pip install -e \".[qlora]\"") from None


def quantization_config(settings: dict[str, Any] | None) -> Any:
    """``transformers.BitsAndBytesConfig`` of ``model.peft.quantization``, or None."""
    if not settings or settings.get("quantization") is None:
        return None
    from transformers import BitsAndBytesConfig

    kwargs = dict(settings["quantization"])
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = getattr(torch, kwargs[key])
    return BitsAndBytesConfig(**kwargs)


def lora_config(settings: dict[str, Any]) -> Any:
    from peft import LoraConfig, TaskType

    kwargs = {k: v for k, v in settings.items() if k not in OWN_KEYS}
    kwargs.setdefault("task_type", TaskType.CAUSAL_LM)
    return LoraConfig(**kwargs)


def apply_peft(model: torch.nn.Module, settings: dict[str, Any]) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters (``peft.get_peft_model``); only the adapter weights train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if settings.get("quantization") is not None:  # QLoRA: norms in float32, input gradients for checkpointing
        model = prepare_model_for_kbit_training(model)
    try:
        return get_peft_model(model, lora_config(settings))
    except ValueError as e:  # e.g. target modules that match nothing: peft's message names them
        raise ValueError(f"model.peft: {e}") from e


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)


def is_adapter_folder(path: str | Path) -> bool:
    """A saved adapter (``adapter_config.json``) without a full model of its own (``config.json``)."""
    folder = Path(path).expanduser()
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(path: str | Path) -> str | None:
    """The base model recorded in an adapter folder (Hub id or folder), or None (a random-weight base)."""
    recorded = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return recorded.get("base_model_name_or_path") or None


def load_adapter_folder(base: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``base`` with the adapter saved in ``path`` merged into its weights (a plain model again)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(Path(path).expanduser()), is_trainable=False).merge_and_unload()


def merged_name(name: str) -> str:
    """A base-model parameter's name under LoRA (``...q_proj.base_layer.weight``) as it is once merged."""
    return name.replace(".base_layer.", ".")


MERGED_FOLDER = "merged"


def save_merged(model: torch.nn.Module, tokenizer: Any, folder: str | Path) -> Path:
    """Merge the adapters of a trained ``PeftModel`` into its base weights (in place: call it last) and save
    the plain model with the tokenizer to ``<folder>/merged`` (``model.peft.merge: true``)."""
    target = Path(folder) / MERGED_FOLDER
    merged = model.merge_and_unload()
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


class AdapterDisabled(torch.nn.Module):
    """The model of a ``PeftModel`` as it was before its adapters: every call runs with them switched off.

    Used as the frozen reference model under LoRA (the base weights never train), so it costs no
    memory. ``model.forward.unwrap`` sees through it to the base transformers model (its decoder layers
    are the same modules, so hooks such as RMU's capture work on it).
    """

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


__all__ = ["peft_settings", "apply_peft", "save_merged", "quantization_config", "is_peft_model", "is_adapter_folder", "adapter_base", "load_adapter_folder",
           "merged_name", "AdapterDisabled", "available_peft_configs", "compose_peft"]
