"""Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark", arXiv:2403.03218)."""

from __future__ import annotations

import re
from typing import Any

import torch

from core.distributed import unwrap_parallel
from model.forward import model_inputs, unwrap
from model.peft import is_peft_model
from trainer.losses import IGNORE_INDEX, masked_token_mse
from trainer.unlearn.base import UnlearningTrainer
from trainer.utils import check_layer_index, decoder_layers, hidden_states_at

TOKEN_MASKS = ("all", "answer")


def default_trainable_params(layer_id: int) -> list[str]:
    """The paper's choice: the MLP output projections of layers ``layer_id-2 .. layer_id``."""
    layers = "|".join(str(i) for i in range(max(0, layer_id - 2), layer_id + 1))
    return [rf"model\.layers\.({layers})\.mlp\.down_proj\.weight"]


class RMU(UnlearningTrainer):
    """``L = L_forget + alpha * L_retain`` on the hidden states ``h_l`` of decoder layer ``l = layer_id``.

    - ``L_forget = mean_{t in forget tokens} (1/d) ||h_l(t) - c u||^2``: forget activations are steered to
      ``c u``, with ``u`` a fixed random unit vector (drawn once: uniform in [0, 1)^d, then normalised,
      as in the paper; seeded by ``seed``);
    - ``L_retain = mean_{t in retain tokens} (1/d) ||h_l(t) - h_l^frozen(t)||^2``: retain activations stay
      those of the frozen model from before unlearning.

    ``h_l`` is the output of decoder layer ``l`` (0-based), i.e. ``hidden_states[l + 1]`` in Hugging Face's
    ``output_hidden_states`` convention (for the last layer HF reports it after the final norm; RMU uses
    the raw layer output). It is computed by ``trainer.utils.hidden_states_at``, which stops the forward
    after layer ``l``: the later layers and the LM head never run. The paper writes the terms with
    ``||.||^2``; its reported hyperparameters (``c``, ``alpha``) go with the per-token mean over the
    hidden size used here (``trainer.losses.masked_token_mse``).

    Only the parameters matching ``trainable_params`` are trained; all others are frozen
    (``requires_grad=False``) when the trainer is built, before the optimizer exists.

    Args (``trainer.method_args``):
        layer_id: decoder layer ``l`` whose output is steered (0-based).
        steering_coeff: ``c``, norm of the forget target. The paper's 6.5 is for 7B models (Zephyr-7B);
            it depends on the model's activation scale and needs tuning per model.
        alpha: weight of the retain term (paper: 1200 for Zephyr-7B).
        trainable_params: regular expressions, each matched against the whole parameter name
            (``re.fullmatch``); null = the paper's choice, ``mlp.down_proj.weight`` of layers
            ``layer_id-2 .. layer_id``.
        token_mask: ``all`` (every attended token of the sequence, as the paper steers whole documents) or
            ``answer`` (answer tokens only, label != -100).
        seed: seed of the random direction ``u``.
    """

    uses_retain = True

    uses_reference_model = True  # the retain term matches the frozen model's activations

    def __init__(self, *args: Any, layer_id: int = 7, steering_coeff: float = 6.5, alpha: float = 1200.0,
                 trainable_params: list[str] | str | None = None, token_mask: str = "all", seed: int = 0,
                 **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("RMU needs a model")
        self.check_arg("layer_id", layer_id, integer=True, low=0)
        check_layer_index(model, layer_id, "layer_id")
        self.check_arg_choice("token_mask", token_mask, TOKEN_MASKS)
        self.steering_coeff = self.check_arg("steering_coeff", steering_coeff, low=0, low_open=True)
        dtype = next(unwrap(model).parameters()).dtype
        largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
        if self.steering_coeff ** 2 >= largest:  # the forget term is a mean of squares of values ~ c
            raise ValueError(f"RMU: trainer.method_args.steering_coeff={steering_coeff}; must be below "
                             f"{largest ** 0.5:.3g}: the forget target's squared norm (c^2 = {self.steering_coeff ** 2:.3g}) "
                             f"overflows the model's {dtype} (largest value {largest:.3g}), so every forget loss would be "
                             "infinite (the paper uses 6.5 for 7B models)")
        self.alpha = self.check_arg("alpha", alpha, low=0)
        self.check_arg("seed", seed, integer=True, low=0)
        if is_peft_model(unwrap_parallel(model)):
            # LoRA: the adapters are what trains; choose them with model.peft (target_modules, layers_to_transform)
            if trainable_params is not None:
                raise ValueError("RMU: trainer.method_args.trainable_params is set, but with model.peft the adapters are "
                                 "what RMU trains; choose them with model.peft.target_modules (e.g. [down_proj]) and "
                                 "model.peft.layers_to_transform (e.g. [5, 6, 7])")
            self.layer_id, self.token_mask, self.trainable_params = layer_id, token_mask, []
            self._check_trained_layers({n for n, p in unwrap_parallel(model).named_parameters() if p.requires_grad},
                                       len(decoder_layers(model)), "model.peft adapters")
        else:
            self._init_trainable(model, layer_id, token_mask, trainable_params)

        config = unwrap(model).config
        hidden_size = (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size
        generator = torch.Generator().manual_seed(seed)
        u = torch.rand(hidden_size, generator=generator)
        self.control_vec = self.steering_coeff * u / u.norm()
        super().__init__(*args, **kwargs)

    def _init_trainable(self, model: torch.nn.Module, layer_id: int, token_mask: str,
                        trainable_params: list[str] | str | None) -> None:
        if trainable_params is None:
            trainable_params = default_trainable_params(layer_id)
        elif isinstance(trainable_params, str):
            trainable_params = [trainable_params]
        if not isinstance(trainable_params, (list, tuple)) or not all(isinstance(p, str) for p in trainable_params):
            raise ValueError(f"RMU: trainer.method_args.trainable_params={trainable_params!r}; must be a regular "
                             "expression, a list of them, or null (the paper's layers)")
        self.layer_id = layer_id
        self.token_mask, self.trainable_params = token_mask, list(trainable_params)
        self._freeze_all_but_trainable(unwrap(model))

    def _check_trained_layers(self, chosen: set[str], n_layers: int, what: str) -> None:
        after = sorted(n for n in chosen if (m := re.search(r"layers\.(\d+)\.", n)) and int(m.group(1)) > self.layer_id)
        if after:
            raise ValueError(f"{what} select parameters after layer_id={self.layer_id} (of {n_layers} "
                             f"layers), which RMU's loss does not reach: {after[:4]}")

    def _freeze_all_but_trainable(self, model: torch.nn.Module) -> None:
        try:
            patterns = [re.compile(p) for p in self.trainable_params]
        except re.error as e:
            raise ValueError(f"RMU: trainer.method_args.trainable_params={self.trainable_params!r}: {e.pattern!r} is "
                             f"not a regular expression ({e})") from e
        names = [name for name, _ in model.named_parameters()]
        chosen = {name for name in names if any(p.fullmatch(name) for p in patterns)}
        if not chosen:
            examples = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"trainable_params={self.trainable_params} match no parameter of the model "
                             f"(patterns must match the whole name); parameter names look like: {examples}")
        self._check_trained_layers(chosen, len(decoder_layers(model)), "trainable_params")
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)

    def _token_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.token_mask == "answer":
            return batch["labels"] != IGNORE_INDEX
        mask = batch.get("attention_mask")
        return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()

    def hidden(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """``h_l`` ``[B, L, d]`` of a batch (the forward stops after layer ``l``)."""
        return hidden_states_at(model, self.layer_id, **model_inputs(batch))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = inputs["forget"], inputs["retain"]
        h_forget = self.hidden(model, forget)
        target = self.control_vec.to(h_forget.device)
        forget_loss = masked_token_mse(h_forget, target, self._token_mask(forget), self.token_mean_processes)
        h_retain = self.hidden(model, retain)
        with torch.no_grad():
            h_frozen = self.hidden(self.ref_model, retain)
        retain_loss = masked_token_mse(h_retain, h_frozen, self._token_mask(retain), self.token_mean_processes)
        loss = forget_loss + self.alpha * retain_loss
        self.log_loss_terms(forget_loss=forget_loss, retain_loss=retain_loss)
        return (loss, {"hidden_states": h_forget}) if return_outputs else loss
