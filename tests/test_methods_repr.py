"""RMU, UNDIAL and CE-U: hand values, gradient direction, the truncated forward, end-to-end runs."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO, StubLM, make_batch, run_cli
from data.collators import layout_of
from data.unlearn import ForgetRetainDataset
from model import get_model
from trainer import load_trainer
from trainer.losses import ceu_loss, sequence_nll, undial_loss
from trainer.utils import hidden_states_at

LN = math.log


# ----- hand-made models ---------------------------------------------------------------------------
class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, h):
        return h * self.w


class StubDecoder(torch.nn.Module):
    """Hidden size 2: h_0 = w0 * embed(token) with embeddings 0:[1,0] 1:[0,1] 2:[1,1] 3:[2,0] 4:[0,2]."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=2)
        self.model = torch.nn.Module()
        self.model.embed = torch.nn.Embedding(5, 2)
        with torch.no_grad():
            self.model.embed.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0], [0, 2]]))
        self.model.layers = torch.nn.ModuleList([Scale(), Scale()])
        self.lm_head = torch.nn.Linear(2, 5)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


# forget answer tokens: 2 after 0 (p 1/2) and 3 after 1 (p 1/5); retain: 1 after 0 (p 1/8), 1 after 1 (p 1/5)
FORGET = make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, 3]])
RETAIN = make_batch([[0, 1], [1, 1]], [[-100, 1], [-100, 1]])
INPUTS = {"forget": FORGET, "retain": RETAIN}


def make(handler, model, retain=True, **method_args):
    dataset = ForgetRetainDataset([0, 1], [0, 1] if retain else None)
    cfg = {"handler": handler, "method_args": method_args,
           "args": {"per_device_train_batch_size": 2, "report_to": "none", "output_dir": "unused"}}
    return load_trainer(cfg, model, train_dataset=dataset, output_dir="/tmp/test_methods_repr_out")


# ----- CE-U -------------------------------------------------------------------------------------------
# Three-token answers: sample 1 predicts 0 then 2 after token 0; sample 2 predicts 3 after 1, then 0 after 3.
LONG = make_batch([[0, 0, 2], [1, 3, 0]], [[-100, 0, 2], [-100, 3, 0]])


def test_ceu_loss_by_hand():
    table = StubLM().table.detach()
    logits = table[LONG["input_ids"]]
    # true 2 after token 0: target over {0,1,3,4}, 1/4 each, p = 1/8 each   -> CE = ln 8
    # true 3 after token 1: target 1/4 on {0,1,2,4}, p = 1/5                  -> CE = ln 5
    # true 0 after token 3: same                                               -> CE = ln 5
    # true 0 after token 0: target ∝ [0,1,4,1,1]/7, p = [1/8,1/8,1/2,1/8,1/8]
    #                       -> CE = (3/7) ln 8 + (4/7) ln 2 = (13/7) ln 2
    all_tokens = ((13 / 7) * LN(2) + LN(8) + LN(5) + LN(5)) / 4
    assert ceu_loss(logits, LONG["labels"], 0).item() == pytest.approx(all_tokens, abs=1e-6)
    # skipping the first answer token of each sample leaves "2 after 0" and "0 after 3"
    assert ceu_loss(logits, LONG["labels"], 1).item() == pytest.approx((LN(8) + LN(5)) / 2, abs=1e-6)
    assert ceu_loss(logits, LONG["labels"], 2).item() == 0.0  # nothing left


def test_ceu_method_by_hand():
    # default ignore 1 would leave no forget token in the 2-token batch: use LONG
    t = make("CEU", StubLM(), retain=False)
    assert t.ref_model is None
    assert t.compute_loss(t.model, {"forget": LONG}).item() == pytest.approx((LN(8) + LN(5)) / 2, abs=1e-5)
    # + alpha * retain NLL, retain token mean (ln 8 + ln 5) / 2
    t = make("CEU", StubLM(), ignore_first_n_answer_tokens=0, alpha=0.5, retain_loss_type="NLL")
    assert t.ref_model is None
    expected = (LN(8) + LN(5)) / 2 + 0.5 * (LN(8) + LN(5)) / 2
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(expected, abs=1e-5)
    assert make("CEU", StubLM(), retain_loss_type="KL").ref_model is not None


def test_ceu_target_is_detached():
    logits = StubLM().table.detach()[LONG["input_ids"]].requires_grad_(True)
    ceu_loss(logits, LONG["labels"], 0).backward()
    # gradient on the logits of "2 after token 0" is (p - q) / n_tokens: p = [1,1,4,1,1]/8, q = [1,1,0,1,1]/4
    expected = (torch.tensor([1, 1, 4, 1, 1]) / 8 - torch.tensor([1, 1, 0, 1, 1]) / 4) / 4
    assert torch.allclose(logits.grad[0, 1], expected, atol=1e-6)


