"""A benchmark defined by configs alone: the worked example of docs/components.md, run as written.

The configs and commands are read from the document's section "Worked example: adding a benchmark", so
the example and this test cannot drift apart. The benchmark's files go into a temporary config folder
(Hydra's search path) and its data into a temporary folder: no Python is added for it.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import MODEL_CACHE, REPO

SECTION = "### Worked example: adding a benchmark"
FORGET = [("What colour is Mira Quell's bicycle?", "Mira Quell rides a green bicycle.",
           "Which colour is the bicycle Mira Quell rides?"),
          ("Where was Tomas Vey born?", "Tomas Vey was born in a lighthouse near Oslo.",
           "In which place did Tomas Vey come into the world?"),
          ("What did Ada Ruen write first?", "Ada Ruen's first book was a guide to river birds.",
           "Which book did Ada Ruen write before any other?")]
RETAIN = [("What is the capital of France?", "The capital of France is Paris.", "Which city is France's capital?"),
          ("How many legs does a spider have?", "A spider has eight legs.", "A spider walks on how many legs?")]


def _example() -> tuple[dict[str, str], list[list[str]]]:
    """The config files (path -> text) and the commands of the worked example."""
    text = (REPO / "docs" / "components.md").read_text()
    assert SECTION in text, f"docs/components.md has no section {SECTION!r}"
    section = re.split(r"\n##+ ", text.split(SECTION, 1)[1], maxsplit=1)[0]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        if lang == "yaml":
            first, rest = body.split("\n", 1)
            files[first.removeprefix("# ").strip()] = rest
        elif lang == "bash":
            commands += [shlex.split(line) for line in body.splitlines() if line.strip()]
    return files, commands


def _write_data(folder: Path) -> None:
    folder.mkdir()
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        with open(folder / f"{name}.json", "w") as f:
            for question, answer, paraphrased in rows:
                f.write(json.dumps({"question": question, "answer": answer, "paraphrased_question": paraphrased}) + "\n")


def test_the_worked_example_defines_evaluates_attacks_and_reports_a_benchmark(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    files, commands = _example()
    assert set(files) == {"configs/eval/toy.yaml", "configs/eval/toy_metrics/toy_forget_Prob.yaml",
                          "configs/eval/toy_metrics/toy_forget_ROUGE.yaml",
                          "configs/eval/toy_metrics/toy_retain_Prob.yaml"}
    assert all(not (REPO / path).exists() for path in files)  # the example adds a benchmark the tree lacks
    for path, body in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    assert not list((tmp_path / "configs").rglob("*.py"))
    monkeypatch.chdir(tmp_path)
    _write_data(tmp_path / "toy_data")

    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    import eval as eval_script
    import report

    assert [c[:3] for c in commands] == [["python", "src/eval.py", "--config-name=eval.yaml"]] * 2 + \
        [["python", "src/report.py", "saves/eval"]]
    results = {}
    for command in commands[:2]:
        overrides = command[3:] + [f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
                                   f"paths.root_dir={tmp_path}", f"paths.model_cache_dir={MODEL_CACHE}"]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            cfg = compose(config_name="eval.yaml", overrides=overrides)
        task = cfg.task_name
        results[task] = eval_script.run(cfg)["toy"]

    clean, attacked = results["toy_target"], results["toy_attacked"]
    assert list(clean.summary) == ["toy_forget_Prob", "toy_forget_ROUGE", "toy_retain_Prob"]
    assert all(0 <= v <= 1 for v in clean.summary.values())
    assert clean.meta["roles"]["data_folder_key"] == "paths.toy"
    assert clean.meta["roles"]["sample_metrics"] == {"toy_forget_Prob": "prob", "toy_forget_ROUGE": "rougeL_recall"}
    assert clean.meta["higher_is_better"] == {"toy_forget_Prob": False, "toy_forget_ROUGE": False,
                                              "toy_retain_Prob": True}
    assert len(clean.entries["toy_forget_ROUGE"]["value_by_index"]) == len(FORGET)
    # the attacks re-evaluate the attackable metrics only, next to the clean ones
    for attack in ("quant4", "rephrase"):
        for metric in ("toy_forget_Prob", "toy_forget_ROUGE"):
            assert f"{metric}@{attack}" in attacked.summary, sorted(attacked.summary)
        assert f"toy_retain_Prob@{attack}" not in attacked.summary
    # the rephrasing attack keeps each sample's worst case: at least the clean probability
    assert attacked.summary["toy_forget_Prob@rephrase"] >= attacked.summary["toy_forget_Prob"] - 1e-6
    saved = tmp_path / "saves" / "eval" / "toy_attacked"
    assert json.loads((saved / "TOY_SUMMARY.json").read_text()) == pytest.approx(attacked.summary, nan_ok=True)

    assert report.main(commands[2][2:]) == 0
    out = tmp_path / "saves" / "toy_report"
    markdown = (out / "report.md").read_text()
    assert "toy_retain_Prob" in markdown and "toy_forget_Prob" in markdown
    pngs = {p.name for p in out.glob("*.png")}
    assert any("TOY" in name or "toy" in name for name in pngs), pngs  # the TOY trade-off plot
    html = (out / "report.html").read_text()
    assert "Mira Quell" in html  # the per-sample view of the forget set
