"""Every shipped config composes and resolves; configs open with a comment saying how to use them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data import available_datasets, compose_dataset, get_collator
from model import available_model_configs
from resolvers import command_line_overrides, compose_names
from trainer import TRAINER_REGISTRY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINERS = sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml"))
COLLATORS = sorted(p.stem for p in (CONFIGS / "collator").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    """The config as the entry points see it: composed, then the names in it composed (``compose_names``)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose_names(compose(config_name=name, overrides=command_line_overrides(overrides)))
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation must resolve
    return cfg, resolved


@pytest.mark.parametrize("model", available_model_configs())
def test_every_model_config_composes(model):
    cfg, resolved = _compose("unlearn.yaml", [f"model={model}"])
    assert set(resolved["model"]) >= {"model_args", "tokenizer_args", "template_args"}
    assert "pretrained_model_name_or_path" in resolved["model"]["model_args"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes(trainer):
    _, resolved = _compose("unlearn.yaml", [f"trainer={trainer}", "trainer.args.max_steps=3",
                                            "trainer.args.learning_rate=1e-4"])
    assert resolved["trainer"]["handler"] in TRAINER_REGISTRY
    assert resolved["trainer"]["args"]["max_steps"] == 3


@pytest.mark.parametrize("top", ["unlearn.yaml", "train.yaml", "eval.yaml"])
def test_top_level_configs_compose(top):
    _, resolved = _compose(top, ["paths.tofu=/some/folder"])
    assert resolved["paths"]["tofu"] == "/some/folder"
    assert resolved["mode"] in ("unlearn", "train", "eval")


def test_seed_quick_start_overrides_compose():
    _, r = _compose("unlearn.yaml", [
        "model=SmolLM2-135M-Instruct", "model.model_args.pretrained_model_name_or_path=/my/model", "trainer=GradDiff",
        "trainer.method_args.alpha=0.5", "data.forget=TOFU_QA_FORGET10", "data.retain=TOFU_QA_RETAIN90",
        "data.eval=TOFU_QA_FORGET10_P", "collator=DataCollatorForSupervisedDataset",
        "trainer.args.per_device_train_batch_size=2", "data.dataset_args.max_length=256",
    ])
    # method_args holds the method's hyperparameters only; the implementation options are trainer arguments
    assert r["trainer"]["method_args"] == {"gamma": 1.0, "alpha": 0.5, "retain_loss_type": "NLL"}
    assert {k: r["trainer"]["args"][k] for k in ("nll_impl", "pack_rows", "joint_forward")} == \
        {"nll_impl": "logits", "pack_rows": "auto", "joint_forward": False}
    assert r["model"]["tokenizer_args"]["pretrained_model_name_or_path"] == "/my/model"
    assert r["paths"]["output_dir"] == "./saves/unlearn/GradDiff_TOFU_QA_FORGET10"
    # the names became composed dataset configs (handler and args), data.dataset_args kept for every dataset
    forget = r["data"]["forget"]
    assert (forget["name"], forget["handler"]) == ("TOFU_QA_FORGET10", "QADataset")
    assert forget["args"]["hf_args"] == {"path": "locuslab/TOFU", "split": "train", "name": "forget10"}
    assert (r["data"]["retain"]["name"], r["data"]["eval"]["args"]["hf_args"]["name"]) == \
        ("TOFU_QA_RETAIN90", "forget10_perturbed")
    assert r["data"]["dataset_args"]["max_length"] == 256 and r["forget_split"] == "forget10"


@pytest.mark.parametrize("name", available_datasets())
def test_every_dataset_config_resolves(name):
    root = OmegaConf.create({"paths": {"tofu": "/data/tofu", "muse_news": "/data/muse", "wmdp": "/data/wmdp"}, "seed": 3})
    cfg = OmegaConf.to_container(compose_dataset(name, root))
    assert cfg["name"] == name  # each file names itself (messages, task names)
    if name.startswith("RWKU_"):  # paths.rwku unset: the Hub; the targets' rows only
        assert cfg["args"]["local_dir"] is None and cfg["args"]["local_dir_key"] == "paths.rwku"
        assert cfg["args"]["hf_args"]["path"] == "jinzhuoran/RWKU" and cfg["args"]["hf_args"]["name"]
        assert cfg["args"]["keep_rows"]["column"] == "subject"
        return
    if name.startswith("WMDP_"):
        assert cfg["args"]["local_dir"] == "/data/wmdp" and cfg["args"]["local_name"] and cfg["args"]["hf_args"]["path"]
        return
    if name.startswith("MUSE_"):
        assert cfg["args"]["local_dir"] == "/data/muse" and cfg["args"]["local_name"]
        assert cfg["args"]["hf_args"]["path"] == "muse-bench/MUSE-News" and cfg["args"]["hf_args"]["split"]
        return
    assert cfg["args"]["local_dir"] == "/data/tofu"
    assert cfg["args"]["hf_args"]["path"] == "locuslab/TOFU" and cfg["args"]["hf_args"]["name"]


@pytest.mark.parametrize("sequence", sorted(p.stem for p in (CONFIGS / "sequence").glob("*.yaml")))
def test_every_sequence_config_composes(sequence):
    """A sequence composes with unlearn.yaml, passes its checks, and gives each fold its data, folder and start model."""
    from sequential import base_config, check_sequence, fold_config

    cfg, _ = _compose("unlearn.yaml", [f"sequence={sequence}", "eval=muse", "model.model_args.pretrained_model_name_or_path=/m"])
    seq = check_sequence(cfg)
    base = base_config(cfg, seq)
    assert base.data.forget.name == seq["forget"] and base.task_name == f"GradDiff_{seq['forget']}"
    fold = fold_config(base, 3, "/prev" if seq["start_from"] == "previous" else None)
    resolved = OmegaConf.to_container(fold, resolve=True)
    assert resolved["paths"]["output_dir"] == f"saves/unlearn/GradDiff_{seq['forget']}/fold_3"
    assert resolved["model"]["model_args"]["pretrained_model_name_or_path"] == \
        {"previous": "/prev", "target": "/m"}[seq["start_from"]]
    forget = resolved["data"]["forget"]
    assert forget["args"]["hf_args"]["split"] == "forget_3" and forget["args"]["local_fold"]["index"] == 3
    assert forget["args"]["local_fold"]["nested"] == (sequence == "muse_scal")


@pytest.mark.parametrize("name", COLLATORS)
def test_every_collator_config_builds(name, smollm2_tokenizer):
    assert callable(get_collator(OmegaConf.load(CONFIGS / "collator" / f"{name}.yaml"), smollm2_tokenizer))


def test_every_config_opens_with_a_comment():
    missing = [str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
               if not p.read_text().lstrip().startswith("#")]
    assert not missing, f"configs without an opening comment: {missing}"


def test_every_registered_trainer_has_a_config():
    handlers = {OmegaConf.load(CONFIGS / "trainer" / f"{t}.yaml").get("handler") for t in TRAINERS}
    assert set(TRAINER_REGISTRY) <= handlers


EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix("")) for p in (CONFIGS / "experiment").rglob("*.yaml"))
#: The top-level config each kind of experiment is run with (its folder: unlearn/, finetune/, eval/).
EXPERIMENT_TOP = {"unlearn": "unlearn.yaml", "finetune": "train.yaml", "eval": "eval.yaml", "sweep": "unlearn.yaml"}