# ----- UNDIAL -------------------------------------------------------------------------------------------
def test_undial_loss_by_hand():
    table = StubLM().table.detach()
    logits = table[FORGET["input_ids"]]
    # beta = ln 4, reference = model:
    # "2 after 0": adjusted logits [0,0,ln4-ln4,0,0] -> q uniform 1/5; p = [1,1,4,1,1]/8
    #              CE = -(4/5) ln(1/8) - (1/5) ln(1/2) = (13/5) ln 2
    # "3 after 1": q = [4,4,4,1,4]/17, p uniform 1/5  -> CE = ln 5
    expected = ((13 / 5) * LN(2) + LN(5)) / 2
    assert undial_loss(logits, logits, FORGET["labels"], LN(4)).item() == pytest.approx(expected, abs=1e-6)
    # beta = 10: "2 after 0": q = [1,1,4e^-10,1,1] / (4 + 4e^-10); CE = q_other*4*ln 8 + q_2 ln 2
    e = 4 * math.exp(-10)
    first = (4 / (4 + e)) * LN(8) + (e / (4 + e)) * LN(2)
    assert undial_loss(logits, logits, FORGET["labels"], 10.0).item() == pytest.approx((first + LN(5)) / 2, abs=1e-6)
    # prompt positions do not count: a batch whose only difference is in the prompt gives the same value
    other = logits.clone()
    other[:, 1] += 3.0  # position 1 predicts nothing (no label after it)
    assert undial_loss(other, other, FORGET["labels"], 10.0).item() == pytest.approx((first + LN(5)) / 2, abs=1e-6)


def test_undial_method_by_hand():
    t = make("UNDIAL", StubLM(), beta=LN(4), alpha=0.5)
    assert t.ref_model is not None and t.ref_model is not t.model
    expected = ((13 / 5) * LN(2) + LN(5)) / 2 + 0.5 * (LN(8) + LN(5)) / 2
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(expected, abs=1e-5)
    # the target stays the reference's: raising the model's logit of 2 after 0 to ln 8 (p(2) = 8/12)
    with torch.no_grad():
        t.model.table[0, 2] = LN(8)
    # q still uniform on "2 after 0": CE = -(4/5) ln(1/12) - (1/5) ln(8/12)
    first = (4 / 5) * LN(12) + (1 / 5) * LN(12 / 8)
    pure = make("UNDIAL", copy.deepcopy(StubLM()), beta=LN(4), retain_loss_type=None, retain=False)
    with torch.no_grad():
        pure.model.table[0, 2] = LN(8)
    assert pure.compute_loss(pure.model, INPUTS).item() == pytest.approx((first + LN(5)) / 2, abs=1e-5)


# ----- RMU: hand values on the stub decoder --------------------------------------------------------------
def _rmu_stub(**method_args):
    t = make("RMU", StubDecoder(), layer_id=0, trainable_params=[r"model\.layers\.0\.w"], **method_args)
    t.control_vec = torch.tensor([3.0, 4.0])  # c = 5, u = [0.6, 0.8]
    with torch.no_grad():
        t.model.model.layers[0].w.fill_(2.0)  # the reference keeps w = 1: h = 2 emb vs h_frozen = emb
    return t


def test_rmu_loss_by_hand():
    t = _rmu_stub(alpha=2.0)
    # forget h = 2 emb: token 0 [2,0]-[3,4] -> (1+16)/2 = 8.5; token 2 [2,2] -> (1+4)/2 = 2.5;
    #                   token 1 [0,2] -> (9+4)/2 = 6.5;        token 3 [4,0] -> (1+16)/2 = 8.5   mean 6.5
    # retain h - h_frozen = emb, tokens 0,1,1,1: ||emb||^2 / 2 = 0.5 each                          mean 0.5
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(6.5 + 2.0 * 0.5, abs=1e-6)
    # padding does not count: drop forget token 3 -> (8.5 + 2.5 + 6.5) / 3
    padded = make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, -100]], [[1, 1], [1, 0]])
    loss = t.compute_loss(t.model, {"forget": padded, "retain": RETAIN})
    assert loss.item() == pytest.approx(17.5 / 3 + 1.0, abs=1e-6)
    t = _rmu_stub(alpha=2.0)  # fresh trainer: the log averages the terms of every call since the last log
    t.model.train()
    t.compute_loss(t.model, INPUTS)
    t.log({"loss": 0.0})
    assert t.state.log_history[-1]["forget_loss"] == pytest.approx(6.5)
    assert t.state.log_history[-1]["retain_loss"] == pytest.approx(0.5)


