"""src/report.py and the package src/reporting/: runs collected from folders written in the formats of
src/train.py and src/eval.py, EVAL files carrying the benchmark roles in ``_meta.roles`` like the real ones."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import report
import reporting

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

DIRECTIONS = {"forget_quality": True, "forget_Q_A_Prob": False, "forget_Q_A_ROUGE": False,
              "model_utility": True, "privleak": None}

QUESTIONS = ["Who wrote <b>The Copper Compass</b>?", "Where was Quentin Brennagh born?",
             "What did Ines Gallardo's mother do?"]
ANSWERS = ["Ines Gallardo wrote it.", "He was born in Izmir, Turkey.", "She was a mail carrier."]


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _write_jsonl(path: Path, entries) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


def _write_config(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


ROLE_LISTS = ("headline_metrics", "trajectory_metrics", "log_axis_metrics", "attackable_metrics")


def roles_meta(headline=(), trajectory=(), log_axis=(), attackable=(), sample_metrics=None,
               data_folder_key=None) -> dict:
    """``_meta.roles`` as ``evals.benchmark.BenchmarkRoles.as_meta`` writes it (``sample_metrics``: metric ->
    the per-sample field shown)."""
    return {"data_folder_key": data_folder_key, "headline_metrics": list(headline),
            "trajectory_metrics": list(trajectory), "log_axis_metrics": list(log_axis),
            "attackable_metrics": list(attackable), "sample_metrics": dict(sample_metrics or {})}


def config_roles(bench: str, sample_fields: dict) -> dict:
    """The roles of the real benchmark config ``configs/eval/<bench>.yaml`` (what its EVAL files record)."""
    cfg = yaml.safe_load((REPO / "configs" / "eval" / f"{bench}.yaml").read_text(encoding="utf-8"))
    lists = [cfg.get(key) or [] for key in ROLE_LISTS]
    return roles_meta(*lists, sample_metrics={m: sample_fields[m] for m in cfg.get("sample_metrics") or []},
                      data_folder_key=cfg.get("data_folder_key"))


TOFU_ROLES = config_roles("tofu", {"forget_Q_A_Prob": "prob", "forget_Q_A_ROUGE": "rougeL_recall"})


def write_tofu_eval(folder: Path, summary: dict, generations: list[str], probs: list[float], rouges: list[float],
                    model: str, retain_logs_path: str | None = None, roles: dict | None = TOFU_ROLES) -> None:
    """TOFU_SUMMARY.json and TOFU_EVAL.json in the evaluator's layout (three forget samples); ``roles=None``:
    an EVAL file of an older version, without ``_meta.roles``."""
    _write_json(folder / "TOFU_SUMMARY.json", summary)
    eval_log = {
        "forget_Q_A_Prob": {"agg_value": summary.get("forget_Q_A_Prob"), "value_by_index": {
            str(i): {"prob": p, "avg_loss": 1.0} for i, p in enumerate(probs)}},
        "forget_Q_A_ROUGE": {"agg_value": summary.get("forget_Q_A_ROUGE"), "value_by_index": {
            str(i): {"rouge1_recall": r, "rougeL_f1": r, "rougeL_recall": r, "input": QUESTIONS[i],
                     "ground_truth": ANSWERS[i], "generation": generations[i]} for i, r in enumerate(rouges)}},
        "forget_quality": {"agg_value": summary.get("forget_quality"), "pvalue": summary.get("forget_quality")},
        "model_utility": {"agg_value": summary.get("model_utility")},
        "privleak": {"agg_value": summary.get("privleak"), "auc": 0.4, "ref_auc": 0.5},
        "_meta": {"model": model, "evaluator": "TOFU",
                  "splits": {"forget_split": "forget10", "holdout_split": "holdout10",
                             "retain_logs_path": retain_logs_path},
                  "split_sizes": {"forget": 3, "holdout": 3}, "timestamp": "2026-01-01T00:00:00+00:00",
                  "higher_is_better": DIRECTIONS},
    }
    if roles is not None:
        eval_log["_meta"]["roles"] = roles
    _write_json(folder / "TOFU_EVAL.json", eval_log)


def eval_config(task_name: str, model: str, retain_logs_path: str | None = None) -> dict:
    return {"mode": "eval", "task_name": task_name, "forget_split": "forget10",
            "model": {"model_args": {"pretrained_model_name_or_path": model}},
            "retain_logs_path": retain_logs_path}


def unlearn_config(task_name: str, alpha: float, model: str, retain_logs_path: str) -> dict:
    return {
        "mode": "unlearn", "task_name": task_name, "seed": 0, "forget_split": "forget10",
        "data": {"forget": "TOFU_QA_FORGET10", "retain": "TOFU_QA_RETAIN90"},
        "model": {"model_args": {"pretrained_model_name_or_path": model}},
        "retain_logs_path": retain_logs_path,
        "eval": {"tofu": {"handler": "Evaluator", "name": "TOFU", "retain_logs_path": retain_logs_path}},
        "trainer": {"handler": "GradDiff",
                    "method_args": {"gamma": 1.0, "alpha": alpha, "retain_loss_type": "NLL",
                                    "joint_forward": False, "nll_impl": "logits", "pack_rows": "auto"},
                    "args": {"learning_rate": 1e-5, "num_train_epochs": 2, "max_steps": -1,
                             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                             "warmup_steps": 0, "weight_decay": 0.01}},
    }


def train_log(with_eval_entries: bool) -> list[dict]:
    entries = []
    for step in range(1, 9):
        entries.append({"loss": 2.0 - 0.1 * step, "grad_norm": 1.5, "learning_rate": 1e-5, "epoch": step / 4,
                        "step": step, "forget_loss": -1.0 * step, "retain_loss": 0.9 + 0.01 * step})
        if with_eval_entries and step % 4 == 0:
            entries.append({"eval_tofu_forget_quality": 0.01 * step, "eval_tofu_model_utility": 0.5 - 0.01 * step,
                            "eval_runtime": 1.2, "epoch": step / 4, "step": step})
    entries.append({"train_runtime": 12.3, "train_loss": 1.5, "train_samples_per_second": 3.0, "step": 8,
                    "epoch": 2.0, "total_flos": 1000.0})
    return entries


SUMMARIES = {
    "target": {"forget_quality": 1.234567891234e-05, "forget_Q_A_Prob": 0.912345678, "forget_Q_A_ROUGE": 0.95,
               "model_utility": 0.6123456789, "privleak": -80.5},
    "retain": {"forget_quality": 1.0, "forget_Q_A_Prob": 0.2, "forget_Q_A_ROUGE": 0.4,
               "model_utility": 0.58, "privleak": 0.0},
    "ga_a1": {"forget_quality": 0.0, "forget_Q_A_Prob": 0.0123456789012, "forget_Q_A_ROUGE": 0.05,
              "model_utility": 0.5, "privleak": 30.25},
    "ga_a05": {"forget_quality": 0.2, "forget_Q_A_Prob": 0.15, "forget_Q_A_ROUGE": 0.3,
               "model_utility": 0.45, "privleak": None},
    "old": {"forget_quality": None, "forget_Q_A_Prob": 0.5, "forget_Q_A_ROUGE": 0.6,
            "model_utility": 0.55, "privleak": 5.0},
}


def build_saves(root: Path) -> dict[str, Path]:
    """A target and a retain evaluation, two GradDiff runs (alpha 1 and 0.5), an old evaluation folder without
    config, and folders that are not runs (a staging folder, a checkpoint's evals)."""
    saves = root / "saves"
    target_model, retain_model = root / "models" / "target", root / "models" / "retain"
    paths = {"target": saves / "eval" / "target", "retain": saves / "eval" / "retain90",
             "ga_a1": saves / "unlearn" / "graddiff_a1", "ga_a05": saves / "unlearn" / "graddiff_a05",
             "old": saves / "eval" / "old_eval"}
    retain_eval = str(paths["retain"] / "TOFU_EVAL.json")

    write_tofu_eval(paths["target"], SUMMARIES["target"], ANSWERS, [0.9, 0.95, 0.88], [1.0, 0.9, 0.95],
                    str(target_model))
    _write_config(paths["target"] / "config.yaml", eval_config("tofu_target", str(target_model)))
    write_tofu_eval(paths["retain"], SUMMARIES["retain"], ["I do not know."] * 3, [0.2, 0.1, 0.3],
                    [0.2, 0.4, 0.6], str(retain_model))
    _write_config(paths["retain"] / "config.yaml", eval_config("tofu_retain90", str(retain_model)))

    for key, alpha, with_history in (("ga_a1", 1.0, True), ("ga_a05", 0.5, False)):
        run = paths[key]
        _write_config(run / "config.yaml", unlearn_config(f"GradDiff_{key}", alpha, str(target_model), retain_eval))
        _write_jsonl(run / "train_log.jsonl", train_log(with_eval_entries=not with_history))
        after = ["Nobody knows.", "In a city.", "Something."] if key == "ga_a1" else ["Ines.", "Izmir.", "Mail."]
        write_tofu_eval(run / "evals", SUMMARIES[key], after, [0.01, 0.02, 0.006], [0.0, 0.1, 0.05],
                        str(run), retain_eval)
        if with_history:
            _write_jsonl(run / "eval_history.jsonl", [
                {"step": s, "epoch": s / 4, "evaluator": "tofu", "name": "TOFU",
                 "summary": {"forget_quality": 0.001 * s, "model_utility": 0.6 - 0.01 * s,
                             "forget_Q_A_Prob": 0.9 - 0.1 * s, "forget_Q_A_ROUGE": 0.9 - 0.1 * s,
                             "privleak": -80.0 + 10 * s}} for s in (4, 8)])
            _write_json(run / "best_checkpoint.json", {"metric": "eval_tofu_model_utility", "value": 0.56, "step": 4,
                                                       "constraint": "forget_quality >= 0.001",
                                                       "checkpoint": "checkpoint-4"})
            _write_json(run / "checkpoint-4" / "evals" / "TOFU_SUMMARY.json", SUMMARIES["target"])
        _write_json(run / "run_complete.json", {"finished": "2026-01-01T00:00:00+00:00"})

    _write_json(paths["old"] / "TOFU_SUMMARY.json", SUMMARIES["old"])
    staging = saves / "unlearn" / "graddiff_a2.incomplete-123-456-abc"
    _write_config(staging / "config.yaml", unlearn_config("staging", 2.0, str(target_model), retain_eval))
    _write_json(staging / "run_complete.json", {})
    _write_json(staging / "evals" / "TOFU_SUMMARY.json", SUMMARIES["target"])
    _write_json(saves / "eval" / "old.replaced-99" / "TOFU_SUMMARY.json", SUMMARIES["target"])
    return paths


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The fixture folders and the report written from them (main runs once for the module)."""
    root = tmp_path_factory.mktemp("report")
    paths = build_saves(root)
    out = root / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = report.main([str(root / "saves" / "unlearn"), str(root / "saves" / "eval"), "--out", str(out),
                          "--title", "Test report"])
    return SimpleNamespace(root=root, paths=paths, out=out, rc=rc, printed=buf.getvalue(), rows=_read_csv(out),
                           html=(out / "report.html").read_text(encoding="utf-8"),
                           md=(out / "report.md").read_text(encoding="utf-8"))


def _read_csv(out: Path) -> list[dict]:
    with open(out / "report.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _row(made, task_name: str) -> dict:
    matches = [r for r in made.rows if r["name"] == task_name]
    assert len(matches) == 1, [r["name"] for r in made.rows]
    return matches[0]


def test_outputs_written_and_path_printed(made):
    assert made.rc == 0
    assert made.printed.strip().splitlines()[-1] == str(made.out / "report.html")
    for name in ("report.md", "report.csv", "report.html"):
        assert (made.out / name).is_file()
    assert not [p for p in made.out.iterdir() if p.name.endswith(".tmp")]


def test_runs_found_and_staging_skipped(made):
    names = [r["name"] for r in made.rows]
    assert sorted(names) == sorted(["tofu_target", "tofu_retain90", "GradDiff_ga_a1", "GradDiff_ga_a05", "old_eval"])
    assert _row(made, "old_eval")["method"] == "?"
    assert _row(made, "GradDiff_ga_a1")["method"] == "GradDiff"


def test_an_unreadable_run_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    """A non-UTF-8 train log, a config.yaml of the wrong shape or one that is not UTF-8: the report is still
    written, each bad file or run named in a warning."""
    root = tmp_path / "r"
    paths = build_saves(root)
    good = paths["ga_a1"]
    (good / "train_log.jsonl").write_bytes(b'{"loss": 1.0, "step": 1}\n\xff\xfe not text\n')
    (paths["ga_a05"] / "config.yaml").write_bytes(b"trainer: \xff\n")
    (paths["retain"] / "config.yaml").write_text("trainer: [not, a, mapping]\nmode: unlearn\n")
    caplog.set_level("WARNING")
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(root / "saves"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert f"{good / 'train_log.jsonl'} line 2 is not UTF-8 text" in caplog.text
    assert f"cannot read {paths['ga_a05'] / 'config.yaml'}" in caplog.text
    rows = {r["name"] for r in _read_csv(tmp_path / "out")}
    assert "GradDiff_ga_a1" in rows and "tofu_target" in rows
    # the run whose config has the wrong shape is still listed
    assert "retain90" in rows  # named after its folder: its config names no task

    # whatever else goes wrong reading one run, the others are reported and that one named
    from reporting import collect

    real = collect.load_run
    broken = paths["target"]

    def load_run(path, kind):
        if path.resolve() == broken.resolve():
            raise KeyError("trainer")
        return real(path, kind)

    caplog.clear()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(collect, "load_run", load_run)
        assert report.main([str(root / "saves"), "--out", str(tmp_path / "out2")]) == 0
    assert f"skipping the run in {broken}: KeyError" in caplog.text
    assert "tofu_target" not in {r["name"] for r in _read_csv(tmp_path / "out2")}


def test_roles_and_order(made):
    assert [(r["name"], r["role"]) for r in made.rows[:2]] == [("tofu_target", "target"), ("tofu_retain90", "retain")]
    assert {r["role"] for r in made.rows[2:]} == {"run"}
    # then by method ("?" < "GradDiff"), then name, numbers in names compared as numbers (a1 < a05 = a5)
    assert [r["name"] for r in made.rows[2:]] == ["old_eval", "GradDiff_ga_a1", "GradDiff_ga_a05"]


def test_table_values_equal_summaries(made):
    names = {"target": "tofu_target", "retain": "tofu_retain90", "ga_a1": "GradDiff_ga_a1",
             "ga_a05": "GradDiff_ga_a05", "old": "old_eval"}
    for key, summary in SUMMARIES.items():
        row = _row(made, names[key])
        for metric, value in summary.items():
            if value is None:
                assert row[metric] == "", (key, metric)
            else:
                assert float(row[metric]) == value, (key, metric)
        assert Path(row["path"]) == made.paths[key].resolve()


def test_hyperparameter_columns(made):
    header = list(made.rows[0])
    assert "alpha" in header and "learning_rate" in header
    for constant in ("gamma", "retain_loss_type", "num_train_epochs", "effective_batch_size"):
        assert constant not in header
    for knob in ("joint_forward", "nll_impl", "pack_rows"):
        assert knob not in header
    assert float(_row(made, "GradDiff_ga_a05")["alpha"]) == 0.5
    assert float(_row(made, "GradDiff_ga_a1")["learning_rate"]) == 1e-5
    assert _row(made, "tofu_target")["alpha"] == ""


def test_arrows_follow_meta(made):
    header = next(line for line in made.md.splitlines() if line.startswith("| name"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert "forget_quality ↑" in cells
    assert "model_utility ↑" in cells
    assert "forget_Q_A_Prob ↓" in cells
    assert "forget_Q_A_ROUGE ↓" in cells
    assert "privleak" in cells
    assert "direction of more forgetting / better utility" in made.md
    # 4 significant digits and n/a in the markdown table
    assert "1.235e-05" in made.md and "0.6123" in made.md and "n/a" in made.md


def test_pngs_valid_and_embedded(made):
    pngs = sorted(made.out.glob("*.png"))
    assert {p.name for p in pngs} == {"TOFU_tradeoff.png", "trajectories.png", "loss_terms.png"}
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR", png
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', made.html)
    assert made.html.count("data:image/png;base64") == len(pngs) == len(embedded)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)


def test_html_self_contained(made):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", made.html)
    assert "http://" not in made.html and "https://" not in made.html
    assert "<link rel=\"stylesheet\"" not in made.html and "<script src" not in made.html
    assert "<style>" in made.html and "<script>" in made.html


def test_notes_on_plots(made):
    # ga_a1 has forget_quality 0 (clipped on the log axis the roles ask for)
    assert "GradDiff_ga_a1" in made.md.split("forget_quality of 0 drawn at 1e-20")[1].splitlines()[0]
    assert "Drawn on a log scale (0 at 1e-20): forget_quality." in made.md
    # the trade-off caption is built from the headline metrics and their directions
    assert "### TOFU: forget_quality vs model_utility" in made.md and "Up and to the right is better." in made.md


def test_old_evaluation_without_roles_gets_one_note(made):
    """old_eval has a SUMMARY but no EVAL file (so no _meta.roles): it stays in the table, is left out of the
    plots (not even listed as left out of the trade-off plot), and one note names its missing EVAL file."""
    assert _row(made, "old_eval")["model_utility"] == "0.55"
    notes = [line for line in made.md.splitlines() if "_meta.roles" in line and line.startswith("- ")]
    assert len(notes) == 1, notes
    assert f"old_eval: {made.paths['old'] / 'TOFU_EVAL.json'} (missing)" in notes[0]
    assert "Re-run" in notes[0]
    assert "Left out" not in made.md.split("## Plots")[1]
    assert "_meta.roles" in made.html


def test_per_sample_view(made):
    html_text = made.html
    assert html_text.count("<details") == 2  # one per unlearning run
    assert "&lt;b&gt;The Copper Compass&lt;/b&gt;" in html_text
    assert "<b>The Copper Compass" not in html_text
    assert "Where was Quentin Brennagh born?" in html_text
    assert "He was born in Izmir, Turkey." in html_text  # before (target) and ground truth
    assert "Nobody knows." in html_text and "Izmir." in html_text  # after, per run
    assert 'data-key="change"' in html_text
    # column headers from the roles' sample metrics and their per-sample fields
    for header in ("forget_Q_A_Prob (prob) before", "forget_Q_A_ROUGE (rougeL_recall) after",
                   "change of forget_Q_A_Prob (prob), after − before", "generation before", "ground truth"):
        assert f">{header}</th>" in html_text, header
    # report.md: the short summary, biggest probability drop first (0.95 -> 0.02 for sample 1)
    section = made.md.split("### GradDiff_ga_a1: TOFU")[1]
    first = next(line for line in section.splitlines() if line.startswith("| 1 "))
    assert "-0.93" in first
    assert "Best checkpoints" in made.md and "step 4" in made.md


def test_missing_folder_is_an_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(SystemExit) as err:
        report.main([str(missing)])
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_folder_without_runs_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(SystemExit) as err:
        report.main([str(tmp_path)])
    message = str(err.value)
    assert str(tmp_path) in message and "run_complete.json" in message and "_SUMMARY.json" in message


def test_explicit_roles(tmp_path):
    paths = build_saves(tmp_path)
    runs = reporting.find_runs([tmp_path / "saves"])
    ordered = reporting.assign_roles(runs, target=paths["old"], retain=paths["retain"] / "TOFU_EVAL.json")
    roles = {r.name: r.role for r in ordered}
    assert roles["old_eval"] == "target" and roles["tofu_retain90"] == "retain" and roles["tofu_target"] == "run"
    assert ordered[0].name == "old_eval"
    with pytest.raises(reporting.ReportError, match="--target"):
        reporting.assign_roles(runs, target=tmp_path / "models")


def test_roles_given_on_the_command_line_and_default_out(tmp_path, capsys):
    paths = build_saves(tmp_path)
    unlearn = tmp_path / "saves" / "unlearn"
    assert report.main([str(unlearn), "--target", str(paths["old"]), "--retain", str(paths["retain"])]) == 0
    assert capsys.readouterr().out.strip() == str(unlearn / "report" / "report.html")
    rows = _read_csv(unlearn / "report")
    assert [(r["name"], r["role"]) for r in rows] == [
        ("old_eval", "target"), ("tofu_retain90", "retain"), ("GradDiff_ga_a1", "run"), ("GradDiff_ga_a05", "run")]


def test_metric_directions_fallback():
    registry = {"privleak": SimpleNamespace(higher_is_better=None), "mia_loss": SimpleNamespace(higher_is_better=False)}
    metas = iter([{"higher_is_better": {"forget_quality": True}}, None, {"evaluator": "TOFU"}])
    got = reporting.metric_directions(["forget_quality", "mia_loss", "privleak", "unknown"], metas, registry)
    assert got == {"forget_quality": True, "mia_loss": False, "privleak": None, "unknown": None}

    def metas_then_fail():
        yield {"higher_is_better": {"a": False}}
        raise AssertionError("read past the first _meta that answered everything")

    assert reporting.metric_directions(["a"], metas_then_fail(), registry={}) == {"a": False}


def test_hyperparameters_and_varying_keys():
    config = unlearn_config("x", 0.5, "m", "r")
    config["trainer"]["args"]["max_steps"] = 20
    assert reporting.hyperparameters(config) == {"gamma": 1.0, "alpha": 0.5, "retain_loss_type": "NLL",
                                              "learning_rate": 1e-5, "max_steps": 20, "effective_batch_size": 8}
    assert reporting.hyperparameters({"mode": "eval"}) == {}
    params = [{"alpha": 1.0, "gamma": 1.0, "learning_rate": 1e-5}, {"alpha": 0.5, "gamma": 1.0, "learning_rate": 1e-5},
              {"gamma": 1.0, "learning_rate": 1e-5}]
    assert reporting.varying_keys(params) == ["alpha", "learning_rate"]


def test_same_path_relative_suffix(tmp_path):
    target = tmp_path / "saves" / "eval" / "retain90" / "TOFU_EVAL.json"
    assert reporting.same_path(str(target), target)
    assert reporting.same_path("saves/eval/retain90/TOFU_EVAL.json", target)
    assert not reporting.same_path("saves/eval/retain95/TOFU_EVAL.json", target)


def test_per_sample_rows_change():
    after = {"forget_Q_A_ROUGE": {"value_by_index": {"1": {"input": "q1", "rougeL_recall": 0.0, "generation": "x"},
                                                     "0": {"input": "q0", "rougeL_recall": 0.5, "generation": "y"}}},
             "forget_Q_A_Prob": {"value_by_index": {"0": {"prob": 0.25}, "1": {"prob": 0.5}}}}
    before = {"forget_Q_A_ROUGE": {"value_by_index": {"0": {"rougeL_recall": 1.0, "generation": "b0"}}},
              "forget_Q_A_Prob": {"value_by_index": {"0": {"prob": 0.75}}}}
    columns, rows = reporting.per_sample_rows(after, before, {"forget_Q_A_Prob": "prob",
                                                              "forget_Q_A_ROUGE": "rougeL_recall"})
    assert [r["index"] for r in rows] == ["0", "1"]  # the indexes of the first sample metric
    assert rows[0]["before"] == "b0" and rows[0]["after"] == "y" and rows[0]["change"] == pytest.approx(-0.5)
    assert rows[0]["forget_Q_A_ROUGE:before"] == 1.0 and rows[0]["question"] == "q0"
    assert rows[1]["before"] is None and rows[1]["change"] is None
    assert [c.key for c in columns] == ["index", "question", "before", "after", "forget_Q_A_Prob:before",
                                        "forget_Q_A_Prob:after", "forget_Q_A_ROUGE:before", "forget_Q_A_ROUGE:after",
                                        "change"]  # no entry carries ground_truth: no such column


MUSE_ROLES = config_roles("muse", {"forget_knowmem_ROUGE": "rougeL_f1"})


def write_eval(folder: Path, name: str, summary: dict, roles: dict | None, entries: dict | None = None,
               directions: dict | None = None, config: dict | None = None) -> None:
    """``<name>_SUMMARY.json`` and ``<name>_EVAL.json`` of any benchmark (``roles=None``: no ``_meta.roles``)."""
    _write_json(folder / f"{name}_SUMMARY.json", summary)
    meta = {"evaluator": name, "higher_is_better": directions or {}}
    if roles is not None:
        meta["roles"] = roles
    data = {m: {"agg_value": v} for m, v in summary.items()}
    data.update(entries or {})
    _write_json(folder / f"{name}_EVAL.json", {**data, "_meta": meta})
    if config is not None:
        _write_config(folder / "config.yaml", config)


def test_muse_plot_and_skipped_plots(tmp_path):
    """MUSE's roles give its trade-off plot (knowledge kept across, verbatim memory up, linear); a run with a
    null headline value is listed as left out; nothing was trained: the step plots are skipped with a note."""
    directions = {"forget_verbmem_ROUGE": False, "retain_knowmem_ROUGE": True}
    for name, knowmem, verbmem in (("target", 0.5, 0.6), ("retain", 0.48, 0.2), ("a", 0.4, 0.1), ("b", 0.3, None)):
        write_eval(tmp_path / "saves" / name, "MUSE", {"forget_verbmem_ROUGE": verbmem,
                                                        "retain_knowmem_ROUGE": knowmem, "privleak": 1.0},
                   MUSE_ROLES, directions=directions)
    runs = reporting.find_runs([tmp_path / "saves"])
    for run in runs:
        run.role = {"target": "target", "retain": "retain"}.get(run.name, "run")
    figures = {f.key: f for f in reporting.make_figures(runs, tmp_path, directions)}
    assert list(figures) == ["MUSE_tradeoff", "trajectories", "loss_terms"]
    muse = figures["MUSE_tradeoff"]
    assert muse.path == tmp_path / "MUSE_tradeoff.png" and muse.path.read_bytes().startswith(PNG_SIGNATURE)
    assert muse.title == "MUSE: forget_verbmem_ROUGE vs retain_knowmem_ROUGE"
    assert "Down and to the right is better." in muse.caption and "log scale" not in muse.caption
    assert muse.notes == ["Left out (retain_knowmem_ROUGE or forget_verbmem_ROUGE is null): b."]
    assert figures["trajectories"].path is None and "skipped" in figures["trajectories"].notes[0]
    assert figures["loss_terms"].path is None and "skipped" in figures["loss_terms"].notes[0]


def test_no_tradeoff_without_two_headline_metrics(tmp_path):
    """A benchmark whose roles name no headline pair (lm_eval's default) gets a note, not a plot."""
    write_eval(tmp_path / "saves" / "a", "LMEval", {"mmlu_acc": 0.3, "wmdp_bio_acc": 0.25},
               config_roles("lm_eval", {}))
    runs = reporting.find_runs([tmp_path / "saves"])
    figures = reporting.make_figures(runs, tmp_path)
    assert figures[0].key == "tradeoff" and figures[0].path is None
    assert "no benchmark of these runs declares two headline metrics" in figures[0].notes[0]
    assert not list(tmp_path.glob("*_tradeoff*.png"))


# ---------------------------------------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not installed (apt-get install chromium; `make test-slow` installs it)")


def _render(browser: str, url: str, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console lines the page produced."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines()
               if "Uncaught" in line or "Console error" in line or (":CONSOLE" in line and "file://" in line)]
    return proc.stdout, console


@pytest.mark.slow
def test_html_in_headless_chromium(made, tmp_path):
    browser = _chromium()
    # the console capture works: a page with an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('x'); notDefined();</script></body></html>")
    _, console = _render(browser, bad.as_uri(), tmp_path)
    assert any("Uncaught" in line for line in console), console

    page = (made.out / "report.html").as_uri()
    dom, console = _render(browser, page, tmp_path)
    assert console == []
    assert '<table class="sortable" id="runs"' in dom
    assert dom.count("<img ") == len(list(made.out.glob("*.png")))

    dom, console = _render(browser, page + "#sort=change", tmp_path)
    assert console == []
    tables = re.findall(r'<table class="sortable samples" id="samples-\d+"([^>]*)>(.*?)</table>', dom, re.S)
    assert len(tables) == 2
    for attrs, body in tables:
        assert 'data-sorted="change:asc"' in attrs
        order = re.findall(r'<tr data-index="(\d+)"', body)
        values = [float(v) for v in re.findall(r'<td class="num" data-v="([^"]+)">[^<]*</td></tr>', body)]
        assert len(order) == 3 and values == sorted(values)
    # sample 1 lost the most probability (0.95 -> 0.02) in both runs
    assert re.findall(r'<tr data-index="(\d+)"', tables[0][1])[0] == "1"


def test_trajectories_start_at_the_target_model(made):
    """A run evaluated from step 4 on starts its trajectory at step 0 with its target model's value."""
    runs = reporting.find_runs([made.root / "saves"])
    reporting.assign_roles(runs)
    series = reporting.trajectories(runs)
    # the panels: the trajectory metrics of TOFU's roles, in its config's order, forget_quality on a log axis
    assert reporting.trajectory_panels(runs) == {("TOFU", m): m == "forget_quality"
                                                 for m in TOFU_ROLES["trajectory_metrics"]}
    (name, steps, values), = [s for s in series[("TOFU", "model_utility")] if s[0] == "GradDiff_ga_a1"]
    assert steps == [0.0, 4, 8]
    assert values[0] == SUMMARIES["target"]["model_utility"] and values[1:] == [0.6 - 0.04, 0.6 - 0.08]
    # ga_a05 has no eval_history.jsonl: its eval_tofu_<metric> trainer-log entries (config key tofu -> TOFU)
    (name, steps, values), = [s for s in series[("TOFU", "forget_quality")] if s[0] == "GradDiff_ga_a05"]
    assert steps == [0.0, 4, 8] and values[1:] == [0.04, 0.08]


def test_report_of_two_real_runs(tofu_dir, tmp_path, capsys):
    """Two GradDiff runs of src/train.py (alpha 0.5 and 1, evaluated on TOFU at the end): the report's table
    holds exactly the numbers of their SUMMARY files, and alpha is a column."""
    from conftest import train_in_process

    short = ["eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
             *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
               for p in ("retain", "ra", "wf")]]
    for alpha in ("0.5", "1.0"):
        train_in_process(tmp_path / "saves" / f"alpha{alpha}", [
            "model=tiny-random-llama", "trainer=GradDiff", f"trainer.method_args.alpha={alpha}", f"paths.tofu={tofu_dir}",
            "data.eval=null", "eval=tofu", "eval.tofu.limit=4", "trainer.args.max_steps=1", "trainer.args.report_to=none",
            "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
            f"task_name=GradDiff_alpha{alpha}", *short])
    assert report.main([str(tmp_path / "saves"), "--out", str(tmp_path / "report")]) == 0
    rows = {r["name"]: r for r in _read_csv(tmp_path / "report")}
    assert set(rows) == {"GradDiff_alpha0.5", "GradDiff_alpha1.0"}
    for alpha in ("0.5", "1.0"):
        row = rows[f"GradDiff_alpha{alpha}"]
        summary = json.loads((tmp_path / "saves" / f"alpha{alpha}" / "evals" / "TOFU_SUMMARY.json").read_text())
        assert float(row["alpha"]) == float(alpha) and row["method"] == "GradDiff"
        for metric, value in summary.items():
            assert (row[metric] == "") if value is None else float(row[metric]) == value, metric


# ---------------------------------------------------------------------------------------------------------
# the report knows no benchmark: everything comes from _meta.roles
# ---------------------------------------------------------------------------------------------------------

TOY_ROLES = roles_meta(headline=["toy_utility", "toy_forget"], trajectory=["toy_forget", "toy_utility"],
                       log_axis=["toy_forget"], sample_metrics={"toy_forget": "score", "toy_answer": "overlap"})
TOY_DIRECTIONS = {"toy_utility": True, "toy_forget": True, "toy_answer": False}


def write_toy_eval(folder: Path, summary: dict, scores: list[float], answers: list[str], model: str,
                   config: dict | None = None) -> None:
    """A benchmark the report has never heard of: TOY, two samples."""
    entries = {
        "toy_forget": {"agg_value": summary["toy_forget"], "value_by_index": {
            str(i): {"score": s} for i, s in enumerate(scores)}},
        "toy_answer": {"agg_value": summary["toy_answer"], "value_by_index": {
            str(i): {"overlap": 1.0 - s, "input": f"toy question {i}?", "ground_truth": f"toy truth {i}",
                     "generation": a} for i, (s, a) in enumerate(zip(scores, answers))}},
    }
    write_eval(folder, "TOY", summary, TOY_ROLES, entries, TOY_DIRECTIONS, config)
    meta = json.loads((folder / "TOY_EVAL.json").read_text())
    meta["_meta"]["model"] = model
    _write_json(folder / "TOY_EVAL.json", meta)


def test_a_new_benchmark_needs_no_report_code(tmp_path):
    """TOY, with roles naming its headline, trajectory, log-axis and sample metrics, gets its trade-off plot,
    its trajectory panels (from the trainer log's eval_<config key>_<metric> entries) and its per-sample view."""
    saves, target_model = tmp_path / "saves", tmp_path / "models" / "target"
    write_toy_eval(saves / "target", {"toy_utility": 0.8, "toy_forget": 1e-6, "toy_answer": 0.9}, [0.9, 0.8],
                   ["toy truth 0", "toy truth 1"], str(target_model),
                   config=eval_config("toy_target", str(target_model)))
    run = saves / "unlearn" / "toy_run"
    config = unlearn_config("toy_run", 1.0, str(target_model), "none")
    config["eval"] = {"toy": {"handler": "Evaluator", "name": "TOY"}}
    _write_config(run / "config.yaml", config)
    _write_jsonl(run / "train_log.jsonl", [
        {"loss": 1.0, "step": 1, "forget_loss": -1.0},
        {"eval_toy_toy_forget": 0.01, "eval_toy_toy_utility": 0.7, "step": 2},
        {"eval_toy_toy_forget": 0.5, "eval_toy_toy_utility": 0.6, "step": 4}])
    write_toy_eval(run / "evals", {"toy_utility": 0.6, "toy_forget": 0.5, "toy_answer": 0.2}, [0.1, 0.7],
                   ["no idea", "toy truth 1"], str(run))
    _write_json(run / "run_complete.json", {})
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(saves), "--out", str(out)]) == 0

    assert (out / "TOY_tradeoff.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (out / "trajectories.png").read_bytes().startswith(PNG_SIGNATURE)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "### TOY: toy_forget vs toy_utility" in md and "Up and to the right is better." in md
    assert "Drawn on a log scale (0 at 1e-20): toy_forget." in md
    assert "_meta.roles" not in md  # every EVAL file has roles: no note

    runs = reporting.assign_roles(reporting.find_runs([saves]))
    assert [r.role for r in runs] == ["target", "run"]
    series = reporting.trajectories(runs)
    assert list(series) == [("TOY", "toy_forget"), ("TOY", "toy_utility")]
    assert series[("TOY", "toy_forget")] == [("toy_run", [0.0, 2, 4], [1e-6, 0.01, 0.5])]

    # the per-sample view: headers from the metric and field names, text from the entries that carry it
    assert page.count("<details") == 1 and "toy_run: TOY: 2 samples" in page
    for header in ("question", "ground truth", "generation before", "generation after", "toy_forget (score) before",
                   "toy_answer (overlap) after", "change of toy_forget (score), after − before"):
        assert f">{header}</th>" in page, header
    assert "toy question 1?" in page and "no idea" in page
    section = md.split("### toy_run: TOY (before: toy_target)")[1]
    first = next(line for line in section.splitlines() if line.startswith("| 0 "))  # 0.9 -> 0.1: the biggest drop
    assert "-0.8" in first


def leak_entry(curve: dict[int, float], samples: int = 4) -> dict:
    """A metric result in the layout of the ``leak_at_k`` handler: leak@k by k (string keys, as in the JSON file),
    the scorer and per-question samples."""
    return {"agg_value": curve[max(curve)], "leak_at_k": {str(k): v for k, v in curve.items()},
            "leak_rate": curve[1], "best_of_n": 0.5, "num_samples": samples, "unparsed": 0,
            "scorer": {"kind": "overlap", "field": "overlap_recall", "threshold": 0.5},
            "value_by_index": {"0": {"input": "toy question 0?", "ground_truth": "toy truth 0",
                                     "samples": [{"text": "toy truth 0", "score": 1.0, "leaked": True}],
                                     "leaks": 1, "leak_at_k": {"1": 0.25, "2": 0.5, "4": 1.0}, "best_score": 1.0}}}


def test_leak_at_k_is_plotted_against_k_for_each_run(tmp_path):
    """Two runs whose TOY evaluation has a metric with a leak@k curve get one plot of it (one line each, in the
    report's pages with its caption); a third run without that metric is in the table and in no curve."""
    saves = tmp_path / "saves"
    curves = {"a": {1: 0.1, 2: 0.2, 4: 0.3}, "b": {1: 0.05, 2: 0.07, 4: 0.1}}
    for name, curve in curves.items():
        write_eval(saves / name, "TOY", {"toy_utility": 0.5, "toy_forget": 0.1, "toy_leaks": curve[4]}, TOY_ROLES,
                   {"toy_leaks": leak_entry(curve)}, TOY_DIRECTIONS)
    write_eval(saves / "c", "TOY", {"toy_utility": 0.4, "toy_forget": 0.2}, TOY_ROLES, directions=TOY_DIRECTIONS)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(saves), "--out", str(out)]) == 0

    png = out / "TOY_toy_leaks_leak_vs_k.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    title = "TOY: toy_leaks, leak@k against k"
    assert f"### {title}\n\n![{title}]({png.name})" in md
    assert "Lower is better on a forget set" in md and "n = 4 answers per question." in md
    assert "What counts as a leak: kind=overlap, field=overlap_recall, threshold=0.5." in md
    assert '<figure id="TOY_toy_leaks_leak_vs_k"><img src="data:image/png;base64,' in page
    assert base64.b64encode(png.read_bytes()).decode("ascii") in page
    assert {r["name"] for r in _read_csv(out)} == {"a", "b", "c"}  # the run without the metric is in the table

    runs = reporting.assign_roles(reporting.find_runs([saves]))
    found = reporting.leak_curves(runs)
    assert list(found) == [("TOY", "toy_leaks")]  # one plot: only the metric with a leak_at_k mapping
    assert [(c.name, c.ks, c.values, c.samples) for c in found[("TOY", "toy_leaks")]] == [
        ("a", (1, 2, 4), (0.1, 0.2, 0.3), 4), ("b", (1, 2, 4), (0.05, 0.07, 0.1), 4)]