def _experiment_overrides(experiment: str, every: bool) -> tuple[str, list[list[str]]]:
    """The top-level config of ``experiment`` and the overrides to compose it with: every trainer its mode runs
    and every model config (``every``), or its own settings plus one other trainer and one other model."""
    from trainer import UnlearningTrainer

    top = EXPERIMENT_TOP[experiment.split("/")[0]]
    trainers: list[str] = []
    if top == "unlearn.yaml":
        trainers = [t for t in TRAINERS if issubclass(
            TRAINER_REGISTRY[OmegaConf.load(CONFIGS / "trainer" / f"{t}.yaml").handler], UnlearningTrainer)]
    elif top == "train.yaml":
        trainers = ["finetune"]
    models = available_model_configs()
    if not every:
        trainers, models = [t for t in trainers if t in ("NPO", "finetune")], ["tiny-random-llama"]
    base = [f"experiment={experiment}"]
    return top, [base] + [[*base, f"trainer={t}"] for t in trainers] + [[*base, f"model={m}"] for m in models]


def _check_experiment(experiment: str, every: bool) -> None:
    from data import check_eval_splits
    from trainer import check_mode

    if experiment.startswith("sweep/"):  # hydra/sweeper=optuna comes with the plugin
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra: pip install -e '.[sweep]'")
    top, overrides = _experiment_overrides(experiment, every)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for override in overrides:
            cfg = compose(config_name=top, overrides=override)
            if not every or override is overrides[0]:  # the names in it compose too (as at the entry point)
                compose_names(cfg)
            resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            if top == "eval.yaml":
                assert resolved["eval"], override
                continue
            check_mode(cfg)
            check_eval_splits(cfg)
            if resolved.get("eval"):  # the result is evaluated at the end of the run
                assert resolved["trainer"]["args"]["do_eval"] is True, override
            if override[-1].startswith("trainer="):
                chosen = OmegaConf.load(CONFIGS / "trainer" / f"{override[-1].split('=')[1]}.yaml").handler
                assert resolved["trainer"]["handler"] == chosen, override


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    """Each experiment composes, resolves and passes the run's checks, with another trainer and model too."""
    _check_experiment(experiment, every=False)


@pytest.mark.slow  # ~70 s: a few hundred compositions
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_trainer_and_model(experiment):
    _check_experiment(experiment, every=True)


def test_tofu_experiment_follows_the_splits_given():
    _, r = _compose("unlearn.yaml", ["experiment=unlearn/tofu/default", "trainer=NPO", "forget_split=forget05",
                                     "retain_split=retain95"])
    assert (r["data"]["forget"]["name"], r["data"]["retain"]["name"], r["holdout_split"]) == (
        "TOFU_QA_FORGET05", "TOFU_QA_RETAIN95", "holdout05")
    assert r["eval"]["tofu"]["forget_split"] == "forget05" and r["trainer"]["handler"] == "NPO"
    args = r["trainer"]["args"]
    assert (args["learning_rate"], args["weight_decay"], args["num_train_epochs"], args["warmup_steps"]) == \
        (1e-5, 0.01, 10, 0.1)
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 32
    assert r["paths"]["output_dir"] == "./saves/unlearn/tofu_NPO_forget05"
    _, idk = _compose("unlearn.yaml", ["experiment=unlearn/tofu/idk", "forget_split=forget01", "retain_split=retain99"])
    assert (idk["trainer"]["handler"], idk["data"]["forget"]["name"]) == ("DPO", "TOFU_QA_FORGET01_IDK")