def test_rmu_answer_token_mask_by_hand():
    t = _rmu_stub(alpha=2.0, token_mask="answer")
    # forget answer tokens 2 and 3: (2.5 + 8.5) / 2 = 5.5; retain answer tokens 1, 1: 0.5
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(5.5 + 2.0 * 0.5, abs=1e-6)


def test_rmu_stops_after_layer_and_freezes_the_rest():
    t = _rmu_stub()
    calls = []
    for m in (t.model, t.ref_model):
        m.model.layers[1].register_forward_pre_hook(lambda *a: calls.append("layer1"))
        m.lm_head.register_forward_pre_hook(lambda *a: calls.append("head"))
    t.compute_loss(t.model, INPUTS).backward()
    assert calls == []
    assert [n for n, p in t.model.named_parameters() if p.requires_grad] == ["model.layers.0.w"]
    assert t.model.model.layers[0].w.grad is not None
    assert t.ref_model is not None and not any(p.requires_grad for p in t.ref_model.parameters())


def test_rmu_random_direction_is_seeded_uniform_then_normalised():
    t = make("RMU", StubDecoder(), layer_id=0, trainable_params=r"model\.layers\.0\.w", steering_coeff=3.0, seed=7)
    r = torch.rand(2, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(t.control_vec, 3.0 * r / r.norm())
    assert bool((t.control_vec >= 0).all()) and t.control_vec.norm().item() == pytest.approx(3.0)
    other = make("RMU", StubDecoder(), layer_id=0, trainable_params=r"model\.layers\.0\.w", seed=8)
    assert not torch.allclose(other.control_vec / 6.5, t.control_vec / 3.0)


# ----- tiny-random-llama ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    model, _ = get_model(cfg)
    return model


def _qa_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "layout": layout_of(labels)}


def test_hidden_states_at_matches_output_hidden_states_and_skips_later_layers(tiny):
    model = copy.deepcopy(tiny)
    batch = _qa_batch(model.config.vocab_size)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states
    n_hooks = len(model.model.layers[0]._forward_hooks)
    calls = []
    model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append("layer1"))
    model.model.norm.register_forward_pre_hook(lambda *a: calls.append("norm"))
    model.lm_head.register_forward_pre_hook(lambda *a: calls.append("head"))
    with torch.no_grad():
        h0 = hidden_states_at(model, 0, **inputs)
    assert torch.equal(h0, full[1])
    assert calls == []  # layer 1, the final norm and the LM head did not run
    assert len(model.model.layers[0]._forward_hooks) == n_hooks  # the capture hook is gone
    with torch.no_grad():
        h1 = hidden_states_at(model, 1, **inputs)
    # last layer: HF's hidden_states[-1] is after the final norm; ours is the raw layer output
    assert torch.allclose(model.model.norm(h1), full[2], atol=1e-6)
    assert calls == ["layer1", "norm"]  # the norm call is the line above; the LM head still never ran
    with pytest.raises(ValueError, match=r"layer_index=2 .* 0\.\.1"):
        hidden_states_at(model, 2, **inputs)

    class Wrapper(torch.nn.Module):  # stands for DistributedDataParallel: it holds the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    calls.clear()
    with torch.no_grad():
        wrapped = hidden_states_at(Wrapper(model), 0, **inputs)
    # same value; a wrapped model runs to the end (the wrapper's post-forward must happen)
    assert torch.equal(wrapped, full[1]) and calls == ["layer1", "norm", "head"]


