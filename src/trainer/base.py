"""``FinetuneTrainer``: the Hugging Face Trainer with our loss, loss-term logging and a NaN guard."""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback, is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from core.compute import Phase, add_tokens, mask_tokens
from core.distributed import is_main_process, is_sharded
from evals.benchmark import Benchmark
from evals.result import EvalResult
from progress import LoggedProgress
from run_folder import EVAL_HISTORY_FILE, RESULT_EVALS_DIR, write_atomic, write_json_atomic
from trainer.answer_nll import AnswerNLL, answer_token_nll, check_nll_impl, resolve_pack_rows
from trainer.arguments import FinetuneArguments
from trainer.losses import token_mean
from trainer.selection import MetricConstraint

log = logging.getLogger(__name__)

#: Training micro-steps whose losses may wait on the device before ``check_finite_losses`` reads them.
MAX_UNCHECKED_LOSSES = 64
#: A checkpoint's file with the method's own state (``FinetuneTrainer.method_state``).
METHOD_STATE_FILE = "method_state.json"


class LoggedTrainingProgress(TrainerCallback):
    """Training's progress as log lines where the Trainer draws no bar (``progress.LoggedProgress``: steps done
    of the total, elapsed, an estimate of the time left, at most every ``progress.LOG_INTERVAL_S``)."""

    def __init__(self) -> None:
        self.progress: LoggedProgress | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's callback signature
        self.progress = LoggedProgress(state.max_steps, "training", unit="step", report=state.is_world_process_zero)
        self.progress.done = state.global_step  # a resumed run starts where it stopped

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.progress is not None:
            self.progress.update(state.global_step - self.progress.done)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.progress is not None:
            self.progress.close()


