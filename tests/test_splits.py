"""TOFU's split pairing: holdoutNN follows forgetNN, an unlearning run evaluates the split it unlearns,
a missing holdout file says what to do, and a size mismatch is recorded in the EVAL file."""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO
from data import check_eval_splits, forget_split_of, holdout_for


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_holdout_for_and_forget_split_of():
    assert [holdout_for(f) for f in ("forget01", "forget05", "forget10")] == ["holdout01", "holdout05", "holdout10"]
    with pytest.raises(ValueError, match=r"forget_split='retain90' is not a TOFU forget split.*holdout_split="):
        holdout_for("retain90")
    with pytest.raises(ValueError, match="forget10_perturbed"):
        holdout_for("forget10_perturbed")
    assert forget_split_of("TOFU_QA_FORGET01") == "forget01"
    assert forget_split_of("TOFU_QA_FORGET05_IDK") == "forget05"
    assert forget_split_of("TOFU_QA_FORGET10_ALT") == "forget10"  # forget10_alternate.json
    assert forget_split_of("TOFU_QA_RETAIN90") is None and forget_split_of(None) is None
    assert forget_split_of({"args": {"hf_args": {"name": "forget05_perturbed"}}}) == "forget05"


@pytest.mark.parametrize("config, overrides, forget, holdout", [
    ("unlearn.yaml", ["data.forget=TOFU_QA_FORGET01"], "forget01", "holdout01"),
    ("unlearn.yaml", ["data.forget=TOFU_QA_FORGET05_IDK"], "forget05", "holdout05"),
    ("unlearn.yaml", [], "forget10", "holdout10"),
    ("train.yaml", [], "forget10", "holdout10"),
    ("eval.yaml", [], "forget10", "holdout10"),
    ("eval.yaml", ["forget_split=forget01"], "forget01", "holdout01"),
    ("eval.yaml", ["holdout_split=holdout01"], "forget10", "holdout01"),  # an explicit override stays possible
])
def test_the_configs_pair_the_splits(config, overrides, forget, holdout):
    cfg = OmegaConf.to_container(_compose(config, [*overrides, "eval=tofu"]), resolve=True)
    tofu = cfg["eval"]["tofu"]
    assert (tofu["forget_split"], tofu["holdout_split"]) == (forget, holdout)
    mia = tofu["metrics"]["mia_min_k"]["datasets"]
    assert mia["forget"]["args"]["hf_args"]["name"] == f"{forget}_perturbed"
    assert mia["holdout"]["args"]["hf_args"]["name"] == holdout


def test_an_unlearning_run_evaluates_the_split_it_unlearns():
    check_eval_splits(_compose("unlearn.yaml", ["data.forget=TOFU_QA_FORGET01", "eval=tofu"]))
    check_eval_splits(_compose("unlearn.yaml", ["data.forget=TOFU_QA_FORGET01", "forget_split=forget01", "eval=tofu"]))
    check_eval_splits(_compose("unlearn.yaml", ["data.forget=TOFU_QA_FORGET01", "forget_split=forget05"]))  # no eval
    with pytest.raises(ValueError, match=r"eval.tofu.forget_split=forget05 but data.forget=TOFU_QA_FORGET01 unlearns "
                                         r"forget01.*forget_split=forget01"):
        check_eval_splits(_compose("unlearn.yaml", ["data.forget=TOFU_QA_FORGET01", "forget_split=forget05",
                                                    "eval=tofu"]))
    with pytest.raises(ValueError, match="eval.tofu.forget_split=forget10 but data.forget=TOFU_QA_FORGET05"):
        check_eval_splits(_compose("unlearn.yaml", ["data.forget=TOFU_QA_FORGET05", "eval=tofu",
                                                    "eval.tofu.forget_split=forget10"]))


def test_the_training_command_refuses_a_mismatch_before_any_work(tofu_dir, tmp_path):
    from conftest import train_in_process

    with pytest.raises(ValueError, match="unlearns forget01"):
        train_in_process(tmp_path / "run", ["model=tiny-random-llama", "data.forget=TOFU_QA_FORGET01",
                                            f"paths.tofu={tofu_dir}", "eval=tofu", "forget_split=forget10"])
    assert not (tmp_path / "run").exists()


def _tiny():
    from model import get_model

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    return get_model(cfg)


def _mia_loss_evaluator(tofu, overrides, tokenizer=None):
    """The eval=tofu evaluator of ``src/eval.py`` with only its mia_loss metric (a quick one)."""
    from evals.base import Evaluator

    cfg = _compose("eval.yaml", ["model=tiny-random-llama", f"paths.tofu={tofu}", *overrides])
    tofu_cfg = OmegaConf.to_container(cfg.eval.tofu, resolve=True)
    tofu_cfg["metrics"] = {"mia_loss": tofu_cfg["metrics"]["mia_loss"]}
    return Evaluator(tofu_cfg, tokenizer=tokenizer, template_args=cfg.model.template_args, paths=cfg.paths)


def test_a_missing_holdout_file_names_it_and_the_override(tofu_dir, tmp_path):
    """A local folder with holdout01 only (like ../shared/data/tofu): forget10 wants holdout10."""
    folder = tmp_path / "tofu"
    shutil.copytree(tofu_dir, folder)
    for name in ("holdout05.json", "holdout10.json"):
        (folder / name).unlink()
    evaluator = _mia_loss_evaluator(folder, [])
    with pytest.raises(FileNotFoundError) as error:
        evaluator.check_inputs()
    message = str(error.value)
    assert f"{folder / 'holdout10.json'} not found" in message
    assert "holdout01.json" in message and "forget10_perturbed.json" in message  # the files present
    assert "add holdout_split=holdout01" in message and "(forget10 -> holdout10)" in message
    # evaluate() checks before running the model (no model needed to fail)
    with pytest.raises(FileNotFoundError, match="holdout10.json not found"):
        evaluator.evaluate(model=None, output_dir=tmp_path / "eval")
    _mia_loss_evaluator(folder, ["holdout_split=holdout01"]).check_inputs()


def test_unequal_forget_and_holdout_sizes_are_recorded(tofu_dir, tmp_path):
    model, tok = _tiny()
    matched = tmp_path / "matched"
    _mia_loss_evaluator(tofu_dir, [], tok).evaluate(model, output_dir=matched)
    meta = json.loads((matched / "TOFU_EVAL.json").read_text())["_meta"]
    assert meta["split_sizes"] == {"forget": 8, "holdout": 8} and meta["warnings"] == []
    assert meta["splits"]["holdout_split"] == "holdout10"

    unequal = tmp_path / "unequal"
    _mia_loss_evaluator(tofu_dir, ["holdout_split=holdout01"], tok).evaluate(model, output_dir=unequal)
    meta = json.loads((unequal / "TOFU_EVAL.json").read_text())["_meta"]
    assert meta["split_sizes"] == {"forget": 8, "holdout": 4}
    assert len(meta["warnings"]) == 1
    assert "8 forget rows (forget10) against 4 holdout rows (holdout01)" in meta["warnings"][0]
