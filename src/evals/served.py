"""Generation on a server: an evaluation's generation-only passes (greedy answers for ROUGE and the judge, sampled
answers for leak@k) sent to an OpenAI-compatible server that serves the evaluated model (vLLM or SGLang for speed on
GPUs), while the teacher-forced passes (probabilities, truth ratio, MIAs) stay local.

Prompts are the evaluation's own: the prompt tokens of each question (chat template included) decoded back to text
with their special tokens and sent to the completions API, less a leading BOS when the tokenizer adds one itself
(the server's tokenizer would add a second). The reply is cut at the metric's stop strings like a local answer;
``request_args`` adds fields to every request (a server's own sampling options). Greedy answers use temperature 0;
each sampled answer is a request of its own, seeded with the same per-answer seed as local sampling
(``evals.sampling.answer_seed``), so a server that honours ``seed`` (vLLM does) gives the same answer on every
rerun; its random numbers are the server's, not ours, so its answers differ from local ones.

Before the first answer, the weights check: the first ``check_rows`` answers of the first dataset, teacher-forced,
by the local model and by the server (the completions API with ``echo`` and ``logprobs``: the log-probability of
every prompt token). A mean absolute difference per answer token above ``check_tolerance`` is an error: the
server serves other weights. A server that returns no prompt log-probabilities (``transformers serve`` does not)
or tokenizes the text differently cannot be checked: a WARNING says so, and the EVAL file's
``_meta.generation_server`` records it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from core.distributed import gather_dicts
from evals.endpoint import EndpointSettings, OpenAIEndpoint
from evals.passes import cut_at_stops, generation_setup, prompt_and_answer_ids, question_and_answer
from evals.sampling import SamplingArgs, answer_seed

log = logging.getLogger(__name__)

#: ``seed`` of a request: the per-answer seed folded into the 31 bits every server accepts
SEED_BITS = 31


@dataclass(frozen=True)
class GenerationServerConfig:
    """``generation_server``: the served model's name, how to reach it (``EndpointSettings``), and the weights check
    (``check_weights``; ``check_rows`` answers; ``check_tolerance``: the largest mean |difference| of log-probability
    per answer token, in nats, between the server and the local model)."""

    model: str
    endpoint: EndpointSettings
    check_weights: bool = True
    check_rows: int = 4
    check_tolerance: float = 0.1
    request_args: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], owner: str) -> GenerationServerConfig:
        cfg = dict(cfg)
        own = ("model", "check_weights", "check_rows", "check_tolerance", "request_args")
        valid = [*own, *EndpointSettings.keys()]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"{owner}: unknown generation_server setting(s) {unknown}; valid: {', '.join(valid)}")
        if "api_key" in cfg:
            raise ValueError(f"{owner}: keys do not belong in a config; name the environment variable with api_key_env")
        model = cfg.get("model")
        if not isinstance(model, str) or model in ("", "???"):
            raise ValueError(f"{owner}: generation_server.model={model!r}; give the model name the server serves "
                             "(GET <base_url>/models lists them)")
        endpoint = EndpointSettings.from_mapping(cfg)
        bad = endpoint.check()
        if bad is not None:
            key, value, what = bad
            raise ValueError(f"{owner}: generation_server.{key}={value!r}; give {what}")
        config = cls(model, endpoint, **{k: cfg[k] for k in own[1:] if k in cfg})
        for key, ok, what in (
                ("check_weights", isinstance(config.check_weights, bool), "true or false"),
                ("check_rows", isinstance(config.check_rows, int) and not isinstance(config.check_rows, bool)
                 and config.check_rows >= 1, "an integer >= 1"),
                ("check_tolerance", isinstance(config.check_tolerance, (int, float))
                 and not isinstance(config.check_tolerance, bool) and config.check_tolerance > 0, "a number > 0"),
                ("request_args", config.request_args is None or isinstance(config.request_args, Mapping),
                 "a mapping of extra request fields, or null")):
            if not ok:
                raise ValueError(f"{owner}: generation_server.{key}={getattr(config, key)!r}; give {what}")
        return config


class ServedGeneration:
    """The generation passes of one evaluation on a server (see the module docstring)."""

    def __init__(self, config: GenerationServerConfig) -> None:
        self.config = config
        self.endpoint = OpenAIEndpoint(config.endpoint, config.model, what="the generation server")
        self.weights_check: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """For the EVAL file's ``_meta``: where the answers were generated and what the weights check found."""
        return {"base_url": self.endpoint.url, "model": self.config.model, "weights_check": self.weights_check}

    def _extra(self) -> dict[str, Any]:
        return {"extra_body": dict(self.config.request_args)} if self.config.request_args else {}

    def _complete(self, prompts: Sequence[str], settings: Sequence[dict[str, Any]]) -> list[str]:
        def request(prompt: str, extra: dict[str, Any]):
            def send(client: Any) -> str:
                response = client.completions.create(model=self.config.model, prompt=prompt, **extra,
                                                     **self._extra())
                return response.choices[0].text or ""
            return send
        return self.endpoint.run([request(p, s) for p, s in zip(prompts, settings)])

    def greedy(self, prompts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str]) -> list[str]:
        """The greedy answer to each prompt text, cut at ``stop_strings``."""
        settings = {"max_tokens": max_new_tokens, "temperature": 0}
        if stop_strings:
            settings["stop"] = list(stop_strings)
        return [cut_at_stops(text, stop_strings) for text in self._complete(prompts, [settings] * len(prompts))]

    def sample(self, prompts: Sequence[str], indices: Sequence[int], args: SamplingArgs) -> list[list[str]]:
        """``args.num_samples`` answers to each prompt text: request (prompt ``i``, sample ``s``) is seeded with
        ``answer_seed(args.seed, indices[i], s)`` folded to 31 bits."""
        flat_prompts, settings = [], []
        for prompt, index in zip(prompts, indices):
            for sample in range(args.num_samples):
                flat_prompts.append(prompt)
                settings.append({"max_tokens": args.max_new_tokens, "temperature": args.temperature,
                                 "top_p": args.top_p, "seed": answer_seed(args.seed, int(index), sample) % 2 ** SEED_BITS,
                                 **({"stop": list(args.stop_strings)} if args.stop_strings else {})})
        texts = [cut_at_stops(t, args.stop_strings) for t in self._complete(flat_prompts, settings)]
        n = args.num_samples
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def check(self, model: torch.nn.Module, tokenizer: Any, dataset: Any) -> None:
        """The weights check (once per evaluation); raises ValueError when the server's log-probabilities differ
        from the local model's by more than ``check_tolerance``."""
        if self.weights_check is not None:
            return
        if not self.config.check_weights:
            self.weights_check = {"status": "off"}
            log.warning("generation server %s: check_weights=false: the generated answers are trusted to come from "
                        "the evaluated weights", self.endpoint.url)
            return
        rows = [prompt_and_answer_ids(dataset, i) for i in range(min(self.config.check_rows, len(dataset)))]
        texts = [prompt_text(tokenizer, torch.cat([p, a]).tolist()) for p, a in rows]

        def request(text: str):
            def send(client: Any) -> Any:
                response = client.completions.create(model=self.config.model, prompt=text, max_tokens=1, temperature=0,
                                                     echo=True, logprobs=0, **self._extra())
                return response.choices[0].logprobs
            return send

        served = self.endpoint.run([request(t) for t in texts])
        device = next(model.parameters()).device
        differences: list[float] = []
        for (prompt, answer), logprobs in zip(rows, served):
            values = None if logprobs is None else logprobs.token_logprobs
            if not values:
                self._unverified("its completions API returned no prompt log-probabilities (echo with logprobs)")
                return
            length = len(prompt) + len(answer)
            if len(values) != length + 1:  # the echoed text and the one generated token
                self._unverified(f"it tokenized a check text into {len(values) - 1} tokens, the local tokenizer "
                                 f"into {length}")
                return
            ids = torch.cat([prompt, answer]).unsqueeze(0).to(device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:length - 1].double()
            local = torch.log_softmax(logits, -1).gather(-1, answer.to(device).unsqueeze(-1)).squeeze(-1)
            remote = torch.tensor([float(v) for v in values[len(prompt):length]], dtype=torch.float64, device=device)
            differences.append(float((local - remote).abs().mean()))
        worst = max(differences)
        self.weights_check = {"status": "passed" if worst <= self.config.check_tolerance else "failed",
                              "rows": len(differences), "max_mean_abs_logp_difference": worst,
                              "tolerance": self.config.check_tolerance}
        if not math.isfinite(worst) or worst > self.config.check_tolerance:
            raise ValueError(
                f"the generation server {self.endpoint.url} (model {self.config.model!r}) does not serve the evaluated "
                f"weights: on the first {len(differences)} answers its log-probabilities differ from the local "
                f"model's by {worst:.4f} nats per token on average (check_tolerance={self.config.check_tolerance}); "
                "serve the evaluated model's folder, or set generation_server.check_weights=false to trust it")
        log.info("generation server %s: weights check passed (mean |difference| <= %.4f nats per token)",
                 self.endpoint.url, worst)

    def _unverified(self, why: str) -> None:
        self.weights_check = {"status": "unverified", "reason": why}
        log.warning("!" * 100)
        log.warning("generation server %s: CANNOT CHECK that it serves the evaluated weights: %s. The generation "
                    "metrics (ROUGE, judge, leak@k) come from whatever model it serves; serve the evaluated model's "
                    "folder with a server that returns prompt log-probabilities (vLLM does) to have it checked",
                    self.endpoint.url, why)
        log.warning("!" * 100)