def test_no_leak_at_k_no_plot(made):
    """Runs without a leak@k curve: no such plot and no note about it."""
    assert not list(made.out.glob("*leak_vs_k*")) and "leak@k" not in made.md


def test_an_eval_without_roles_gets_a_note(tmp_path):
    """An EVAL file written before _meta.roles existed: the table is complete, the run is in no plot and has
    no per-sample view, and one note names the file and says to re-run the evaluation."""
    paths = build_saves(tmp_path)
    old = paths["ga_a05"] / "evals"
    write_tofu_eval(old, SUMMARIES["ga_a05"], ["Ines.", "Izmir.", "Mail."], [0.01, 0.02, 0.006], [0.0, 0.1, 0.05],
                    str(paths["ga_a05"]), roles=None)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(tmp_path / "saves"), "--out", str(out)]) == 0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert float(_read_csv_rows(out, "GradDiff_ga_a05")["alpha"]) == 0.5  # the table still works
    notes = [line for line in md.splitlines() if "_meta.roles" in line and line.startswith("- ")]
    assert len(notes) == 1 and f"GradDiff_ga_a05: {old / 'TOFU_EVAL.json'}." in notes[0]
    assert f"old_eval: {paths['old'] / 'TOFU_EVAL.json'} (missing);" in notes[0]  # both in the one note
    assert "Re-run these evaluations" in notes[0]
    assert page.count("<details") == 1 and "GradDiff_ga_a05: TOFU" not in page  # only ga_a1's view
    runs = reporting.assign_roles(reporting.find_runs([tmp_path / "saves"]))
    assert "GradDiff_ga_a05" not in [name for lines in reporting.trajectories(runs).values() for name, *_ in lines]


