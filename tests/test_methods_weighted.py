"""SatImp, WGA, PDU and TaskVector: hand-computed losses, dual updates, task-vector arithmetic, end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO, StubLM, make_batch, run_cli
from data.collators import layout_of
from data.unlearn import ForgetRetainDataset
from model import get_model
from trainer import load_trainer
from trainer.losses import sequence_nll, token_mean
from trainer.unlearn.pdu import PDU

LN = math.log


# forget: token 2 after 0 (p = 1/2, NLL ln 2) and token 3 after 1 (uniform row: p = 1/5, NLL ln 5)
FORGET = make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, 3]])
# retain: NLLs ln 8 (token 1 after 0) and ln 5 -> token-mean retain NLL ln(40)/2
RETAIN = make_batch([[0, 1], [1, 1]], [[-100, 1], [-100, 1]])
INPUTS = {"forget": FORGET, "retain": RETAIN}


def make(handler, tmp_path, retain=True, model=None, **method_args):
    dataset = ForgetRetainDataset([0, 1], [0, 1] if retain else None)
    cfg = {"handler": handler, "method_args": method_args,
           "args": {"per_device_train_batch_size": 2, "report_to": "none"}}
    return load_trainer(cfg, model or StubLM(), train_dataset=dataset, output_dir=str(tmp_path / "out"))


# ----- hand values on the stub ----------------------------------------------------------------------
@pytest.mark.parametrize("handler, method_args, expected", [
    # WGA, beta 1: w = p = [1/2, 1/5] -> forget = -(ln2/2 + ln5/5)/2; retain NLL ln(40)/2 with alpha 1
    ("WGA", {"beta": 1.0}, -(LN(2) / 2 + LN(5) / 5) / 2 + LN(40) / 2),
    # WGA, beta 2, gamma 2, alpha 0.5: w = [1/4, 1/25] -> 2 * -(ln2/4 + ln5/25)/2 + 0.5 ln(40)/2
    ("WGA", {"beta": 2.0, "gamma": 2.0, "alpha": 0.5}, -(LN(2) / 4 + LN(5) / 25) + 0.5 * LN(40) / 2),
    # WGA, beta 0: every weight 1 -> GradDiff: -ln(10)/2 + ln(40)/2
    ("WGA", {"beta": 0.0}, -LN(10) / 2 + LN(40) / 2),
    # SatImp defaults (beta1 5, beta2 1, alpha 0.1): w = p^5 (1-p) = [(1/2)^5 (1/2), (1/5)^5 (4/5)]
    #   = [1/64, 4/15625] -> forget = -(ln2/64 + 4 ln5/15625)/2; + 0.1 ln(40)/2
    ("SatImp", {}, -(LN(2) / 64 + 4 * LN(5) / 15625) / 2 + 0.1 * LN(40) / 2),
    # SatImp beta1 1, beta2 2: w = p (1-p)^2 = [1/8, 16/125]
    ("SatImp", {"beta1": 1.0, "beta2": 2.0, "alpha": 1.0}, -(LN(2) / 8 + 16 * LN(5) / 125) / 2 + LN(40) / 2),
    # WGA with KL retain: the model equals its reference, KL = 0
    ("WGA", {"beta": 1.0, "retain_loss_type": "KL"}, -(LN(2) / 2 + LN(5) / 5) / 2),
])
def test_weighted_loss_by_hand(tmp_path, handler, method_args, expected):
    t = make(handler, tmp_path, **method_args)
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(expected, abs=1e-6)


def test_weights_are_detached(tmp_path):
    # WGA beta 1, forget term only: L = -(w1 NLL1 + w2 NLL2)/2 with w constant. In row 0 (token 0),
    # dNLL1/dlogit(2) = p(2) - 1 = -1/2, so dL/dtable[0,2] = -(1/2)(1/2)(-1/2) = 1/8. Were w = p not
    # detached, d(p NLL)/dlogit(2) = p(1-p)(NLL - 1) = (ln2 - 1)/4 and the gradient would be (1 - ln2)/8.
    t = make("WGA", tmp_path, beta=1.0)
    loss = t.forget_loss(t.answer_token_nll(t.model, FORGET))
    loss.backward()
    assert t.model.table.grad[0, 2].item() == pytest.approx(1 / 8, abs=1e-6)
    # and the uniform row 1 (token 3 after 1, w = 1/5): dL/dtable[1,3] = -(1/2)(1/5)(1/5 - 1) = 2/25
    assert t.model.table.grad[1, 3].item() == pytest.approx(2 / 25, abs=1e-6)


def test_pdu_lagrangian_by_hand(tmp_path):
    # Forget (logit-margin flattening) at the two answer positions: row 0 = [0, 0, ln4, 0, 0]: max ln4,
    # mean ln4/5 -> margin (4/5) ln4, squared (16/25) ln4^2; row 1 uniform -> 0. Mean (8/25) ln4^2.
    # Retain NLL ln(40)/2; lambda = dual_init = 1; eps 0.5 -> L = (8/25) ln4^2 + (ln(40)/2 - 0.5).
    t = make("PDU", tmp_path, retain_loss_eps=0.5)
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(8 / 25 * LN(4) ** 2 + LN(40) / 2 - 0.5, abs=1e-6)
    # gamma 2, lambda 3, eps 1: 2 (8/25) ln4^2 + 3 (ln(40)/2 - 1)
    t = make("PDU", tmp_path, retain_loss_eps=1.0, dual_init=3.0, gamma=2.0)
    expected = 16 / 25 * LN(4) ** 2 + 3 * (LN(40) / 2 - 1)
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(expected, abs=1e-6)


def _events(t, event, epoch):
    """Fire a trainer event at PDU's registered dual-ascent callback, as the training loop does."""
    t.state.epoch = epoch
    callbacks = [c for c in t.callback_handler.callbacks if type(c).__name__ == "_DualAscent"]
    assert len(callbacks) == 1
    getattr(callbacks[0], event)(t.args, t.state, t.control)


