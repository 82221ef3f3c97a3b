"""A run killed (SIGKILL) after its checkpoint at step 2 and resumed ends exactly like an uninterrupted one.

What must come back beyond the weights: the optimizer and schedule, the data order and retain
partners (seeded per epoch), the loss-term history, NPO's reference NLLs and PDU's dual variable.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_until_signal, train_in_process

STEPS = ["model=tiny-random-llama", "data.eval=null", "trainer.args.max_steps=4",
         "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
         "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true", "trainer.args.save_strategy=steps",
         "trainer.args.save_steps=2", "trainer.args.learning_rate=1e-3", "trainer.args.warmup_steps=0"]
METHODS = {
    "GradDiff": [],
    "NPO": [],
    # a dual step that moves lambda visibly every step, so a lambda restarted from dual_init would show
    "PDU": ["trainer.method_args.retain_loss_eps=5.0", "trainer.method_args.dual_step_size=0.5"],
}


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_killed_run_resumes_to_the_same_losses_and_weights(tofu_dir, tmp_path, monkeypatch, method):
    monkeypatch.chdir(REPO)
    overrides = [f"trainer={method}", f"paths.tofu={tofu_dir}", *STEPS, *METHODS[method]]
    straight = tmp_path / "straight"
    train_in_process(straight, overrides)

    resumed = tmp_path / "resumed"
    killed = run_until_signal(tmp_path, ["--config-name=unlearn.yaml", *overrides, f"paths.output_dir={resumed}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not resumed.exists()  # nothing that looks like a result
    train_in_process(resumed, [*overrides, "trainer.args.resume_from_checkpoint=true"])
    assert not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]  # the adopted folder became the result

    expected, got = _log(straight), _log(resumed)
    steps = [e for e in got if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for want, have in zip([e for e in expected if "loss" in e], steps):
        assert set(want) == set(have)
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (method, want["step"], key)
    if method == "PDU":  # the dual variable really moved, so restarting it would have been seen
        assert len({e["dual_variable"] for e in steps}) == 4
    # the cost record of a resumed run covers the resumed part only, and says so
    cost_straight, cost_resumed = (json.loads((o / "run_complete.json").read_text())["compute"] for o in (straight, resumed))
    assert cost_straight["resumed_from"] is None and cost_straight["note"] is None
    assert cost_resumed["resumed_from"].endswith("checkpoint-2") and "cover this run only" in cost_resumed["note"]
    trained = [{p["name"]: p for p in c["phases"]}["training"]["tokens"] for c in (cost_straight, cost_resumed)]
    assert 0 < trained[1] < trained[0]  # steps 3 and 4 of 4
    weights, again = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights.keys() == again.keys()
    for name in weights:
        torch.testing.assert_close(again[name], weights[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_resume_with_settings_that_change_the_result_is_refused(tofu_dir, tmp_path, monkeypatch):
    """Each setting that changes the trained model is named (learning rate, method, data); settings of
    logging, saving and output are allowed and recorded in run_complete.json."""
    from checks import BadValueError

    monkeypatch.chdir(REPO)
    overrides = ["trainer=GradDiff", f"paths.tofu={tofu_dir}", *STEPS]
    out = tmp_path / "run"
    killed = run_until_signal(tmp_path, ["--config-name=unlearn.yaml", *overrides, f"paths.output_dir={out}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resume = "trainer.args.resume_from_checkpoint=true"
    for changed, named in ((["trainer.args.learning_rate=2e-3"], "trainer.args.learning_rate: 0.001 -> 0.002"),
                           (["trainer=NPO"], "trainer.handler: 'GradDiff' -> 'NPO'"),
                           (["data.forget=TOFU_QA_FORGET05"], "data.forget.args.hf_args.name: 'forget10' -> 'forget05'")):
        with pytest.raises(BadValueError, match="trained with other settings that change the result") as refused:
            train_in_process(out, [*overrides, *changed, resume])
        assert named in str(refused.value) and "config.yaml records them" in str(refused.value)
        assert not out.exists()
        staging, = [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]
        assert (staging / "checkpoint-2").is_dir()  # the interrupted run is kept for a resume that matches it

    train_in_process(out, [*[o for o in overrides if "logging_steps" not in o], "trainer.args.logging_steps=2", resume])
    marker = json.loads((out / "run_complete.json").read_text())
    assert marker["resumed_from"].endswith("checkpoint-2")
    assert marker["resume_changes"]["trainer.args.logging_steps"] == [1, 2]
    assert "trainer.args.resume_from_checkpoint" in marker["resume_changes"]
