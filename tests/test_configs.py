"""Every shipped config composes and resolves; configs open with a comment saying how to use them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data import available_datasets, dataset_config, get_collator
from model import available_model_configs
from trainer import TRAINER_REGISTRY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINERS = sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml"))
COLLATORS = sorted(p.stem for p in (CONFIGS / "collator").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name=name, overrides=overrides)
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
    assert r["trainer"]["method_args"] == {"gamma": 1.0, "alpha": 0.5, "retain_loss_type": "NLL", "nll_impl": "logits", "joint_forward": False,
                                            "pack_rows": "auto"}
    assert r["model"]["tokenizer_args"]["pretrained_model_name_or_path"] == "/my/model"
    assert r["paths"]["output_dir"] == "./saves/unlearn/GradDiff_TOFU_QA_FORGET10"


@pytest.mark.parametrize("name", available_datasets())
def test_every_dataset_config_resolves(name):
    root = OmegaConf.create({"paths": {"tofu": "/data/tofu", "muse_news": "/data/muse", "wmdp": "/data/wmdp"}, "seed": 3})
    cfg = dataset_config(name, root)
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
    assert base.data.forget == seq["forget"] and base.task_name == f"GradDiff_{seq['forget']}"
    fold = fold_config(base, 3, "/prev" if seq["start_from"] == "previous" else None)
    resolved = OmegaConf.to_container(fold, resolve=True)
    assert resolved["paths"]["output_dir"] == f"saves/unlearn/GradDiff_{seq['forget']}/fold_3"
    assert resolved["model"]["model_args"]["pretrained_model_name_or_path"] == \
        {"previous": "/prev", "target": "/m"}[seq["start_from"]]
    forget = dataset_config(resolved["data"]["forget"], fold)
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