def test_pdu_dual_updates_each_step(tmp_path):
    t = make("PDU", tmp_path, retain_loss_eps=1.0, dual_step_size=0.5, dual_init=1.0)
    t.model.train()
    v = LN(40) / 2 - 1.0  # retain NLL - eps = 0.8444
    _events(t, "on_epoch_begin", 0.0)
    t.compute_loss(t.model, INPUTS)
    t.compute_loss(t.model, INPUTS)  # two micro-batches (gradient accumulation), one optimizer step
    _events(t, "on_step_end", 0.5)
    assert t.dual == pytest.approx(1.0 + 0.5 * v)  # 1.4222
    # The next loss uses the new lambda: (8/25) ln4^2 + 1.4222 v
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(8 / 25 * LN(4) ** 2 + (1 + 0.5 * v) * v, abs=1e-6)
    _events(t, "on_step_end", 1.0)
    assert t.dual == pytest.approx(1.0 + v)  # 1 + 2 x 0.5 v
    t.retain_loss_eps = 10.0  # violation ln(40)/2 - 10 = -8.156: lambda would go to 1.844 - 4.078 < 0
    t.compute_loss(t.model, INPUTS)
    _events(t, "on_step_end", 1.5)
    assert t.dual == 0.0
    t.compute_loss(t.model, INPUTS)
    _events(t, "on_step_end", 2.0)
    assert t.dual == 0.0  # projected: never below 0
    _events(t, "on_step_end", 2.5)  # no batch since the last update: no change
    assert t.dual == 0.0
    # logged terms: lambda used in the step and the constraint violation
    t.log({"loss": 0.0})
    entry = t.state.log_history[-1]
    assert entry["dual_variable"] >= 0 and "constraint_violation" in entry


def test_pdu_dual_updates_each_epoch_after_warmup(tmp_path):
    t = make("PDU", tmp_path, retain_loss_eps=1.0, dual_step_size=0.5, dual_update="epoch", dual_warmup_epochs=1)
    t.model.train()
    _events(t, "on_epoch_begin", 0.0)  # epoch 0: warm-up, no dual update
    for _ in range(3):
        t.compute_loss(t.model, INPUTS)
        _events(t, "on_step_end", 0.3)
    assert t.dual == 1.0  # epoch mode: nothing after steps
    _events(t, "on_epoch_end", 1.0)
    assert t.dual == 1.0 and t.violations == []  # warm-up epoch discarded
    _events(t, "on_epoch_begin", 1.0)
    t.compute_loss(t.model, INPUTS)  # violation ln(40)/2 - 1 = 0.8444
    t.retain_loss_eps = 3.0
    t.compute_loss(t.model, INPUTS)  # violation ln(40)/2 - 3 = -1.1556
    _events(t, "on_epoch_end", 2.0)
    # mean violation over the epoch: (0.8444 - 1.1556)/2 = ln(40)/2 - 2 = -0.1556 -> lambda = 1 - 0.0778
    assert t.dual == pytest.approx(1.0 + 0.5 * (LN(40) / 2 - 2.0))
    t.model.eval()  # evaluation batches never move lambda
    t.compute_loss(t.model, INPUTS)
    assert t.violations == []


def test_pdu_dual_step_is_projected():
    assert PDU.dual_step(1.0, 0.5, 2.0) == 2.0
    assert PDU.dual_step(1.0, -0.3, 2.0) == pytest.approx(0.4)
    assert PDU.dual_step(0.2, -1.0, 1.0) == 0.0


