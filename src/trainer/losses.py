"""Loss functions of unlearning methods: functions of tensors.

The token means (``token_average``) take ``num_processes``: with more than one, the count is that of
every process together (one ``all_reduce``, so every process must call the loss; see ``token_average``).
The trainers pass ``FinetuneTrainer.token_mean_processes``.

Notation (per sample): ``NLL_t`` the negative log-likelihood of answer token t, ``S = sum_t NLL_t``,
``T`` the number of answer tokens (label != -100), ``A = S / T``; ``log pi(y|x) = -S``.
Logits are ``[B, L, V]`` and labels ``[B, L]`` in the usual causal layout (position i predicts token
i+1). Every function computes in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_average(total: torch.Tensor, count: torch.Tensor, num_processes: int = 1) -> torch.Tensor:
    """``total / count`` (``count`` at least 1): a sum over a batch's tokens divided by their number.

    Every token-mean loss term goes through it. Data-parallel training averages the gradients of the
    processes; a per-process mean ``S_r / T_r`` would then give ``mean_r (S_r / T_r)``, which is not the
    ``sum_r S_r / sum_r T_r`` one process computes from the same rows (the processes' answers differ in
    length). With ``num_processes > 1`` (a training step on several processes) the count is the global
    ``T = sum_r T_r`` (one ``all_reduce``) and the result is scaled by ``num_processes``, which undoes the
    gradient averaging: each process contributes ``num_processes * S_r / T``, and the averaged gradient
    is exactly the one-process one. Without a process group the count stays local.
    """
    count = count.detach().float()
    if num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.clone()
        torch.distributed.all_reduce(count)
        return total * num_processes / count.clamp(min=1)
    return total / count.clamp(min=1)


def per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every predicted token ``[B, L-1]`` (0 where masked) and the answer-token mask ``[B, L-1]``."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    return nll, shift_labels != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed answer NLL ``S`` ``[B]`` and answer-token count ``T`` ``[B]``."""
    nll, mask = per_token_nll(logits, labels)
    return nll.sum(dim=-1), mask.sum(dim=-1)


