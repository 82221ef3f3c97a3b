"""Preference-style methods: SimNPO, DPO (IdkDPO), IdkNLL, AltPO, and AltPO's data (dataset + script).

Hand values use a StubLM whose next-token logits depend only on the current token, so every summed
answer NLL ``S`` is a ln-expression: after token 0 the row is [0, 0, ln 4, 0, 0] (p(2) = 4/8, the others
1/8), every other row is uniform (p = 1/5).
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO, StubLM, make_batch, train_in_process
from data import build_dataset, compose_dataset
from data.collators import DataCollatorForSupervisedDataset, Parts
from data.unlearn import ForgetRetainDataset
from data.utils import PromptTemplate, to_sample, tokenize_qa_batch
from model import get_model
from trainer import load_trainer
from trainer.losses import sequence_nll

LN = math.log


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Forget answers (rejected y_l): NLLs ln 2 (2 after 0) and ln 5  -> S = [ln 2, ln 5], T = [1, 1]
ORIGINAL = make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, 3]])
# Preferred answers y_w: NLLs ln 8 (1 after 0) and ln 5          -> S = [ln 8, ln 5]
ALTERNATE = make_batch([[0, 1], [1, 4]], [[-100, 1], [-100, 4]])
# Retain: NLLs ln 8 and ln 5                                     -> token mean ln(40)/2
RETAIN = make_batch([[0, 1], [1, 1]], [[-100, 1], [-100, 1]])
PAIRED = {"forget": Parts(original=ORIGINAL, alternate=ALTERNATE), "retain": RETAIN}
# Longer forget answers for SimNPO's length normalisation (padding positions are masked):
#   row 1: 0->2 (ln 2), 2->0 (ln 5), 0->2 (ln 2): S = ln 20, T = 3, A = ln(20)/3
#   row 2: 1->3 (ln 5):                            S = ln 5,  T = 1, A = ln 5
LONG_FORGET = make_batch([[0, 2, 0, 2], [1, 3, 0, 0]], [[-100, 2, 0, 2], [-100, 3, -100, -100]])


def make(handler, tmp_path, retain=True, forget_items=(0, 1), model=None, **method_args):
    dataset = ForgetRetainDataset(list(forget_items), [0, 1] if retain else None)
    cfg = {"handler": handler, "method_args": method_args,
           "args": {"per_device_train_batch_size": 2, "report_to": "none"}}
    return load_trainer(cfg, model if model is not None else StubLM(), train_dataset=dataset,
                        output_dir=str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# (1) hand values
# ----------------------------------------------------------------------------------------------


def test_simnpo_hand_value(tmp_path):
    t = make("SimNPO", tmp_path, beta=2.0, delta=0.5, gamma=0.25, alpha=0.5)
    # L_f = -(2/beta) mean_i log sigmoid(beta A_i - delta), A = [ln(20)/3, ln 5]
    #     = (2/2) * 1/2 * [ln(1 + e^0.5 * 20^(-2/3)) + ln(1 + e^0.5 / 25)]
    l_f = 0.5 * (LN(1 + math.exp(0.5) * 20 ** (-2 / 3)) + LN(1 + math.exp(0.5) / 25))
    # total = gamma L_f + alpha * retain NLL (ln(40)/2)
    expected = 0.25 * l_f + 0.5 * LN(40) / 2
    loss = t.compute_loss(t.model, {"forget": LONG_FORGET, "retain": RETAIN})
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # With the summed NLL S instead of A (no length normalisation) row 1 would give ln(1 + e^0.5/400).
    t.log({"loss": loss.item()})
    assert t.state.log_history[-1]["forget_loss"] == pytest.approx(l_f, abs=1e-5)


def test_simnpo_stops_on_a_sample_without_answer_tokens(tmp_path):
    t = make("SimNPO", tmp_path, retain=False, retain_loss_type=None)
    t.current_gradient_accumulation_steps = 1  # set by train() in real runs
    no_answer = make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, -100]])
    t.training_step(t.model, {"forget": no_answer})
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1 .*without answer tokens"):
        t.log({"loss": 0.0})


def test_simnpo_defaults_and_pure_forget_term(tmp_path):
    t = make("SimNPO", tmp_path, retain=False, retain_loss_type=None)
    assert (t.beta, t.delta, t.gamma, t.alpha) == (4.5, 0.0, 0.125, 1.0)
    # gamma * (2/4.5) * 1/2 * [ln(1 + 20^(-4.5/3)) + ln(1 + 5^(-4.5))]
    expected = 0.125 * (2 / 4.5) * 0.5 * (LN(1 + 20 ** (-1.5)) + LN(1 + 5 ** (-4.5)))
    assert t.compute_loss(t.model, {"forget": LONG_FORGET}).item() == pytest.approx(expected, abs=1e-6)


def _raise_forget_answer_prob(t):
    """Move the policy (not the frozen reference) away: logit of 2 after 0 from ln 4 to ln 8.

    Row 0 becomes [0, 0, ln 8, 0, 0]: p(2 | 0) = 8/12 = 2/3, p(1 | 0) = 1/12. So
    S(y_l) = [ln(3/2), ln 5] (ref [ln 2, ln 5]) and S(y_w) = [ln 12, ln 5] (ref [ln 8, ln 5]).
    """
    with torch.no_grad():
        t.model.table[0, 2] = LN(8)


def test_dpo_hand_value_after_an_update(tmp_path):
    t = make("DPO", tmp_path, beta=1.0, gamma=2.0, alpha=0.5)
    _raise_forget_answer_prob(t)
    # margin_i = (S_ref(w) - S(w)) - (S_ref(l) - S(l)):
    #   row 1: (ln 8 - ln 12) - (ln 2 - ln(3/2)) = ln(2/3) - ln(4/3) = -ln 2;  row 2: 0
    # L_f = -(2/1) * 1/2 * [log sig(-ln 2) + log sig(0)] = ln(1 + 2) + ln 2 = ln 6
    # retain now: ln 12 (1 after 0) and ln 5 -> ln(60)/2
    expected = 2.0 * LN(6) + 0.5 * LN(60) / 2
    loss = t.compute_loss(t.model, PAIRED)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    t.log({"loss": loss.item()})
    assert t.state.log_history[-1]["forget_loss"] == pytest.approx(LN(6), abs=1e-5)
    # Preferred and rejected swapped would give margin +ln 2: ln(1 + 1/2) + ln 2 = ln 3, not ln 6.


def test_dpo_at_start_is_two_over_beta_ln2(tmp_path):
    t = make("DPO", tmp_path, retain=False, retain_loss_type=None)  # beta 0.1: policy == reference
    assert t.compute_loss(t.model, PAIRED).item() == pytest.approx(20 * LN(2), abs=1e-4)


def test_altpo_is_dpo_with_alternates(tmp_path):
    t = make("AltPO", tmp_path, beta=0.5, retain_loss_type=None)
    _raise_forget_answer_prob(t)
    # L_f = -(2/0.5) * 1/2 * [log sig(-0.5 ln 2) + log sig(0)] = 2 [ln(1 + sqrt 2) + ln 2]
    expected = 2 * (LN(1 + math.sqrt(2)) + LN(2))
    assert t.compute_loss(t.model, PAIRED).item() == pytest.approx(expected, abs=1e-5)
    assert (t.gamma, t.alpha) == (1.0, 1.0) and make("AltPO", tmp_path).beta == 0.1


def test_idknll_hand_value(tmp_path):
    t = make("IdkNLL", tmp_path, gamma=2.0, alpha=0.5)
    # refusals: row 1 0->2 (ln 2), 2->0 (ln 5), 0->1 (ln 8); row 2 1->4 (ln 5)
    # token mean over the batch: (ln 2 + ln 5 + ln 8 + ln 5) / 4 = ln(400)/4
    refusals = make_batch([[0, 2, 0, 1], [1, 4, 0, 0]], [[-100, 2, 0, 1], [-100, 4, -100, -100]])
    inputs = {"forget": Parts(original=ORIGINAL, alternate=refusals), "retain": RETAIN}
    expected = 2.0 * LN(400) / 4 + 0.5 * LN(40) / 2
    assert t.compute_loss(t.model, inputs).item() == pytest.approx(expected, abs=1e-5)


def test_loss_terms_logged_separately(tmp_path):
    t = make("DPO", tmp_path, beta=1.0, alpha=0.5)
    t.model.train()
    t.compute_loss(t.model, PAIRED)
    t.log({"loss": 0.0})
    entry = t.state.log_history[-1]
    assert entry["forget_loss"] == pytest.approx(2 * LN(2), abs=1e-5)  # (2/beta) ln 2 at the start
    assert entry["retain_loss"] == pytest.approx(LN(40) / 2, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# argument and data errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("handler, hint", [("DPO", "_IDK"), ("IdkNLL", "_IDK"), ("AltPO", "_ALT")])
def test_plain_forget_data_is_a_clear_error(tmp_path, handler, hint):
    sample = {"input_ids": torch.tensor([0, 2]), "labels": torch.tensor([-100, 2])}
    with pytest.raises(ValueError, match=rf"{handler} needs forget items with an 'alternate'.*{hint}"):
        make(handler, tmp_path, forget_items=[sample])
    t = make(handler, tmp_path)
    with pytest.raises(ValueError, match=rf"{hint} dataset"):
        t.compute_loss(t.model, {"forget": ORIGINAL, "retain": RETAIN})


@pytest.mark.parametrize("handler, args, message", [
    ("SimNPO", {"beta": 0.0}, "SimNPO: trainer.method_args.beta=0.0; must be a finite number > 0"),
    ("SimNPO", {"delta": float("nan")}, "trainer.method_args.delta=nan; must be a finite number"),
    ("DPO", {"beta": -1.0}, "DPO: trainer.method_args.beta=-1.0; must be a finite number > 0"),
    ("AltPO", {"beta": 0}, "AltPO: trainer.method_args.beta=0; must be a finite number > 0"),
    ("IdkNLL", {"retain_loss_type": "MSE"}, "'MSE'.*NLL, KL or null"),
    ("DPO", {"delta": 0.5}, r"not accepted by DPO; valid: \['alpha', 'beta', 'gamma', 'retain_loss_type'\]$"),
])
def test_bad_method_args(tmp_path, handler, args, message):
    with pytest.raises(ValueError, match=message):
        make(handler, tmp_path, **args)


# ----------------------------------------------------------------------------------------------
# (4) reference model only when needed
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("handler, args, needs_ref", [
    ("SimNPO", {}, False),
    ("SimNPO", {"retain_loss_type": "KL"}, True),
    ("IdkNLL", {}, False),
    ("IdkNLL", {"retain_loss_type": "KL"}, True),
    ("DPO", {}, True),
    ("DPO", {"retain_loss_type": None}, True),
    ("AltPO", {}, True),
])
def test_reference_model_only_when_needed(tmp_path, handler, args, needs_ref):
    t = make(handler, tmp_path, **args)
    if not needs_ref:
        assert t.ref_model is None
    else:
        assert t.ref_model is not None and t.ref_model is not t.model
        assert not any(p.requires_grad for p in t.ref_model.parameters())


# ----------------------------------------------------------------------------------------------
# (2) one SGD step on tiny-random-llama moves the right way
# ----------------------------------------------------------------------------------------------


def _tiny_cfg():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    return cfg


@pytest.fixture(scope="module")
def tiny():
    return get_model(_tiny_cfg())


def _qa_batch(tok, questions, answers):
    template = PromptTemplate.from_config({"apply_chat_template": True})
    samples = [to_sample(t, i) for i, t in enumerate(tokenize_qa_batch(tok, template, questions, answers, 128))]
    return DataCollatorForSupervisedDataset(tok)(samples)


@pytest.mark.parametrize("handler", ["SimNPO", "DPO", "AltPO", "IdkNLL"])
def test_one_sgd_step_moves_the_right_way(tmp_path, tiny, handler):
    base, tok = tiny
    model = copy.deepcopy(base)
    questions = ["Where was Ada Quill born?", "What did Ada Quill write?"]
    forget = _qa_batch(tok, questions, ["In Lisbon.", "Sea novels."])
    alternate = _qa_batch(tok, questions, ["In Oslo, Norway.", "Books about mountains."])
    # A random model's answers have A ~ ln(vocab) ~ 11: at SimNPO's default beta 4.5 the sigmoid saturates
    # and the gradient, ~exp(-beta A), vanishes in float32; beta 0.1 keeps it visible.
    extra = {"beta": 0.1} if handler == "SimNPO" else {}
    t = make(handler, tmp_path, retain=False, model=model, retain_loss_type=None, **extra)
    inputs = {"forget": forget if handler == "SimNPO" else Parts(original=forget, alternate=alternate)}

    def nll(batch):
        with torch.no_grad():
            return sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])[0].sum().item()

    before_forget, before_alt = nll(forget), nll(alternate)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t.compute_loss(model, inputs).backward()
    opt.step()
    if handler == "IdkNLL":  # fine-tunes towards the alternate (refusal) answer
        assert nll(alternate) < before_alt
    else:  # the forget answers become less likely
        assert nll(forget) > before_forget
    if handler in ("DPO", "AltPO"):  # ... and the preferred answers more likely
        assert nll(alternate) < before_alt


# ----------------------------------------------------------------------------------------------
# QAwithAlternateDataset
# ----------------------------------------------------------------------------------------------


def _write_alt(folder, rows):
    folder.mkdir(exist_ok=True)
    (folder / "forget10_alternate.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return OmegaConf.create({"paths": {"tofu": str(folder)}, "seed": 0})


def test_alternate_dataset_items_and_seeded_draws(tmp_path, tiny):
    _, tok = tiny
    rows = [{"question": f"Q{i}?", "answer": f"True {i}.", "alternate_answer": [f"Alt {i}{c}." for c in "abcde"]}
            for i in range(6)]
    root = _write_alt(tmp_path / "tofu", rows)

    def picks(seed):
        ds = build_dataset(compose_dataset("TOFU_QA_FORGET10_ALT", OmegaConf.merge(root, {"seed": seed})), tok)
        assert len(ds) == 6 and set(ds[0]) == {"original", "alternate"}
        out = []
        for i in range(len(ds)):
            alt, orig = ds[i]["alternate"], ds[i]["original"]
            n = int((alt["labels"] == -100).sum())
            assert torch.equal(alt["input_ids"][:n], orig["input_ids"][:n])  # same question prompt
            assert tok.decode(orig["input_ids"][n:-1]) == f"True {i}."
            out.append(tok.decode(alt["input_ids"][n:-1]))
        return out

    first = picks(0)
    assert all(a in rows[i]["alternate_answer"] for i, a in enumerate(first))
    assert picks(0) == first and picks(1) != first
    # A string column is taken as is.
    root = _write_alt(tmp_path / "tofu_str", [{**r, "alternate_answer": f"Only {i}."} for i, r in enumerate(rows)])
    ds = build_dataset(compose_dataset("TOFU_QA_FORGET10_ALT", root), tok)
    n = int((ds[2]["alternate"]["labels"] == -100).sum())
    assert tok.decode(ds[2]["alternate"]["input_ids"][n:-1]) == "Only 2."


def test_alternate_dataset_without_the_column_says_how_to_make_it(tmp_path, tiny):
    _, tok = tiny
    root = _write_alt(tmp_path / "tofu", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(ValueError, match=r"line 1: no 'alternate_answer' field \(alternate_key='alternate_answer'\)"
                                         ".*generate_alternates.py"):
        build_dataset(compose_dataset("TOFU_QA_FORGET10_ALT", root), tok)
    with pytest.raises(FileNotFoundError, match="forget05_alternate.json not found.*generate_alternates.py"):
        build_dataset(compose_dataset("TOFU_QA_FORGET05_ALT", root), tok)
    with pytest.raises(ValueError, match="paths.tofu is not set.*generate_alternates.py"):
        build_dataset(compose_dataset("TOFU_QA_FORGET10_ALT", OmegaConf.create({"paths": {"tofu": None}, "seed": 0})), tok)


# ----------------------------------------------------------------------------------------------
# (3) end to end through src/train.py (and scripts/generate_alternates.py for AltPO)
# ----------------------------------------------------------------------------------------------

FAST = ["trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true"]


def _train(tmp_path, monkeypatch, tofu, trainer, forget):
    """2 steps of ``python src/train.py --config-name=unlearn.yaml model=tiny-random-llama trainer=<trainer> ...``
    (in this process). Returns the logged training steps."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    steps = train_in_process(out, ["model=tiny-random-llama", f"trainer={trainer}", f"data.forget={forget}",
                                   "data.retain=TOFU_QA_RETAIN90", f"paths.tofu={tofu}", *FAST])
    assert out.is_dir() and (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert [e["step"] for e in steps] == [1, 2]
    assert all("forget_loss" in e and "retain_loss" in e for e in steps)
    return steps


@pytest.mark.parametrize("trainer, forget", [
    ("SimNPO", "TOFU_QA_FORGET10"), ("DPO", "TOFU_QA_FORGET10_IDK"), ("IdkNLL", "TOFU_QA_FORGET10_IDK"),
])
def test_end_to_end(tofu_dir, tmp_path, monkeypatch, trainer, forget):
    steps = _train(tmp_path, monkeypatch, tofu_dir, trainer, forget)
    if trainer == "DPO":  # first step: policy == reference, so the DPO term is (2/beta) ln 2
        assert steps[0]["forget_loss"] == pytest.approx(20 * LN(2), rel=1e-4)


def test_generate_alternates_then_altpo(tofu_dir, tmp_path, monkeypatch):
    tofu = tmp_path / "tofu"
    shutil.copytree(tofu_dir, tofu)  # the fixture folder is shared between tests: never write into it
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import generate_alternates

    out = generate_alternates.main(["--model-config", "tiny-random-llama", "--input", str(tofu / "forget10.json"),
                                    "--max-new-tokens", "6", "--num-alternates", "2", "--sample", "--seed", "3"])
    assert out == tofu / "forget10_alternate.json"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    source = [json.loads(line) for line in (tofu / "forget10.json").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "alternate_answer"} for r in rows] == source
    assert all(len(r["alternate_answer"]) == 2 and all(isinstance(a, str) for a in r["alternate_answer"])
               for r in rows)
    assert any(a for r in rows for a in r["alternate_answer"])  # sampling from a random model gives some text
    assert not [p for p in tofu.iterdir() if p.name.endswith(".tmp")]
    steps = _train(tmp_path, monkeypatch, tofu, "AltPO", "TOFU_QA_FORGET10_ALT")
    assert steps[0]["forget_loss"] == pytest.approx(20 * LN(2), rel=1e-4)


def test_generate_alternates_refuses_repeated_greedy(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import generate_alternates

    (tmp_path / "f.json").write_text('{"question": "Q?", "answer": "A."}\n')
    with pytest.raises(SystemExit):
        generate_alternates.parse_args(["--model-config", "tiny-random-llama", "--input", str(tmp_path / "f.json"),
                                        "--num-alternates", "3"])
