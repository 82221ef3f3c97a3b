"""WMDP: RMU's unlearning corpora (one document per sample, cut to 512 tokens) and the published RMU recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, train_in_process
from data import build_dataset, compose_dataset
from data.text import PretrainingDataset
from data.utils import IGNORE_INDEX

WMDP_DATASETS = ["WMDP_forget_bio", "WMDP_forget_cyber", "WMDP_retain_bio", "WMDP_retain_cyber", "WMDP_retain_wikitext"]


def _write_rows(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose("unlearn.yaml", overrides=overrides)


def test_per_row_samples_are_each_documents_first_tokens(smollm2_tokenizer, tmp_path):
    """chunking=per_row: one sample per row longer than min_len_chars, its first max_length tokens, all labelled."""
    texts = ["too short to keep",  # 17 characters: dropped by min_len_chars=20
             "The quick brown fox jumps over the lazy dog, again and again and again.",
             "A second document that is long enough to be kept by the filter."]
    _write_rows(tmp_path / "docs.json", texts)
    ds = PretrainingDataset({"path": "unused"}, smollm2_tokenizer, local_dir=str(tmp_path), local_name="docs",
                            chunking="per_row", max_length=8, min_len_chars=20)
    expected = [smollm2_tokenizer(t, add_special_tokens=False)["input_ids"][:8] for t in texts[1:]]
    assert len(ds) == 2 and all(len(e) == 8 for e in expected)
    for i, ids in enumerate(expected):
        assert ds[i]["input_ids"].tolist() == ids and ds[i]["labels"].tolist() == ids  # SmolLM2: no BOS
    assert ds.num_tokens == 16
    # min_len_chars applies to concatenated corpora too: the short row is not part of the text
    joined = PretrainingDataset({"path": "unused"}, smollm2_tokenizer, local_dir=str(tmp_path), local_name="docs",
                                max_length=1000, min_len_chars=20)
    assert joined.num_tokens == len(smollm2_tokenizer("\n\n".join(texts[1:]), add_special_tokens=False)["input_ids"])


def test_per_row_rejects_bad_settings(smollm2_tokenizer, tmp_path):
    _write_rows(tmp_path / "docs.json", ["tiny", "small"])
    args = dict(local_dir=str(tmp_path), local_name="docs", name="WMDP_x")
    with pytest.raises(ValueError, match="WMDP_x: chunking='rows'; valid: concatenate, per_row"):
        PretrainingDataset({"path": "unused"}, smollm2_tokenizer, chunking="rows", **args)
    with pytest.raises(ValueError, match=r"is empty \(0 of 2 rows longer than min_len_chars=50\)"):
        PretrainingDataset({"path": "unused"}, smollm2_tokenizer, chunking="per_row", min_len_chars=50, **args)


@pytest.mark.parametrize("name", WMDP_DATASETS)
def test_wmdp_corpora_follow_rmu(name):
    """RMU's data rules on every corpus: per document, 512 tokens, > 50 characters; paths.wmdp switches to local files."""
    hub = OmegaConf.to_container(compose_dataset(name, {"paths": {"wmdp": None}}))["args"]
    assert hub["local_dir"] is None and hub["hf_args"]["split"] in ("train", "test")
    args = OmegaConf.to_container(compose_dataset(name, {"paths": {"wmdp": "/data/wmdp"}}))["args"]
    assert (args["chunking"], args["max_length"], args["min_len_chars"]) == ("per_row", 512, 50)
    assert args["local_dir"] == "/data/wmdp" and args["local_dir_key"] == "paths.wmdp"


def test_rmu_experiment_has_the_published_settings():
    cfg = OmegaConf.to_container(_compose(["experiment=unlearn/wmdp/default"]), resolve=True)
    assert cfg["model"]["model_args"]["pretrained_model_name_or_path"] == "HuggingFaceH4/zephyr-7b-beta"
    assert cfg["trainer"]["handler"] == "RMU"
    method = cfg["trainer"]["method_args"]
    assert (method["layer_id"], method["steering_coeff"], method["alpha"]) == (7, 6.5, 1200.0)
    args = cfg["trainer"]["args"]
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"], args["max_steps"]) == (4, 1, 150)
    assert (args["learning_rate"], args["weight_decay"], args["lr_scheduler_type"], args["warmup_steps"]) == \
        (5e-5, 0.0, "constant", 0)
    assert cfg["data"]["forget"] == ["WMDP_forget_bio", "WMDP_forget_cyber"]
    assert cfg["data"]["retain"] == "WMDP_retain_wikitext"
    assert cfg["paths"]["output_dir"].endswith("saves/unlearn/wmdp_RMU_zephyr-7b-beta")
    from trainer.unlearn.rmu import default_trainable_params

    assert default_trainable_params(7) == [r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"]


@pytest.fixture()
def wmdp_dir(tmp_path) -> Path:
    folder = tmp_path / "wmdp"
    folder.mkdir()
    topics = {"bio-forget-corpus": "pathogen", "cyber-forget-corpus": "exploit", "wikitext_test": "river"}
    for stem, word in topics.items():
        _write_rows(folder / f"{stem}.jsonl", [f"short {word}"] +
                    [f"Document {i} about the {word}: " + " ".join([word] * (20 + 7 * i)) for i in range(6)])
    return folder


def test_rmu_experiment_runs_on_local_corpora(wmdp_dir, tmp_path, smollm2_tokenizer):
    """Two RMU steps of the WMDP recipe on a 2-layer model: finite losses, only the chosen down_proj weights move."""
    out = tmp_path / "rmu"
    steps = train_in_process(out, [
        "experiment=unlearn/wmdp/default", "model=tiny-random-llama", f"paths.wmdp={wmdp_dir}",
        "trainer.method_args.layer_id=1", "trainer.method_args.steering_coeff=2.0", "trainer.args.max_steps=2",
        "trainer.args.per_device_train_batch_size=2", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true",
        "data.dataset_args.max_length=32"])
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    # the forget set: both corpora, one sample per kept document, each cut to 32 tokens
    root = _compose([f"paths.wmdp={wmdp_dir}"])
    bio = build_dataset(compose_dataset("WMDP_forget_bio", root), smollm2_tokenizer, dataset_args={"max_length": 32})
    assert len(bio) == 6 and max(bio.lengths()) == 32 and all(IGNORE_INDEX not in bio[i]["labels"] for i in range(6))

    import model as model_pkg

    cfg = _compose(["model=tiny-random-llama"])
    initial, _ = model_pkg.get_model(cfg.model)
    before = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    after = load_file(str(out / "model.safetensors"))
    moved = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert moved == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