def per_sample_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``A = S / T`` ``[B]`` from summed NLLs and token counts.

    A sample without answer tokens (``T = 0``, so ``S = 0``) gets NaN: its mean is undefined, and the
    trainers' loss check (``FinetuneTrainer.check_finite_losses``) stops training with an error naming
    this cause. There is no check here because it would read ``count`` back from the GPU every step.
    """
    return total / count


def token_mean(total: torch.Tensor, count: torch.Tensor, num_processes: int = 1) -> torch.Tensor:
    """``sum_i S_i / sum_i T_i``: the mean NLL over all answer tokens of the batch (``token_average``)."""
    return token_average(total.sum(), count.sum(), num_processes)


def answer_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, num_processes: int = 1) -> torch.Tensor:
    """``KL(p_ref || p_model)`` of the next-token distributions, averaged over answer tokens.

    ``sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` at each answer position; prompt and padding
    positions are excluded (some published code averages over them too, diluting the term).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)[mask]
    ref_logp = F.log_softmax(ref_logits[:, :-1, :].float(), dim=-1)[mask]
    kl = F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(dim=-1)
    return token_average(kl.sum(), mask.sum(), num_processes)


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868), eq. 3.

    ``L = -(2/beta) mean_i log sigmoid(-beta log(pi(y_i|x_i) / pi_ref(y_i|x_i)))`` with the sequence
    log-ratio ``log pi - log pi_ref = S_ref - S``, i.e. ``L = -(2/beta) mean log sigmoid(beta (S - S_ref))``.
    ``nll`` and ``ref_nll`` are per-sample summed NLLs ``S`` ``[B]``.
    """
    if beta <= 0:
        raise ValueError(f"NPO beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll)).mean()


def simnpo_loss(mean_nll: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, "Simplicity Prevails", arXiv:2410.07163), the forget loss.

    Reference-free and length-normalised NPO:
    ``L = -(2/beta) mean_i log sigmoid(-(beta/|y_i|) log pi(y_i|x_i) - delta)``; with
    ``log pi = -S`` and ``A = S / T`` this is ``L = -(2/beta) mean_i log sigmoid(beta A_i - delta)``.
    The paper calls the reward margin ``gamma``; here it is ``delta`` (``gamma`` is the forget-term weight).
    ``mean_nll`` is the per-sample length-normalised NLL ``A`` ``[B]`` (``per_sample_mean(S, T)``).
    """
    if beta <= 0:
        raise ValueError(f"SimNPO beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(beta * mean_nll - delta).mean()


def dpo_loss(nll_w: torch.Tensor, ref_nll_w: torch.Tensor, nll_l: torch.Tensor, ref_nll_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) with TOFU's ``2/beta`` scale (Maini et al. 2024).

    ``L = -(2/beta) mean_i log sigmoid(beta [log(pi(y_w)/pi_ref(y_w)) - log(pi(y_l)/pi_ref(y_l))])`` where
    ``log pi(y)/pi_ref(y) = S_ref(y) - S(y)``, i.e.
    ``L = -(2/beta) mean log sigmoid(beta [(S_ref(y_w) - S(y_w)) - (S_ref(y_l) - S(y_l))])``.
    ``y_w`` is the preferred answer, ``y_l`` the rejected one (in unlearning: the forget answer); all
    inputs are per-sample summed NLLs ``S`` ``[B]``. The DPO paper has no ``2/beta`` factor: TOFU's
    IdkDPO adds it (as NPO does) so the loss stays comparable across ``beta``; at ``pi = pi_ref`` it is
    ``(2/beta) ln 2``.
    """
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    margin = (ref_nll_w - nll_w) - (ref_nll_l - nll_l)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def wga_weights(p: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA token weights (Wang et al. 2025, "Rethinking LLM Unlearning Objectives", arXiv:2502.19301).

    ``w_t = p_t^beta`` with ``p_t`` the (detached) probability of answer token t: tokens the model
    already finds unlikely get small weights, which curbs the excessive unlearning of plain GA.
    """
    return p**beta


def satimp_weights(p: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp token weights (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
    Unlearning", arXiv:2505.11953, Sec. 5): ``w_t = p_t^beta1 (1 - p_t)^beta2``.

    ``p_t^beta1`` is the saturation part (down-weights tokens already unlearned), ``(1 - p_t)^beta2``
    the importance part (down-weights tokens the model is sure of). ``p_t`` is detached.
    """
    return p**beta1 * (1.0 - p) ** beta2


def token_weighted_ascent(nll: torch.Tensor, mask: torch.Tensor, weights, num_processes: int = 1) -> torch.Tensor:
    """Token-weighted gradient ascent: ``-sum_t w_t NLL_t / sum_t 1`` over the batch's answer tokens.

    ``nll`` and ``mask`` are per-token NLLs and the answer mask (``per_token_nll``); ``weights`` maps
    the detached answer-token probabilities ``p_t = exp(-NLL_t)`` to the weights ``w_t`` (e.g.
    ``lambda p: wga_weights(p, 1.0)``); the weights get no gradient. The mean runs over all answer
    tokens of the batch, like gradient ascent's ``-token_mean(S, T)``, so ``w_t = 1`` gives exactly that
    (WGA and SatImp define the per-token objective; this is the normalisation of their TOFU experiments).
    """
    with torch.no_grad():
        w = weights(torch.exp(-nll))
    # torch.where, not boolean indexing: a mask index makes the host wait for the device (a sync per step)
    return -token_average(torch.where(mask, w * nll, 0.0).sum(), mask.sum(), num_processes)


def logit_margin_flattening_loss(logits: torch.Tensor, labels: torch.Tensor, num_processes: int = 1) -> torch.Tensor:
    """Logit-margin flattening (Entesari et al. 2025, "Constrained Entropic Unlearning", arXiv:2506.05314).

    ``L = mean_t (max_v z_t(v) - (1/V) sum_v z_t(v))^2`` over the positions that predict an answer
    token (``z_t`` the logits there): zero exactly when the next-token distribution is uniform, and
    softmax-free. Prompt and padding positions are excluded (some published code averages over every
    position of the sequence).
    """
    z = logits[:, :-1, :].float()
    mask = labels[:, 1:] != IGNORE_INDEX
    margin = z.max(dim=-1).values - z.mean(dim=-1)
    return token_average(torch.where(mask, margin**2, 0.0).sum(), mask.sum(), num_processes)


def lagrangian_loss(forget_loss: torch.Tensor, retain_loss: torch.Tensor, dual: float | torch.Tensor,
                    retain_loss_eps: float) -> torch.Tensor:
    """Lagrangian of ``min L_forget s.t. L_retain <= eps``: ``L_forget + lambda (L_retain - eps)``.

    Entesari et al. 2025 (arXiv:2506.05314); ``dual`` is the multiplier ``lambda >= 0`` (a number or a
    0-dim tensor without gradient, not a trained parameter; a tensor is not checked here, since reading
    it would make the host wait for the device: ``PDU.dual_step`` keeps it >= 0).
    """
    if not isinstance(dual, torch.Tensor) and dual < 0:
        raise ValueError(f"the dual variable must be >= 0, got {dual}")
    return forget_loss + dual * (retain_loss - retain_loss_eps)


def masked_token_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, num_processes: int = 1) -> torch.Tensor:
    """Mean over the tokens selected by ``mask`` of the per-token mean squared error to ``target``.

    ``mean_{t in mask} (1/d) ||hidden_t - target_t||^2`` with ``hidden`` ``[B, L, d]``, ``target``
    broadcastable to it (a ``[d]`` vector such as RMU's ``c * u``, or ``[B, L, d]`` frozen activations)
    and ``mask`` ``[B, L]`` (bool or 0/1). The forget and retain terms of RMU (Li et al. 2024,
    "The WMDP Benchmark", arXiv:2403.03218, eqs. 1-2), with the squared norm divided by the hidden size
    ``d`` as in the hyperparameters the paper reports (``alpha``, ``c``).
    """
    mask = mask.bool()
    per_token = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    return token_average(per_token[mask].sum(), mask.sum(), num_processes)


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float, num_processes: int = 1) -> torch.Tensor:
    """UNDIAL (Dong et al. 2025, "UNDIAL: Self-Distillation with Adjusted Logits...", arXiv:2402.10052).

    Target at each answer position: ``q = softmax(z_ref - beta * onehot(y_t))``, the reference model's
    logits with the true next token's logit lowered by ``beta``. Loss: the cross-entropy
    ``H(q, p_model) = -sum_v q(v) log p_model(v)`` averaged over the answer tokens of the batch (it is
    ``KL(q || p_model)`` plus the constant ``H(q)``: same gradient). Prompt and padding positions are
    excluded (the published code averages over them too).
    """
    if beta < 0:
        raise ValueError(f"UNDIAL beta must be >= 0, got {beta}")
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)[mask]
    target_logits = ref_logits[:, :-1, :].float()[mask].detach()
    target_logits = target_logits - beta * F.one_hot(labels[:, 1:][mask], target_logits.size(-1)).float()
    q = F.softmax(target_logits, dim=-1)
    return -token_average((q * logp).sum(dim=-1).sum(), mask.sum(), num_processes)


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_first_n_answer_tokens: int = 0, num_processes: int = 1) -> torch.Tensor:
    """CE-U (Yang 2025, "CE-U: Cross Entropy Unlearning", arXiv:2503.01224).

    At each answer position the target is the model's own next-token distribution, detached, with the
    true token removed: ``q = softmax(stopgrad(z) with z_y = -inf)``, i.e. ``q(v) = p(v) / (1 - p(y))``
    for ``v != y`` and ``q(y) = 0``. Loss: ``H(q, p) = -sum_v q(v) log p(v)`` averaged over the answer
    tokens, skipping the first ``ignore_first_n_answer_tokens`` answer tokens of each sample. The gradient
    on the logits is ``p - q``: the true token's probability goes down, the others keep their ratios.
    """
    if ignore_first_n_answer_tokens < 0:
        raise ValueError(f"ignore_first_n_answer_tokens must be >= 0, got {ignore_first_n_answer_tokens}")
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    mask = mask & (mask.cumsum(dim=-1) > ignore_first_n_answer_tokens)
    z = logits[:, :-1, :].float()[mask]
    target = shift_labels[mask]
    target_logits = z.detach().clone()
    target_logits[torch.arange(target.numel(), device=z.device), target] = float("-inf")
    q = F.softmax(target_logits, dim=-1)
    logp = F.log_softmax(z, dim=-1)
    return -token_average((q * logp).sum(dim=-1).sum(), mask.sum(), num_processes)
