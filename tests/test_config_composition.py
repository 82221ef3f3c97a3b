"""Dataset and PEFT configs are composed by Hydra: the default datasets through package directives
(``configs/data/unlearn.yaml``), names given as values composed once by the entry point (``resolvers.compose_names``),
metric datasets through the metric configs' defaults lists; nothing below the entry point needs the root config."""

from __future__ import annotations

import inspect
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO, train_in_process
from resolvers import command_line_overrides, compose_names

SEED_COMMAND = ["model=SmolLM2-135M-Instruct", "trainer=GradDiff", "trainer.method_args.alpha=0.5",
                "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90", "data.eval=TOFU_QA_FORGET10_P",
                "collator=DataCollatorForSupervisedDataset"]


def _compose(overrides: list[str], config: str = "unlearn.yaml", names: bool = True):
    """As src/train.py composes: the command line's overrides, Hydra, then the names in the config."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name=config, overrides=command_line_overrides(
            [*overrides, f"paths.model_cache_dir={MODEL_CACHE}"]))
    return compose_names(cfg) if names else cfg


def _forget_lengths(cfg) -> list[int]:
    from data import get_data
    from model import get_model

    _, tokenizer = get_model(cfg.model)
    forget = get_data(cfg.data, "unlearn", tokenizer, cfg.model.template_args, need_eval=False)["forget"]
    return [len(forget[i]["input_ids"]) for i in range(len(forget))]


# ----- the default composition and ordinary overrides -------------------------------------------------------
def test_the_default_datasets_are_composed_nodes():
    cfg = _compose([], names=False)  # Hydra alone: no name left to compose
    for role, name in (("forget", "TOFU_QA_FORGET10"), ("retain", "TOFU_QA_RETAIN90"), ("eval", "TOFU_QA_FORGET10_P")):
        node = cfg.data[role]
        assert (node.name, node.handler) == (name, "QADataset") and "args" in node, role
    assert OmegaConf.select(cfg, "data.forget.args.local_dir", throw_on_resolution_failure=False) is None  # paths.tofu
    train = _compose([], "train.yaml", names=False).data
    assert train.train.name == "TOFU_QA_FULL" and train.eval is None


def test_a_forget_args_override_reaches_the_built_dataset(tofu_dir):
    """data.forget.args.max_length=... on the default composition (an ordinary Hydra override), and the
    open-unlearning form data/datasets@data.forget=<NAME> followed by the same override."""
    base = ["model=tiny-random-llama", f"paths.tofu={tofu_dir}"]
    assert max(_forget_lengths(_compose(base))) > 70  # the generated answers run past 70 tokens
    cut = _compose([*base, "data.forget.args.max_length=70"])
    assert cut.data.forget.args.max_length == 70 and cut.data.retain.args.max_length == 512
    assert max(_forget_lengths(cut)) <= 70
    assert _compose(["data.forget.args.max_length=256"]).data.forget.args.max_length == 256
    other = _compose([*base, "data/datasets@data.forget=TOFU_QA_FORGET05", "data.forget.args.max_length=256"])
    assert (other.data.forget.name, other.data.forget.args.max_length) == ("TOFU_QA_FORGET05", 256)
    assert OmegaConf.to_container(other, resolve=True)["forget_split"] == "forget05"
    assert len(_forget_lengths(other)) == len((tofu_dir / "forget05.json").read_text().splitlines())


def test_the_seed_command_composes_its_names():
    cfg = _compose([*SEED_COMMAND, "data.dataset_args.max_length=256"])
    r = OmegaConf.to_container(cfg, resolve=True)
    assert r["task_name"] == "GradDiff_TOFU_QA_FORGET10" and r["forget_split"] == "forget10"
    for role, hub_name in (("forget", "forget10"), ("retain", "retain90"), ("eval", "forget10_perturbed")):
        node = r["data"][role]
        assert node["handler"] == "QADataset" and node["args"]["hf_args"]["name"] == hub_name, role
    assert r["data"]["dataset_args"] == {"max_length": 256}
    # the other value forms of the public commands: null, a list, a name in an experiment's interpolation
    assert _compose([*SEED_COMMAND, "data.retain=null"]).data.retain is None
    listed = _compose(["data.train=[MUSE_forget,MUSE_retain]"], "train.yaml")
    assert [d.name for d in listed.data.train] == ["MUSE_forget", "MUSE_retain"]
    assert listed.task_name == "finetune_MUSE_forget+MUSE_retain"
    assert _compose(["data.retain=[TOFU_QA_RETAIN90,TOFU_QA_RETAIN95]"]).data.retain[1].args.hf_args.name == "retain95"
    tofu = _compose(["experiment=unlearn/tofu/default", "forget_split=forget05", "retain_split=retain95"])
    assert (tofu.data.forget.name, tofu.data.retain.name) == ("TOFU_QA_FORGET05", "TOFU_QA_RETAIN95")
    compose_names(tofu)  # composing twice changes nothing
    assert tofu.data.forget.name == "TOFU_QA_FORGET05"


def test_command_line_overrides_take_out_a_default_before_a_list():
    assert command_line_overrides(["data.train=[MUSE_forget,MUSE_retain]", "data.forget=TOFU_QA_FORGET05",
                                   "data.forget.args.max_length=3"]) == [
        "~data/datasets@data.train", "data.train=[MUSE_forget,MUSE_retain]", "data.forget=TOFU_QA_FORGET05",
        "data.forget.args.max_length=3"]


def test_an_unknown_dataset_name_lists_the_valid_ones():
    from data import available_datasets

    for overrides, where in ((["data.forget=TOFU_QA_NOPE"], "data.forget"),
                             (["data.retain=[TOFU_QA_RETAIN90,TOFU_QA_NOPE]"], r"data.retain\[1\]")):
        with pytest.raises(ValueError, match=rf"{where}: unknown dataset 'TOFU_QA_NOPE'; valid names: ") as error:
            _compose(overrides)
        assert ", ".join(available_datasets()) in str(error.value)
    with pytest.raises(ValueError, match=r"attack.relearn.data: unknown dataset 'TOFU_QA_NOPE'; valid names: MUSE_"):
        _compose(["attack=relearn", "attack.relearn.data=TOFU_QA_NOPE"], "eval.yaml")


# ----- metric datasets --------------------------------------------------------------------------------------
def test_metric_datasets_are_composed_by_hydra_and_resolve_in_place(tofu_dir):
    cfg = _compose([f"paths.tofu={tofu_dir}", "forget_split=forget05",
                    "eval.tofu.metrics.forget_Q_A_Prob.datasets.main.args.max_length=128"], "eval.yaml")
    metrics = OmegaConf.to_container(cfg.eval.tofu, resolve=True)["metrics"]
    main = metrics["forget_Q_A_Prob"]["datasets"]["main"]
    assert main == {"handler": "QADataset", "args": {
        "hf_args": {"path": "locuslab/TOFU", "split": "train", "name": "forget05_perturbed"}, "question_key": "question",
        "answer_key": "answer", "max_length": 128, "local_dir": str(tofu_dir), "labels_cover_chat_tail": False}}
    assert metrics["mia_loss"]["datasets"]["holdout"]["args"]["hf_args"]["name"] == "holdout05"
    para = metrics["forget_Truth_Ratio"]["pre_compute"]["forget_Q_A_PARA_Prob"]["datasets"]["main"]
    assert para["args"]["answer_key"] == "paraphrased_answer" and para["args"]["local_dir"] == str(tofu_dir)
    muse = OmegaConf.to_container(_compose(["eval=muse", "paths.muse_news=/m"], "eval.yaml").eval.muse, resolve=True)
    verbmem = muse["metrics"]["forget_verbmem_ROUGE"]["datasets"]["main"]
    assert (verbmem["name"], verbmem["handler"], verbmem["args"]["max_length"], verbmem["args"]["local_dir"]) == \
        ("MUSE_forget_verbmem", "CompletionDataset", 128, "/m")


def test_no_config_writes_a_defaults_list_inside_a_dataset():
    """Only Hydra's defaults lists (at the top of a config file) include other configs."""
    inline = [str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
              if re.search(r"^\s+defaults:", p.read_text(), flags=re.M)]
    assert not inline, inline