def prompt_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text a server turns back into ``ids``: decoded with the special tokens, less a leading BOS when the
    tokenizer adds one itself (as the server's tokenizer will)."""
    ids = list(ids)
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    if adds_bos and ids[:1] == [bos]:
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _prompt_texts(tokenizer: Any, prompts: Mapping[int, torch.Tensor]) -> dict[int, str]:
    return {i: prompt_text(tokenizer, p.tolist()) for i, p in prompts.items()}


def served_generation_pass(served: ServedGeneration, model: torch.nn.Module, dataset: Any, tokenizer: Any,
                           template_args: Any, max_new_tokens: int = 200,
                           stop_strings: Sequence[str] = ()) -> dict[int, dict]:
    """``passes.generation_pass`` on the server: per index ``{"input", "ground_truth", "generation"}``."""
    served.check(model, tokenizer, dataset)
    prompts, stop_strings, _ = generation_setup(dataset, tokenizer, template_args, stop_strings)
    texts = _prompt_texts(tokenizer, prompts)
    answers = served.greedy([texts[i] for i in texts], max_new_tokens, stop_strings)
    return gather_dicts({i: {**question_and_answer(dataset, i), "generation": a} for i, a in zip(texts, answers)})


def served_sampling_pass(served: ServedGeneration, model: torch.nn.Module, dataset: Any, tokenizer: Any,
                         template_args: Any, args: SamplingArgs) -> dict[int, dict]:
    """``sampling.sampling_pass`` on the server: per index ``{"input", "ground_truth", "samples"}``."""
    served.check(model, tokenizer, dataset)
    prompts, stop_strings, _ = generation_setup(dataset, tokenizer, template_args, args.stop_strings)
    texts = _prompt_texts(tokenizer, prompts)
    args = SamplingArgs(**{**asdict(args), "stop_strings": tuple(stop_strings)})
    answers = served.sample([texts[i] for i in texts], list(texts), args)
    return gather_dicts({i: {**question_and_answer(dataset, i), "samples": a} for i, a in zip(texts, answers)})


__all__ = ["GenerationServerConfig", "ServedGeneration", "prompt_text", "served_generation_pass", "served_sampling_pass"]
