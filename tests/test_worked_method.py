"""A new unlearning method from the worked example of docs/components.md, run as written.

The code, config, test and table row are read from the document's section "Worked example: adding
`CustomMethod`", so the example and this test cannot drift apart. The files are not added to the tree:
the Python blocks run as modules of their own, the config goes into a temporary config folder (Hydra's
search path).
"""

from __future__ import annotations

import re
import shlex
import sys
import types

import pytest
import torch

from conftest import REPO, train_in_process

SECTION = "### Worked example: adding `CustomMethod`"


def _example() -> dict[str, tuple[str, str]]:
    """The blocks of the worked example: first-line path (or language) -> (language, body without that line)."""
    text = (REPO / "docs" / "components.md").read_text()
    assert SECTION in text, f"docs/components.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        first, _, rest = body.partition("\n")
        key = first.removeprefix("# ").strip() if first.startswith("# ") else lang
        blocks[key] = (lang, rest if first.startswith("# ") else body)
    return blocks


def _as_module(name: str, source: str, monkeypatch) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<docs/components.md: {name}>", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_the_worked_example_adds_a_method_that_trains(tofu_dir, tmp_path, monkeypatch):
    import trainer
    import trainer.losses as losses
    from trainer import TRAINER_REGISTRY

    blocks = _example()
    assert set(blocks) == {"src/trainer/losses.py", "src/trainer/unlearn/custom_method.py", "src/trainer/__init__.py",
                           "configs/trainer/CustomMethod.yaml", "tests/test_losses.py", "markdown", "bash"}
    assert not (REPO / "src/trainer/unlearn/custom_method.py").exists() and "CustomMethod" not in TRAINER_REGISTRY

    # 1. the loss, added to trainer.losses
    namespace = dict(vars(losses))
    exec(blocks["src/trainer/losses.py"][1], namespace)
    monkeypatch.setattr(losses, "capped_ascent_loss", namespace["capped_ascent_loss"], raising=False)
    # 2. the method's file, 3. its registration
    method = _as_module("trainer.unlearn.custom_method", blocks["src/trainer/unlearn/custom_method.py"][1], monkeypatch)
    monkeypatch.setitem(TRAINER_REGISTRY, "CustomMethod", None)
    exec(blocks["src/trainer/__init__.py"][1], dict(vars(trainer)))
    assert TRAINER_REGISTRY["CustomMethod"] is method.CustomMethod
    # 5. the test, run as pytest would
    test_module = _as_module("worked_example_test", "import torch\nfrom trainer.losses import capped_ascent_loss\n"
                             + blocks["tests/test_losses.py"][1], monkeypatch)
    test_module.test_capped_ascent_by_hand()
    assert losses.capped_ascent_loss(torch.tensor([4.0]), ceiling=2.0).item() == -2.0  # the cap binds
    # 6. the table row has the columns of the method table in docs/methods.md
    row = blocks["markdown"][1].strip()
    header = next(line for line in (REPO / "docs/methods.md").read_text().splitlines() if line.startswith("| Method |"))
    assert row.startswith("| CustomMethod |") and row.count(" | ") == header.count(" | ")

    # 4. the config, on Hydra's search path; 7. the command, with a tiny model and local data for a test
    (tmp_path / "configs" / "trainer").mkdir(parents=True)
    (tmp_path / "configs" / "trainer" / "CustomMethod.yaml").write_text(blocks["configs/trainer/CustomMethod.yaml"][1])
    (command,) = [shlex.split(line) for line in blocks["bash"][1].splitlines() if line.strip()]
    assert command[:3] == ["python", "src/train.py", "--config-name=unlearn.yaml"]
    overrides = [*command[3:], "trainer.method_args.ceiling=12",  # above the tiny model's NLLs (~10.4): not capped
                 f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "model=tiny-random-llama",
                 f"paths.tofu={tofu_dir}", "data.eval=null", "trainer.args.max_steps=3",
                 "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
                 "trainer.args.logging_steps=1", "trainer.args.learning_rate=1e-3", "trainer.args.warmup_steps=0"]
    monkeypatch.chdir(REPO)
    separate = train_in_process(tmp_path / "separate", overrides)
    joint = train_in_process(tmp_path / "joint", [*overrides, "trainer.args.joint_forward=true"])
    assert [e["step"] for e in separate] == [1, 2, 3]
    for a, b in zip(separate, joint):  # one forward pass for forget and retain: the same losses
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["forget_loss"] == pytest.approx(b["forget_loss"],
                                                                                                     rel=1e-4)
    assert all("retain_loss" in e for e in separate)