def test_rmu_loss_truncated_equals_full_forward(tiny):
    t = make("RMU", copy.deepcopy(tiny), layer_id=0, steering_coeff=2.0, alpha=10.0)
    forget, retain = _qa_batch(tiny.config.vocab_size, 0), _qa_batch(tiny.config.vocab_size, 1)
    with torch.no_grad():  # make the model differ from its frozen copy so the retain term is not 0
        t.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    loss = t.compute_loss(t.model, {"forget": forget, "retain": retain})

    def h(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[1]

    forget_term = ((h(t.model, forget) - t.control_vec) ** 2).mean()
    retain_term = ((h(t.model, retain) - h(t.ref_model, retain)) ** 2).mean()
    assert retain_term.item() > 0
    assert loss.item() == pytest.approx((forget_term + 10.0 * retain_term).item(), rel=1e-6)


def test_rmu_argument_errors(tiny):
    with pytest.raises(ValueError, match=r"layer_id=2 .*2 decoder layers.*0\.\.1"):
        make("RMU", copy.deepcopy(tiny), layer_id=2)
    with pytest.raises(ValueError, match=r"match no parameter.*model\.embed_tokens\.weight"):
        make("RMU", copy.deepcopy(tiny), layer_id=1, trainable_params=["mlp.down_proj"])
    with pytest.raises(ValueError, match="after layer_id=0"):
        make("RMU", copy.deepcopy(tiny), layer_id=0, trainable_params=[r"model\.layers\.1\.mlp\.down_proj\.weight"])
    with pytest.raises(ValueError, match="token_mask='prompt'"):
        make("RMU", copy.deepcopy(tiny), layer_id=1, token_mask="prompt")


def test_rmu_default_trainable_params_follow_layer_id(tiny):
    t = make("RMU", copy.deepcopy(tiny), layer_id=1)
    trained = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trained == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    t.create_optimizer()
    in_optimizer = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in t.model.named_parameters() if n in trained}


def test_rmu_step_moves_forget_activations_towards_target(tiny):
    t = make("RMU", copy.deepcopy(tiny), layer_id=1, steering_coeff=2.0, alpha=100.0)
    forget, retain = _qa_batch(tiny.config.vocab_size, 0), _qa_batch(tiny.config.vocab_size, 1)

    def distance():
        with torch.no_grad():
            return (hidden_states_at(t.model, 1, input_ids=forget["input_ids"]) - t.control_vec).norm().item()

    before = distance()
    opt = torch.optim.SGD([p for p in t.model.parameters() if p.requires_grad], lr=1.0)
    t.compute_loss(t.model, {"forget": forget, "retain": retain}).backward()
    opt.step()
    assert distance() < before - 1e-3


@pytest.fixture(scope="module")
def memorised(tiny):
    """A confident copy of tiny-random-llama (final norm x20) and a forget batch of its own greedy answers,
    so the answers are likely enough for unlearning to lower them (a random model gives ~1/49152)."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
        ids = torch.randint(10, tiny.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    labels = ids.clone()
    labels[:, :5] = -100
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                   "layout": layout_of(labels)}


@pytest.mark.parametrize("handler, method_args", [
    ("UNDIAL", {"retain_loss_type": None}),
    ("CEU", {}),
])
def test_one_step_lowers_forget_answer_probability(memorised, handler, method_args):
    model, forget = memorised
    t = make(handler, copy.deepcopy(model), retain=False, **method_args)

    def forget_nll():
        with torch.no_grad():
            return sequence_nll(t.model(input_ids=forget["input_ids"]).logits, forget["labels"])[0].sum().item()

    before = forget_nll()
    assert before < 10 * 1.0  # 10 answer tokens, each likelier than 1/e (chance: 1/49152)
    opt = torch.optim.SGD(t.model.parameters(), lr=1e-5)  # the confident model is steep: small steps
    t.compute_loss(t.model, {"forget": forget}).backward()
    opt.step()
    assert forget_nll() > before + 1e-3


# ----- end to end ------------------------------------------------------------------------------------------
FAST = ["trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true"]


@pytest.mark.parametrize("handler, overrides, terms", [
    ("RMU", ["trainer.method_args.layer_id=1", "trainer.method_args.steering_coeff=2",
             "data.retain=TOFU_QA_RETAIN90"], ["forget_loss", "retain_loss"]),
    ("UNDIAL", ["data.retain=TOFU_QA_RETAIN90"], ["forget_loss", "retain_loss"]),
    ("CEU", ["data.retain=null"], ["forget_loss"]),
])
def test_end_to_end(tofu_dir, tmp_path, tiny, handler, overrides, terms):
    import json

    out = tmp_path / handler
    result = run_cli(["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", f"trainer={handler}",
                      "data.forget=TOFU_QA_FORGET10", f"paths.tofu={tofu_dir}", *overrides, *FAST,
                      f"paths.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    steps = [e for e in (json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for term in terms:
        assert all(term in e for e in steps), term
    if handler == "RMU":  # only the default trainable parameters (down_proj of layers 0..1) moved
        unlearned, _ = get_model({"model_args": {"pretrained_model_name_or_path": str(out)},
                                  "tokenizer_args": {"pretrained_model_name_or_path": str(out)}})
        start = dict(tiny.named_parameters())
        changed = sorted(n for n, p in unlearned.named_parameters() if not torch.equal(p, start[n]))
        assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