@pytest.mark.parametrize("method_args, message", [
    ({}, "trainer.method_args.retain_loss_eps"),
    ({"retain_loss_eps": None}, "trainer.method_args.retain_loss_eps"),
    ({"retain_loss_eps": -0.1}, "retain_loss_eps=-0.1"),
    ({"retain_loss_eps": 0.1, "dual_update": "batch"}, "dual_update='batch'; valid: step, epoch"),
    ({"retain_loss_eps": 0.1, "dual_init": -1.0}, "dual_init=-1.0"),
    ({"retain_loss_eps": 0.1, "dual_step_size": -1.0}, "dual_step_size=-1.0"),
    ({"retain_loss_eps": 0.1, "dual_warmup_epochs": 0.5}, "dual_warmup_epochs=0.5"),
])
def test_pdu_bad_args(tmp_path, method_args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make("PDU", tmp_path, **method_args)


@pytest.mark.parametrize("handler, method_args, message", [
    ("WGA", {"beta": -1.0}, "WGA: trainer.method_args.beta=-1.0; must be a finite number >= 0"),
    ("SatImp", {"beta1": -1.0}, "SatImp: trainer.method_args.beta1=-1.0; must be a finite number >= 0"),
    ("SatImp", {"retain_loss_type": "MSE"}, "'MSE'; valid: NLL, KL"),
    ("TaskVector", {"scale": 0.0}, "scale=0.0"),
])
def test_bad_method_args(tmp_path, handler, method_args, message):
    with pytest.raises(ValueError, match=message):
        make(handler, tmp_path, retain=handler != "TaskVector", **method_args)


def test_task_vector_arithmetic_on_the_stub(tmp_path):
    t = make("TaskVector", tmp_path, retain=False, scale=2.0)
    # plain NLL on the forget set: ln(10)/2
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(LN(10) / 2, abs=1e-6)
    target = {"table": t.model.table.detach().clone()}
    finetuned = target["table"].clone()
    finetuned[0, 2] += 3.0
    finetuned[1, 3] -= 4.0
    with torch.no_grad():
        t.model.table.copy_(finetuned)
    norm = t.negate_task_vector(target)
    assert norm == pytest.approx(5.0)  # ||(3, -4)||
    # theta = target - 2 (ft - target): entry [0,2] = ln4 - 6, entry [1,3] = 0 + 8, others unchanged
    expected = target["table"].clone()
    expected[0, 2] = LN(4) - 6.0
    expected[1, 3] = 8.0
    assert torch.allclose(t.model.table, expected)
    assert t.state.log_history[-1]["task_vector_norm"] == pytest.approx(5.0)


# ----- reference model ------------------------------------------------------------------------------
def test_reference_model_only_when_needed(tmp_path):
    for handler, args in [("WGA", {}), ("SatImp", {}), ("PDU", {"retain_loss_eps": 0.1})]:
        assert make(handler, tmp_path, **args).ref_model is None, handler
        t = make(handler, tmp_path, retain_loss_type="KL", **args)
        assert t.ref_model is not None and t.ref_model is not t.model, handler
        assert not any(p.requires_grad for p in t.ref_model.parameters())
    assert make("TaskVector", tmp_path, retain=False).ref_model is None


# ----- tiny-random-llama: gradient sign and the task vector ---------------------------------------------
def _tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    return get_model(cfg)


@pytest.fixture(scope="module")
def memorised():
    """A confident tiny-random-llama (final norm x 13 sharpens every next-token distribution) and forget
    answers it knows: its own greedy continuations of two random prompts (answer-token p about 0.4-0.8)."""
    model, tok = _tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.norm.weight.mul_(13.0)
        ids = torch.randint(0, 5000, (2, 5), generator=g)
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    labels = ids.clone()
    labels[:, :5] = -100  # 5 prompt tokens, 5 answer tokens
    forget = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "layout": layout_of(labels)}
    rids = torch.randint(0, 5000, (2, 10), generator=g)
    rlabels = rids.clone()
    rlabels[:, :5] = -100
    retain = {"input_ids": rids, "attention_mask": torch.ones_like(rids), "labels": rlabels, "layout": layout_of(rlabels)}
    assert _forget_nll(model, forget) < 1.0
    return model, tok, {"forget": forget, "retain": retain}


def _forget_nll(model, batch):
    with torch.no_grad():
        return token_mean(*sequence_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])).item()