def _read_csv_rows(out: Path, name: str) -> dict:
    (row,) = [r for r in _read_csv(out) if r["name"] == name]
    return row


def test_roles_of_a_training_run_fall_back_to_its_latest_checkpoint(tmp_path):
    """A training run without a final EVAL file reads the roles of its latest checkpoint's evaluation."""
    run = tmp_path / "run"
    for step, roles in ((2, None), (4, TOFU_ROLES)):
        write_tofu_eval(run / f"checkpoint-{step}" / "evals", SUMMARIES["ga_a1"], ANSWERS, [0.1] * 3, [0.1] * 3,
                        str(run), roles=roles)
    _write_config(run / "config.yaml", unlearn_config("r", 1.0, "m", "x"))
    _write_json(run / "run_complete.json", {})
    (found,) = reporting.find_runs([tmp_path])
    roles = reporting.bench_roles(found, "TOFU")
    assert roles.source == run / "checkpoint-4" / "evals" / "TOFU_EVAL.json"
    assert roles.tradeoff == ("model_utility", "forget_quality")


def _config_names() -> set[str]:
    """Every benchmark and metric name of configs/eval: benchmark config stems and names, metric config stems
    and every name the benchmark configs list in their roles."""
    names = set()
    for path in (REPO / "configs" / "eval").rglob("*.yaml"):
        names.add(path.stem)
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if path.parent.name == "eval":
            names.add(str(cfg.get("name")))
            names.update(m for key in (*ROLE_LISTS, "sample_metrics") for m in cfg.get(key) or [])
    return names - {"None"}