class FinetuneTrainer(Trainer):
    """Supervised fine-tuning on question-answer batches (loss on answer tokens only).

    Extras over ``transformers.Trainer``: a non-finite loss stops training with a clear error;
    ``trainer.args.train_sampling_strategy=group_by_length`` batches samples of similar length (less
    padding); subclasses can log named loss terms (``log_loss_terms``) that appear in the trainer log next to
    ``loss``, averaged over the logging window; and ``evaluators`` (benchmarks such as TOFU) run at
    every evaluation (``eval_strategy`` / ``eval_on_start``), writing
    ``<output_dir>/checkpoint-<step>/evals/`` and logging their headline numbers.

    ``args`` is a ``FinetuneArguments`` (``arguments_class``; ``trainer.arguments``): ``args.nll_impl`` says
    how answer-token NLLs are computed (``logits``, ``chunked`` or ``liger``; ``trainer.answer_nll``) and
    ``args.pack_rows`` whether a batch's rows run packed (``trainer.packing``). NLL-based losses go through
    ``answer_token_nll`` / ``answer_nll`` / ``answer_mean_nll`` below to honour them.
    """

    #: The ``TrainingArguments`` subclass this trainer takes (``build_training_args`` builds it).
    arguments_class: type[FinetuneArguments] = FinetuneArguments

    def __init__(self, model: torch.nn.Module | None = None, args: FinetuneArguments | None = None, *rest: Any,
                 evaluators: Mapping[str, Benchmark] | None = None,
                 best_model_constraint: MetricConstraint | None = None, **kwargs: Any):
        if "num_items_in_batch" not in inspect.signature(type(self).compute_loss).parameters:
            raise TypeError(f"{type(self).__name__}.compute_loss must have Hugging Face's signature, which the Trainer "
                            "calls: def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None)")
        if not isinstance(args, self.arguments_class):
            raise TypeError(f"{type(self).__name__} takes args={self.arguments_class.__name__} (trainer.arguments), got "
                            f"{type(args).__name__}: build it with trainer.build_training_args")
        self.best_model_constraint = best_model_constraint
        self.evaluators = dict(evaluators or {})
        #: Evaluation results in memory by step: the latest and the best so far (the result's evaluation reuses one).
        self.evaluations: dict[int, dict[str, EvalResult]] = {}
        strategy = args.eval_strategy
        no_eval_data = kwargs.get("eval_dataset") is None
        if self.evaluators and no_eval_data and str(getattr(strategy, "value", strategy)) != "no":
            # transformers refuses an eval_strategy without eval_dataset; our evaluators need none.
            args.eval_strategy = "no"
            super().__init__(model, args, *rest, **kwargs)
            args.eval_strategy = strategy
        else:
            super().__init__(model, args, *rest, **kwargs)
        # Under FSDP and ZeRO-3 the evaluators run the sharded model with their plain passes, in lockstep
        # (Evaluator.evaluate).
        sharded = getattr(self, "is_fsdp_enabled", False) or is_sharded(self.model) or (
            getattr(self, "is_deepspeed_enabled", False) and is_deepspeed_zero3_enabled())
        check_nll_impl(self.args.nll_impl, self.model, sharded=sharded)
        self.pack_rows = resolve_pack_rows(self.args.pack_rows, self.model, sharded=sharded)
        if self.pack_rows:
            log.info("pack_rows: answer NLLs from packed rows (common prompt prefix once, no padding)")
        # Our losses are per-batch means; the Trainer divides them by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        # Loss values stay on the device until a log, a checkpoint or the end of training reads them:
        # reading one each step would make the host wait for the device's queue to drain.
        self._loss_terms: dict[str, list[torch.Tensor | float]] = defaultdict(list)
        self._last_terms: dict[str, torch.Tensor | float] = {}
        self._unchecked_losses: list[tuple[int, torch.Tensor, dict[str, torch.Tensor | float]]] = []
        if self.args.disable_tqdm:  # no bar (a log file, CI): a line at the start and at least every ~30 s
            self.add_callback(LoggedTrainingProgress())

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """``train_sampling_strategy=group_by_length`` with the lengths our datasets know (``lengths()``).

        The Hugging Face sampler otherwise reads ``input_ids`` of every item, which paired
        forget/retain items do not have at the top level.
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=list(dataset.lengths()))
        return super()._get_train_sampler(train_dataset)

    # ----- answer-token NLLs under nll_impl ---------------------------------------------------------
    @property
    def token_mean_processes(self) -> int:
        """The processes whose answer tokens a token-mean loss counts together (``trainer.losses.token_average``):
        all of them in a training step, where the processes' gradients are averaged; 1 otherwise (an evaluation
        loss is each process's own mean)."""
        return self.accelerator.num_processes if self.model.training else 1

    def token_mean(self, nll: AnswerNLL) -> torch.Tensor:
        """``sum_i S_i / sum_i T_i``, the mean NLL over a batch's answer tokens (``trainer.losses.token_mean``,
        with ``token_mean_processes``)."""
        return token_mean(nll.summed, nll.counts, num_processes=self.token_mean_processes)

    def answer_token_nll(self, model: torch.nn.Module, batch: dict[str, Any]) -> AnswerNLL:
        """Per-token answer NLLs of a batch and their mask (``trainer.answer_nll``), as ``args.nll_impl`` and
        ``args.pack_rows`` say."""
        return AnswerNLL(*answer_token_nll(model, batch, self.args.nll_impl, pack=self.pack_rows))

    def answer_nll(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample summed answer NLL ``S`` ``[B]`` and answer-token count ``T`` ``[B]``."""
        nll = self.answer_token_nll(model, batch)
        return nll.summed, nll.counts

    def answer_mean_nll(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Mean NLL over all answer tokens of the batch, ``sum_i S_i / sum_i T_i``."""
        return self.token_mean(self.answer_token_nll(model, batch))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """Fine-tuning: the mean answer-token NLL of the batch."""
        loss = self.answer_mean_nll(model, inputs)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple:
        """Evaluation loss: mean answer-token NLL of a plain question-answer batch."""
        inputs = self._prepare_inputs(inputs)
        if "input_ids" not in inputs:
            raise ValueError(f"evaluation batches must be plain question-answer batches, got keys {list(inputs)}")
        add_tokens(model, mask_tokens(inputs))  # the cost record (a device value, read when the phase ends)
        with torch.no_grad():
            loss = self.answer_mean_nll(model, inputs)
        return loss.detach(), None, None

    def log_loss_terms(self, **terms: torch.Tensor | float) -> None:
        """Record named loss terms of this step (e.g. ``forget_loss``, ``retain_loss``) for the log.

        Tensors are kept (detached, on their device) and read when the log is written, so logging
        costs no device synchronisation per step.
        """
        for name, value in terms.items():
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self._last_terms[name] = value
            if self.model.training:
                self._loss_terms[name].append(value)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        # the cost record: every attention mask of the batch, summed on the device (read when the phase ends);
        # a reference model's passes count where they run (trainer.unlearn.base)
        add_tokens(model, mask_tokens(inputs), backward=True)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._unchecked_losses.append((self.state.global_step + 1, loss.detach(), dict(self._last_terms)))
        if len(self._unchecked_losses) >= MAX_UNCHECKED_LOSSES:
            self.check_finite_losses()
        return loss

    def check_finite_losses(self) -> list[tuple[int, torch.Tensor, dict[str, torch.Tensor | float]]]:
        """FloatingPointError naming the first step since the last check whose loss was not finite.

        Returns the ``(step, loss, loss terms)`` entries it checked (tensors still on the device), so
        that a caller wrapping it (``benchmarks/train_throughput.py``) sees every step's values.

        Called before every log, checkpoint and evaluation, at the end of ``train`` and every
        ``MAX_UNCHECKED_LOSSES`` micro-steps: one read from the device for all the steps in between,
        instead of a synchronisation per step. A non-finite step is therefore reported up to
        ``logging_steps`` steps (at most ``MAX_UNCHECKED_LOSSES`` micro-steps) late, but always before
        a log, checkpoint or evaluation shows the model after it.
        """
        pending, self._unchecked_losses = self._unchecked_losses, []
        if not pending:
            return pending
        finite = torch.stack([torch.isfinite(loss).all() for _, loss, _ in pending]).tolist()
        if all(finite):
            return pending
        step, loss, terms = pending[finite.index(False)]
        described = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) or "no terms logged"
        raise FloatingPointError(
            f"non-finite loss ({float(loss)}) at step {step} ({described}); "
            "lower trainer.args.learning_rate, or check the data (a sample without answer tokens makes "
            "per-sample mean NLLs 0/0)"
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.check_finite_losses()
        if "loss" in logs and self._loss_terms:
            logs.update(self._mean_loss_terms())
            self._loss_terms.clear()
        super().log(logs, start_time)

    def _mean_loss_terms(self) -> dict[str, float]:
        """Each recorded term's mean over the logging window and over every process.

        The Trainer's ``loss`` is the mean over all processes; the terms are averaged the same way, so
        that the logged terms add up to the logged loss (a rank's own terms would describe its share of
        the data only). Every process must have logged the same term names (checked: a method that
        logs a term on some ranks only would otherwise make the processes exchange mismatched data).
        """
        names = sorted(self._loss_terms)
        device = self.args.device
        means = torch.stack([
            torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in self._loss_terms[n]]).mean()
            for n in names])
        if self.accelerator.num_processes > 1:
            every_rank: list = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(every_rank, names)
            if any(other != names for other in every_rank):
                raise RuntimeError(f"the processes logged different loss terms: {every_rank}; log_loss_terms must "
                                   "record the same names on every rank")
            means = self.accelerator.reduce(means, reduction="mean")
        return dict(zip(names, means.tolist()))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; resuming also restores the method's own state (``method_state``)."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(self.args.output_dir)
            state_file = os.path.join(str(path), METHOD_STATE_FILE)
            if os.path.isfile(state_file):
                with open(state_file, encoding="utf-8") as f:
                    self.load_method_state(json.load(f))
            if self.args.should_save:
                self._drop_history_after(_checkpoint_step(str(path)))
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._unchecked_losses.clear()
            raise
        self.check_finite_losses()
        return output

    def method_state(self) -> dict[str, Any]:
        """What the method keeps beyond the model, optimizer, schedule, RNG and trainer state (all of which
        the Trainer checkpoints), as JSON-able values: saved in every checkpoint (``method_state.json``)
        and given back to ``load_method_state`` when a run resumes. None here; PDU keeps its multiplier."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what ``method_state`` returned (called before a resumed run's first step)."""

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self.check_finite_losses()
        super()._save_checkpoint(model, trial)
        state = self.method_state()
        if state and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_json_atomic(Path(folder) / METHOD_STATE_FILE, state, indent=None)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluation loss on ``data.eval`` (if given) plus every configured evaluator."""
        self.check_finite_losses()
        metrics: dict[str, float] = {}
        ran_loss_evaluation = eval_dataset is not None or self.eval_dataset is not None
        if ran_loss_evaluation:
            with Phase(f"evaluation:{metric_key_prefix}_loss@step{self.state.global_step}", "evaluation"):
                metrics.update(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix))
        if self.evaluators:
            metrics.update(self._run_evaluators(metric_key_prefix))
        if not ran_loss_evaluation:
            # Trainer.evaluate tells the callbacks; without it they must be told here, or
            # `should_evaluate` stays set and the Trainer evaluates the same step again at the epoch end.
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _run_evaluators(self, metric_key_prefix: str) -> dict[str, float]:
        """Every evaluator on the current model, saved into ``<output_dir>/checkpoint-<step>/evals`` and kept in
        memory by step (``evaluations``); logs and returns their numeric summary values as
        ``<prefix>_<evaluator>_<metric>`` and appends each summary to ``eval_history.jsonl``."""
        step = self.state.global_step
        results = self._evaluate_benchmarks(os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}",
                                                         RESULT_EVALS_DIR), f"@step{step}")
        # kept: this evaluation and the best so far (one of the two is the best after this one), nothing older
        self.evaluations = {s: r for s, r in self.evaluations.items() if s == self.state.best_global_step}
        self.evaluations[step] = results
        if self.args.should_save:
            for name, result in results.items():
                self._append_history({"step": step, "epoch": self.state.epoch, "evaluator": name,
                                      "name": self.evaluators[name].name, "summary": result.summary})
        return self._log_summaries(metric_key_prefix, results)

    def _evaluate_benchmarks(self, out_dir: str, phase_suffix: str = "") -> dict[str, EvalResult]:
        """Every evaluator's result on the current model (in evaluation mode), each saved into ``out_dir`` with
        its cost (``_meta.compute``: the phase ``evaluation:<NAME><phase_suffix>``)."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        model_id = f"{self.args.output_dir}@step{self.state.global_step}"
        results: dict[str, EvalResult] = {}
        try:
            for name, evaluator in self.evaluators.items():
                with Phase(f"evaluation:{evaluator.name}{phase_suffix}", "evaluation") as measured:
                    result = evaluator.evaluate(model, output_dir=out_dir, model_id=model_id, save=False)
                results[name] = result.with_compute([measured.record])
                if is_main_process():
                    results[name].save(out_dir)
            return results
        finally:
            model.train(was_training)

    def _log_summaries(self, prefix: str, results: Mapping[str, EvalResult]) -> dict[str, float]:
        metrics = {f"{prefix}_{name}_{key}": float(value) for name, result in results.items()
                   for key, value in result.summary.items() if value is not None}
        if metrics:
            self.log(dict(metrics))  # a copy: Trainer.log adds "epoch" to the dict it is given
        return metrics

    # ----- evaluation history, best checkpoint, the result's evaluation -----------------------------
    def _append_history(self, entry: dict[str, Any]) -> None:
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, EVAL_HISTORY_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def _drop_history_after(self, step: int) -> None:
        """A resumed run evaluates the steps after its checkpoint again: their old lines go."""
        path = os.path.join(self.args.output_dir, EVAL_HISTORY_FILE)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(Path(path), "".join(kept))

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """transformers' choice of the best evaluation, restricted to those passing ``best_model_constraint``;
        an evaluation without the metric (a summary value that could not be computed) is not a candidate."""
        if self.args.metric_for_best_model is None:  # transformers asks after every evaluation
            return False
        constraint = self.best_model_constraint
        if constraint is not None and not constraint.holds(metrics):
            log.info("step %d: %s=%s fails the best-checkpoint constraint %s: not a candidate", self.state.global_step,
                     constraint.key, metrics.get(constraint.key), constraint)
            return False
        if self.args.metric_for_best_model not in metrics:
            log.warning("step %d: no %s in this evaluation (not computed): not a best-checkpoint candidate",
                        self.state.global_step, self.args.metric_for_best_model)
            return False
        return super()._determine_best_metric(metrics, trial)

    def best_checkpoint_record(self) -> dict[str, Any] | None:
        """What ``best_checkpoint.json`` says after training (None without ``metric_for_best_model``): the
        metric, its direction, the constraint, the best step and value (null when no evaluation qualified),
        and whether that checkpoint is the run's result (``load_best_model_at_end``)."""
        if self.args.metric_for_best_model is None:
            return None
        best = self.state.best_model_checkpoint
        step = self.state.best_global_step if best else None
        return {"metric": self.args.metric_for_best_model, "greater_is_better": self.args.greater_is_better,
                "constraint": str(self.best_model_constraint) if self.best_model_constraint else None,
                "step": step, "value": self.state.best_metric if best else None,
                "checkpoint": os.path.basename(best) if best else None,
                "is_result": bool(best) and self.args.load_best_model_at_end}

    def evaluate_result(self, out_dir: str) -> dict[str, EvalResult]:
        """Evaluate the model the run ends with (the best checkpoint under ``load_best_model_at_end``) into
        ``out_dir``, logged as ``final_<evaluator>_<metric>``; returns the results. When that model was already
        evaluated (the best checkpoint, or an evaluation at the last step), that evaluation is saved again into
        ``out_dir`` instead of computed again (same weights, same numbers): from memory, or, for a checkpoint of
        the run this one resumed, from the checkpoint's folder."""
        record = self.best_checkpoint_record()
        if record and record["is_result"]:
            step, folder = record["step"], self.state.best_model_checkpoint
            which = f"the best checkpoint ({record['checkpoint']})"
        else:  # the last model: already evaluated if the last evaluation was at the last step
            step = self.state.global_step
            folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            which = f"the model of the last evaluation (step {step})"
        known, saved = self.evaluations.get(step), os.path.join(folder, RESULT_EVALS_DIR)
        if known is None and all(EvalResult.saved_in(saved, e.name) for e in self.evaluators.values()):
            known = {n: EvalResult.load(saved, e.name) for n, e in self.evaluators.items()}
        if known is not None and set(known) == set(self.evaluators):
            if self.args.should_save:
                for result in known.values():
                    result.save(out_dir)
            log.info("the result is %s: its evaluation saved to %s", which, out_dir)
            return known
        results = self._evaluate_benchmarks(out_dir)
        self._log_summaries("final", results)
        for callback in self.callback_handler.callbacks:  # training ended: its writer reopened for these scalars
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None
        return results


def _checkpoint_step(path: str) -> int:
    """The global step of a ``checkpoint-<step>`` folder (from its trainer state)."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])