@pytest.mark.parametrize("handler, method_args", [
    ("WGA", {"alpha": 0.0}), ("SatImp", {"alpha": 0.0}), ("PDU", {"retain_loss_eps": 100.0, "dual_init": 0.0}),
])
def test_one_sgd_step_lowers_forget_answer_probability(tmp_path, memorised, handler, method_args):
    base, _, inputs = memorised
    model = copy.deepcopy(base)
    t = make(handler, tmp_path, model=model, **method_args)
    before = _forget_nll(model, inputs["forget"])
    loss = t.compute_loss(model, inputs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert _forget_nll(model, inputs["forget"]) > before + 1e-4


def test_task_vector_negation_raises_forget_nll(tmp_path):
    """Fine-tune on forget in the training loop, negate: the forget NLL goes up from the target's."""
    model, tok = _tiny()
    from data.collators import DataCollatorForSupervisedDataset

    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(4):
        ids = torch.randint(0, 5000, (10,), generator=g)
        labels = ids.clone()
        labels[:5] = -100
        items.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    batch = DataCollatorForSupervisedDataset(tok)(items)
    cfg = {"handler": "TaskVector", "method_args": {"scale": 1.0},
           "args": {"per_device_train_batch_size": 4, "max_steps": 5, "learning_rate": 1e-2, "warmup_steps": 0,
                    "logging_steps": 1, "report_to": "none", "disable_tqdm": True, "save_strategy": "no"}}
    t = load_trainer(cfg, model, train_dataset=ForgetRetainDataset(items), data_collator=DataCollatorForSupervisedDataset(tok),
                     output_dir=str(tmp_path / "out"))
    target = {n: p.detach().clone() for n, p in model.named_parameters()}
    target_nll = _forget_nll(model, batch)
    t.train()
    negated_nll = _forget_nll(model, batch)
    # the fine-tuned weights, recovered from theta = 2 target - ft
    finetuned = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in finetuned.named_parameters():
            p.copy_(2 * target[n] - p)
    assert _forget_nll(finetuned, batch) < target_nll - 0.5  # fine-tuning learned the forget answers
    assert negated_nll > target_nll + 0.1  # negation unlearns them (10.8 -> 11.2 here; ft: 10.8 -> ~8)
    # tied embeddings / LM head: negated once, not twice
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb
    assert not torch.equal(emb, target["model.embed_tokens.weight"])
    norm = [e["task_vector_norm"] for e in t.state.log_history if "task_vector_norm" in e]
    emb_tau = (target["model.embed_tokens.weight"] - emb).norm().item()  # tau = target - negated (scale 1)
    assert len(norm) == 1 and norm[0] >= emb_tau > 0


# ----- end to end through src/train.py ------------------------------------------------------------------
FAST = ["trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true",
        "data.eval=null"]


def _run(tofu_dir, tmp_path, args, flags=()):
    result = run_cli(["src/train.py", "--config-name=unlearn.yaml", *flags, "model=tiny-random-llama",
                      "data.forget=TOFU_QA_FORGET10", f"paths.tofu={tofu_dir}", f"paths.log_dir={tmp_path / 'logs'}",
                      *FAST, *args])
    assert result.returncode == 0, result.stderr[-4000:]


def _steps(out, terms):
    for name in ("model.safetensors", "config.json", "train_log.jsonl"):
        assert (out / name).is_file(), f"{out}: {name}"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for term in terms:
        assert all(term in e for e in steps), term
    return log, steps


@pytest.mark.slow  # ~12 s: three runs (make test-slow)
def test_end_to_end_satimp_wga_task_vector(tofu_dir, tmp_path):
    # One process, three runs (Hydra multirun): the interpreter start-up dominates a 2-step run.
    _run(tofu_dir, tmp_path, ["trainer=SatImp,WGA,TaskVector", "data.retain=TOFU_QA_RETAIN90",
                              f"paths.output_dir={tmp_path}/${{trainer.handler}}"], flags=["--multirun"])
    _steps(tmp_path / "SatImp", ["forget_loss", "retain_loss"])
    _steps(tmp_path / "WGA", ["forget_loss", "retain_loss"])
    log, _ = _steps(tmp_path / "TaskVector", ["forget_loss"])  # TaskVector ignores the retain set
    assert sum(e.get("task_vector_norm", 0) > 0 for e in log) == 1


@pytest.mark.slow  # ~10 s: a PDU run (make test-slow)
def test_end_to_end_pdu(tofu_dir, tmp_path):
    out = tmp_path / "pdu"
    _run(tofu_dir, tmp_path, ["trainer=PDU", "trainer.method_args.retain_loss_eps=2.0",
                              "trainer.method_args.dual_step_size=0.1", f"paths.output_dir={out}"])
    _, (first, second) = _steps(out, ["forget_loss", "retain_loss", "dual_variable", "constraint_violation"])
    assert first["dual_variable"] == 1.0  # dual_init
    # lambda_2 = max(0, lambda_1 + 0.1 (L_retain,1 - eps))
    assert second["dual_variable"] == pytest.approx(max(0.0, 1.0 + 0.1 * first["constraint_violation"]), rel=1e-5)
