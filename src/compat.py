"""``compat``: reproduce another framework's numbers on demand (root config key; default ``null``).

``compat=open_unlearning`` makes data preparation, masks and metric conventions those of
locuslab/open-unlearning, so that its published numbers can be reproduced and compared key by key
(``benchmarks/vs_open_unlearning.py`` checks that they are). The default, ``null``, is our corrected
behaviour. docs/evaluation.md ("Differences from open-unlearning") says, for each switch below, which
behaviour is right and why, and its measured effect.

Each difference is a named field of ``Compat``; code reads the field, never the mode's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from checks import check_choice

COMPAT_MODES = ("open_unlearning",)


@dataclass(frozen=True)
class Compat:
    """The behaviours ``compat`` switches (all False: ours).

    Attributes:
        name: the mode (``None`` or ``"open_unlearning"``).
        labels_cover_chat_tail: a sample is the whole rendered chat tokenized at once, its labels every
            token after the prompt (the end-of-turn token and the template's trailing ``"\\n"``
            included) plus one more EOS when the rendering does not end with EOS; ours: the answer
            tokens tokenized alone plus one end-of-answer token.
        attention_mask_from_pad: the attention mask is ``input_ids != pad_token_id`` (which masks every
            in-prompt token equal to the pad id, such as SmolLM2's ``<|im_end|>``); ours: 1 on every
            real token.
        plain_passes: the evaluation runs the plain passes (dataset order, fixed batches,
            ``model.generate``) as open-unlearning batches, so greedy generations match token for token.
        extraction_strength_floor: extraction strength is at least 1/T (no matching suffix counts as
            the last token matching); ours: 0 when the last token is wrong.
        rouge_texts_from_tokens: ROUGE's ground truth is the decoded labels minus the decoded prompt
            and the ``input`` field is the decoded prompt (``clean_up_tokenization_spaces``), as
            open-unlearning derives them; ours: the dataset's answer and question strings.
        simnpo_delta_before_scaling: SimNPO's ``delta`` is subtracted before the scaling by beta,
            ``log sigmoid(beta * (A - delta))``, as open-unlearning's config value means it; ours (the
            paper's): ``log sigmoid(beta * A - delta)``.
        retain_partners_from_global_rng: each forget sample's retain partner is drawn when the item is read,
            with ``torch.randint`` on torch's global generator (``data.unlearn.ForgetRetainDataset``); ours:
            a pure function of (seed, epoch, index).
        float32_log_probs: teacher-forced log-probabilities in float32, as open-unlearning's cross-entropy
            (a mean answer NLL then differs from the exact value by up to ~1e-4); ours: float64.
        generation_stops_at_eos_only: a base model's generation is not cut at the tag closing an answer
            (``template_args.asst_end_tag``), only at EOS and the configured stop strings; ours cuts it.
    """

    name: str | None = None
    labels_cover_chat_tail: bool = False
    attention_mask_from_pad: bool = False
    plain_passes: bool = False
    extraction_strength_floor: bool = False
    rouge_texts_from_tokens: bool = False
    generation_stops_at_eos_only: bool = False
    float32_log_probs: bool = False
    simnpo_delta_before_scaling: bool = False
    retain_partners_from_global_rng: bool = False


OURS = Compat()
OPEN_UNLEARNING = Compat(name="open_unlearning", labels_cover_chat_tail=True, attention_mask_from_pad=True,
                         plain_passes=True, extraction_strength_floor=True, rouge_texts_from_tokens=True,
                         generation_stops_at_eos_only=True, float32_log_probs=True,
                         simnpo_delta_before_scaling=True, retain_partners_from_global_rng=True)


def get_compat(value: Any) -> Compat:
    """The ``Compat`` of a config value: ``None``/``"null"`` -> ours, ``"open_unlearning"``; else a BadValueError."""
    if isinstance(value, Compat):
        return value
    if value in ("null", "none", "None"):
        value = None
    check_choice("compat", value, COMPAT_MODES, allow_none=True)
    return OPEN_UNLEARNING if value == "open_unlearning" else OURS


def compat_of(root_cfg: Mapping | None) -> Compat:
    """The ``Compat`` of a run's config (its root ``compat`` key; absent = ours)."""
    return get_compat(root_cfg.get("compat") if root_cfg is not None else None)
