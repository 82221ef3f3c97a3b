"""src/report.py: runs collected from folders written in the formats of src/train.py and src/eval.py."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import report

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


def write_tofu_eval(folder: Path, summary: dict, generations: list[str], probs: list[float], rouges: list[float],
                    model: str, retain_logs_path: str | None = None) -> None:
    """TOFU_SUMMARY.json and TOFU_EVAL.json in the evaluator's layout (three forget samples)."""
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
        "eval": {"tofu": {"handler": "Evaluator", "retain_logs_path": retain_logs_path}},
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
    assert {p.name for p in pngs} >= {"forget_quality_vs_model_utility.png", "trajectories.png", "loss_terms.png"}
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
    # ga_a1 has forget_quality 0 (clipped), old_eval has none (left out)
    assert "GradDiff_ga_a1" in made.md.split("drawn at 1e-20")[1].splitlines()[0]
    assert "old_eval" in made.md.split("Left out")[1].splitlines()[0]


def test_per_sample_view(made):
    html_text = made.html
    assert html_text.count("<details") == 2  # one per unlearning run
    assert "&lt;b&gt;The Copper Compass&lt;/b&gt;" in html_text
    assert "<b>The Copper Compass" not in html_text
    assert "Where was Quentin Brennagh born?" in html_text
    assert "He was born in Izmir, Turkey." in html_text  # before (target) and ground truth
    assert "Nobody knows." in html_text and "Izmir." in html_text  # after, per run
    assert 'data-key="change"' in html_text
    # report.md: the short summary, biggest probability drop first (0.95 -> 0.02 for sample 1)
    section = made.md.split("### GradDiff_ga_a1")[1]
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
    runs = report.find_runs([tmp_path / "saves"])
    ordered = report.assign_roles(runs, target=paths["old"], retain=paths["retain"] / "TOFU_EVAL.json")
    roles = {r.name: r.role for r in ordered}
    assert roles["old_eval"] == "target" and roles["tofu_retain90"] == "retain" and roles["tofu_target"] == "run"
    assert ordered[0].name == "old_eval"
    with pytest.raises(report.ReportError, match="--target"):
        report.assign_roles(runs, target=tmp_path / "models")


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
    got = report.metric_directions(["forget_quality", "mia_loss", "privleak", "unknown"], metas, registry)
    assert got == {"forget_quality": True, "mia_loss": False, "privleak": None, "unknown": None}

    def metas_then_fail():
        yield {"higher_is_better": {"a": False}}
        raise AssertionError("read past the first _meta that answered everything")

    assert report.metric_directions(["a"], metas_then_fail(), registry={}) == {"a": False}


def test_hyperparameters_and_varying_keys():
    config = unlearn_config("x", 0.5, "m", "r")
    config["trainer"]["args"]["max_steps"] = 20
    assert report.hyperparameters(config) == {"gamma": 1.0, "alpha": 0.5, "retain_loss_type": "NLL",
                                              "learning_rate": 1e-5, "max_steps": 20, "effective_batch_size": 8}
    assert report.hyperparameters({"mode": "eval"}) == {}
    params = [{"alpha": 1.0, "gamma": 1.0, "learning_rate": 1e-5}, {"alpha": 0.5, "gamma": 1.0, "learning_rate": 1e-5},
              {"gamma": 1.0, "learning_rate": 1e-5}]
    assert report.varying_keys(params) == ["alpha", "learning_rate"]


def test_same_path_relative_suffix(tmp_path):
    target = tmp_path / "saves" / "eval" / "retain90" / "TOFU_EVAL.json"
    assert report.same_path(str(target), target)
    assert report.same_path("saves/eval/retain90/TOFU_EVAL.json", target)
    assert not report.same_path("saves/eval/retain95/TOFU_EVAL.json", target)


def test_per_sample_rows_change():
    after = {"forget_Q_A_ROUGE": {"value_by_index": {"1": {"input": "q1", "rougeL_recall": 0.0, "generation": "x"},
                                                     "0": {"input": "q0", "rougeL_recall": 0.5, "generation": "y"}}},
             "forget_Q_A_Prob": {"value_by_index": {"0": {"prob": 0.25}, "1": {"prob": 0.5}}}}
    before = {"forget_Q_A_ROUGE": {"value_by_index": {"0": {"rougeL_recall": 1.0, "generation": "b0"}}},
              "forget_Q_A_Prob": {"value_by_index": {"0": {"prob": 0.75}}}}
    rows = report.per_sample_rows(after, before)
    assert [r["index"] for r in rows] == ["0", "1"]
    assert rows[0]["before"] == "b0" and rows[0]["after"] == "y" and rows[0]["change"] == pytest.approx(-0.5)
    assert rows[1]["before"] is None and rows[1]["change"] is None


def test_muse_plot_and_skipped_plots(tmp_path):
    def run(name, role, knowmem, verbmem):
        r = report.Run(path=tmp_path / name, kind="eval", config={"mode": "eval"}, name=name, role=role,
                       summaries={"MUSE": {"forget_verbmem_ROUGE": verbmem, "retain_knowmem_ROUGE": knowmem,
                                           "privleak": 1.0}})
        return r

    runs = [run("target", "target", 0.5, 0.6), run("retain", "retain", 0.48, 0.2), run("a", "run", 0.4, 0.1)]
    figures = {f.key: f for f in report.make_figures(runs, tmp_path)}
    assert "forget_quality_vs_model_utility" not in figures
    assert figures["muse_knowmem_vs_verbmem"].path.read_bytes().startswith(PNG_SIGNATURE)
    assert figures["trajectories"].path is None and "skipped" in figures["trajectories"].notes[0]
    assert figures["loss_terms"].path is None and "skipped" in figures["loss_terms"].notes[0]


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
    runs = report.find_runs([made.root / "saves"])
    report.assign_roles(runs)
    series = report.trajectories(runs)
    (name, steps, values), = [s for s in series["model_utility"] if s[0] == "GradDiff_ga_a1"]
    assert steps == [0.0, 4, 8]
    assert values[0] == SUMMARIES["target"]["model_utility"] and values[1:] == [0.6 - 0.04, 0.6 - 0.08]


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