# ----- the saved config ---------------------------------------------------------------------------------------
def test_the_saved_config_records_the_composed_datasets_and_peft(tofu_dir, tmp_path):
    out = tmp_path / "run"
    train_in_process(out, ["model=tiny-random-llama", "trainer=GradDiff", "data.forget=TOFU_QA_FORGET01",
                           "data.retain=TOFU_QA_RETAIN99", "data.eval=null", "model.peft=lora",
                           f"paths.tofu={tofu_dir}", "trainer.args.max_steps=1", "trainer.args.logging_steps=1",
                           "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
                           "trainer.args.disable_tqdm=true"])
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.data.forget.name == "TOFU_QA_FORGET01" and saved.data.forget.handler == "QADataset"
    assert OmegaConf.to_container(saved.data.forget.args) == {
        "hf_args": {"path": "locuslab/TOFU", "split": "train", "name": "forget01"}, "question_key": "question",
        "answer_key": "answer", "max_length": 512, "local_dir": str(tofu_dir), "labels_cover_chat_tail": False}
    assert saved.data.retain.args.hf_args.name == "retain99" and saved.data.eval is None
    assert saved.task_name == "GradDiff_TOFU_QA_FORGET01" and saved.forget_split == "forget01"
    assert saved.model.peft.method == "lora" and saved.model.peft.r == 8  # model.peft=lora, composed


# ----- nothing below the entry point reads the root config ---------------------------------------------------
def test_no_hand_written_config_loader_and_no_root_config_below_the_entry_points():
    import attacks
    import data
    import evals
    from attacks import relearn
    from evals.base import Evaluator
    from evals.lm_eval import LMEvalEvaluator
    from model import peft

    assert not hasattr(data, "_load_dataset_file") and not hasattr(peft, "_load_peft_file")
    for fn in (data.get_data, data.build_dataset, data.dataset_config, data.data_input_paths, evals.get_evaluators,
               Evaluator.__init__, LMEvalEvaluator.__init__, attacks.run_attacks, relearn.relearn,
               relearn.relearning_set):
        assert "root_cfg" not in inspect.signature(fn).parameters, fn.__qualname__
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        if path.name != "compat.py":  # compat_of(root_cfg) stays for the other engineer's compat work
            assert "root_cfg" not in text, path
        # no module merges a config's defaults list by hand
        assert not re.search(r"""pop\(["']defaults["']""", text) and "_load_dataset_file" not in text, path