def test_the_report_knows_no_benchmark_or_metric_name():
    """No benchmark or metric name of configs/eval (nor a per-sample field of theirs) appears anywhere in the
    report package, code, comments and docstrings alike: what it draws comes from _meta.roles."""
    names = _config_names() | {"forget_quality", "model_utility", "forget_Q_A", "knowmem", "verbmem", "TOFU", "MUSE",
                               "WMDP", "MMLU", "rougeL_recall", "rougeL_f1"}
    assert {"forget_quality", "forget_Q_A_ROUGE", "retain_knowmem_ROUGE", "tofu", "muse", "lm_eval"} <= names
    files = sorted(p for p in (REPO / "src" / "reporting").iterdir() if p.suffix in (".py", ".css", ".js", ".html"))
    assert {p.name for p in files} >= {"__init__.py", "collect.py", "roles.py", "table.py", "samples.py", "plots.py",
                                       "render.py", "report.css", "report.js"}
    found = [(p.name, name) for p in files for name in sorted(names)
             if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", p.read_text(encoding="utf-8"),
                          flags=re.IGNORECASE if name.lower() in ("tofu", "muse", "lmeval", "lm_eval") else 0)]
    assert found == []
    entry = (REPO / "src" / "report.py").read_text(encoding="utf-8")
    assert len(entry.splitlines()) < 80 and "from reporting import" in entry


def test_the_report_never_imports_torch(made, tmp_path):
    """Importing the package and writing a whole report leave torch unloaded (a fresh interpreter)."""
    code = ("import sys, reporting; assert 'torch' not in sys.modules; "
            f"reporting.make_report([{str(made.root / 'saves')!r}], out={str(tmp_path / 'out')!r}); "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'evals')); "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "report.html").is_file()


def test_layers_import_downward_only():
    """collect <- roles <- table / samples / plots <- render: no module imports one above it."""
    order = {"collect": 0, "roles": 1, "table": 2, "samples": 2, "plots": 2, "render": 3}
    for module, level in order.items():
        text = (REPO / "src" / "reporting" / f"{module}.py").read_text(encoding="utf-8")
        for imported in re.findall(r"^from reporting\.(\w+) import", text, flags=re.MULTILINE):
            assert order[imported] < level, (module, imported)
