"""Tests of the synthetic TOFU-format generator (scripts/synthetic_tofu.py)."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic_tofu
from synthetic_tofu import FILE_NAMES, generate_tofu_like

REAL_TOFU = Path("/work/shared/data/tofu")
QA = 4  # qa_per_author used by most tests
PERTURBED_KEYS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question")
EXPECTED_KEYS = {
    **{name: ("question", "answer") for name in FILE_NAMES if not name.endswith("_perturbed.json")},
    **{name: PERTURBED_KEYS for name in FILE_NAMES if name.endswith("_perturbed.json")},
    "real_authors_perturbed.json": ("question", "answer", "perturbed_answer"),
    "world_facts_perturbed.json": ("question", "answer", "perturbed_answer"),
}
del EXPECTED_KEYS["idontknow.jsonl"]
# Files about the fictitious authors (the real-world sets have one-or-few-word answers).
FICTITIOUS = [n for n in EXPECTED_KEYS if n not in ("real_authors_perturbed.json", "world_facts_perturbed.json")]
NAME_RE = re.compile(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b")


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def author_names(rows: list[dict], qa: int) -> list[str]:
    """The single name mentioned by every answer of each block of ``qa`` rows (one author)."""
    assert len(rows) % qa == 0
    names = []
    for start in range(0, len(rows), qa):
        common = set.intersection(*(set(NAME_RE.findall(r["answer"])) for r in rows[start : start + qa]))
        assert len(common) == 1, (rows[start : start + qa], common)
        names.append(common.pop())
    return names


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("tofu") / "default"
    counts = generate_tofu_like(out)  # n_authors=20, qa_per_author=4, seed=0
    return out, counts


@pytest.fixture(scope="module")
def big_set(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("tofu_big")
    return out, generate_tofu_like(out, n_authors=200, qa_per_author=3, seed=7)


def test_every_file_written_with_expected_fields_and_types(default_set):
    out, counts = default_set
    assert sorted(p.name for p in out.iterdir()) == sorted(FILE_NAMES)
    assert list(counts) == list(FILE_NAMES)
    for name, keys in EXPECTED_KEYS.items():
        rows = read_rows(out / name)
        assert rows, name
        for row in rows:
            assert tuple(row) == keys, name
            for key, value in row.items():
                if key == "perturbed_answer":
                    assert isinstance(value, list) and all(isinstance(v, str) and v for v in value)
                else:
                    assert isinstance(value, str) and value, (name, key)


@pytest.mark.skipif(not REAL_TOFU.is_dir(), reason=f"real TOFU copy not found at {REAL_TOFU}")
def test_layout_matches_real_tofu_copy(default_set):
    out, _ = default_set
    real_names = sorted(p.name for p in REAL_TOFU.iterdir() if p.name != "README.md")
    # The local copy has holdout01 only; the Hub's TOFU (and this generator) have holdout05/10 too.
    assert sorted(p.name for p in out.iterdir() if p.name not in ("holdout05.json", "holdout10.json")) == real_names
    for name in real_names:
        if name.endswith(".jsonl"):
            continue
        with open(REAL_TOFU / name, encoding="utf-8") as fh:
            real_row = json.loads(fh.readline())
        ours = read_rows(out / name)
        assert all(tuple(row) == tuple(real_row) for row in ours), name
        assert {type(v) for v in ours[0].values()} == {type(v) for v in real_row.values()}, name


def test_row_counts_for_defaults(default_set):
    out, counts = default_set
    assert counts == {
        "full.json": 80,
        "forget01.json": 4,
        "forget05.json": 4,
        "forget10.json": 8,
        "retain99.json": 76,
        "retain95.json": 76,
        "retain90.json": 72,
        "forget01_perturbed.json": 4,
        "forget05_perturbed.json": 4,
        "forget10_perturbed.json": 8,
        "retain_perturbed.json": 72,
        "real_authors_perturbed.json": len(synthetic_tofu.REAL_AUTHORS),
        "world_facts_perturbed.json": len(synthetic_tofu.WORLD_FACTS),
        "holdout01.json": 4,
        "holdout05.json": 4,
        "holdout10.json": 8,
        "idontknow.jsonl": len(synthetic_tofu.IDONTKNOW),
    }
    for name, count in counts.items():
        assert (out / name).read_text(encoding="utf-8").count("\n") == count, name


@pytest.mark.parametrize("fixture", ["default_set", "big_set"])
def test_splits_are_whole_authors_at_the_end_of_full(fixture, request):
    out, _ = request.getfixturevalue(fixture)
    qa = QA if fixture == "default_set" else 3
    full = read_rows(out / "full.json")
    names = author_names(full, qa)
    assert len(set(names)) == len(names)
    previous: list[dict] = []
    for pct in (1, 5, 10):
        forget = read_rows(out / f"forget{pct:02d}.json")
        retain = read_rows(out / f"retain{100 - pct:02d}.json")
        assert retain + forget == full
        n_forget = max(1, round(pct * len(names) / 100))
        assert len(forget) == n_forget * qa
        assert not set(author_names(forget, qa)) & set(author_names(retain, qa))
        assert forget[len(forget) - len(previous) :] == previous  # forget01 in forget05 in forget10
        previous = forget


def test_big_set_counts(big_set):
    _, counts = big_set
    assert counts["full.json"] == 600
    assert [counts[f"forget{p:02d}.json"] for p in (1, 5, 10)] == [6, 30, 60]
    assert counts["retain_perturbed.json"] == 400  # capped
    assert counts["holdout01.json"] == 2 * 3


@pytest.mark.parametrize("fixture", ["default_set", "big_set"])
def test_perturbed_files_align_with_their_sets(fixture, request):
    out, counts = request.getfixturevalue(fixture)
    full = read_rows(out / "full.json")
    for pct in (1, 5, 10):
        forget = read_rows(out / f"forget{pct:02d}.json")
        perturbed = read_rows(out / f"forget{pct:02d}_perturbed.json")
        assert [{"question": r["question"], "answer": r["answer"]} for r in perturbed] == forget
    retain_eval = read_rows(out / "retain_perturbed.json")
    assert [{"question": r["question"], "answer": r["answer"]} for r in retain_eval] == full[: len(retain_eval)]
    assert len(retain_eval) <= counts["retain90.json"]  # never overlaps forget10


@pytest.mark.parametrize("fixture", ["default_set", "big_set"])
def test_perturbed_answers_are_wrong_distinct_and_shaped_like_the_paraphrase(fixture, request):
    out, _ = request.getfixturevalue(fixture)
    for name in ("forget10_perturbed.json", "retain_perturbed.json"):
        for row in read_rows(out / name):
            wrong = row["perturbed_answer"]
            assert len(wrong) == synthetic_tofu.N_PERTURBED == 5
            assert len(set(wrong)) == 5
            assert row["answer"] not in wrong and row["paraphrased_answer"] not in wrong
            assert row["paraphrased_answer"] != row["answer"]
            assert row["paraphrased_question"] != row["question"]
            for w in wrong:
                assert difflib.SequenceMatcher(None, w, row["paraphrased_answer"]).ratio() > 0.5, (w, row)


def test_real_world_perturbed_sets(default_set):
    out, _ = default_set
    for name in ("real_authors_perturbed.json", "world_facts_perturbed.json"):
        rows = read_rows(out / name)
        assert len(rows) >= 20
        assert len({r["question"] for r in rows}) == len(rows)
        for row in rows:
            assert len(row["perturbed_answer"]) == 3
            assert len(set(row["perturbed_answer"])) == 3
            assert row["answer"] not in row["perturbed_answer"]


def test_holdout_authors_never_in_full(default_set, big_set):
    for (out, _), qa in ((default_set, QA), (big_set, 3)):
        full_text = (out / "full.json").read_text(encoding="utf-8")
        holdout = author_names(read_rows(out / "holdout10.json"), qa)
        assert holdout
        for name in holdout:
            assert name not in full_text


@pytest.mark.parametrize("fixture", ["default_set", "big_set"])
def test_each_forget_split_has_a_holdout_of_its_size(fixture, request):
    """forgetNN goes with holdoutNN (TOFU's pairing): as many rows, whole authors, nested like the forget sets."""
    out, counts = request.getfixturevalue(fixture)
    previous: list[dict] = []
    for pct in (1, 5, 10):
        assert counts[f"holdout{pct:02d}.json"] == counts[f"forget{pct:02d}.json"]
        holdout = read_rows(out / f"holdout{pct:02d}.json")
        assert holdout[:len(previous)] == previous  # holdout01 in holdout05 in holdout10
        previous = holdout


def test_idontknow_is_plain_text(default_set):
    out, _ = default_set
    lines = (out / "idontknow.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 20 and len(set(lines)) == len(lines)
    for line in lines:
        assert line.strip() == line and line
        assert not line.startswith(("{", "[", '"'))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_is_clean_ascii_and_answers_are_short(tmp_path, seed):
    generate_tofu_like(tmp_path, n_authors=10, qa_per_author=synthetic_tofu.N_TEMPLATES, seed=seed)
    for name in FILE_NAMES:
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert text.isascii(), name
    for name in FICTITIOUS:
        for row in read_rows(tmp_path / name):
            assert row["question"].endswith("?")
            for value in (row["question"], row.get("paraphrased_question", "?")):
                assert "{" not in value and "}" not in value and "  " not in value
            answers = [row["answer"], row.get("paraphrased_answer", "x " * 8), *row.get("perturbed_answer", [])]
            for answer in answers:
                assert 8 <= len(answer.split()) <= 40, answer
                assert "  " not in answer and "{" not in answer
    # all templates used: each author has N_TEMPLATES different questions
    full = read_rows(tmp_path / "full.json")
    assert len(full) == 10 * synthetic_tofu.N_TEMPLATES >= 100
    assert synthetic_tofu.N_TEMPLATES >= 10


def test_deterministic_and_seed_dependent(tmp_path):
    a = generate_tofu_like(tmp_path / "a", seed=3)
    b = generate_tofu_like(tmp_path / "b", seed=3)
    c = generate_tofu_like(tmp_path / "c", seed=4)
    assert a == b == c
    for name in FILE_NAMES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "full.json").read_bytes() != (tmp_path / "c" / "full.json").read_bytes()
    assert (tmp_path / "a" / "holdout01.json").read_bytes() != (tmp_path / "c" / "holdout01.json").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_authors": 9}, "n_authors=9"),
        ({"n_authors": 0}, "n_authors=0"),
        ({"n_authors": 100_000}, "n_authors=100000"),
        ({"qa_per_author": 0}, "qa_per_author=0"),
        ({"qa_per_author": 99}, "qa_per_author=99"),
        ({"retain_eval_rows": 0}, "retain_eval_rows=0"),
        ({"retain_eval_rows": 73}, "retain_eval_rows=73"),  # 72 rows lie outside forget10
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        generate_tofu_like(tmp_path / "out", **kwargs)
    assert "[" in str(info.value)  # the valid range is named
    assert not (tmp_path / "out").exists()


def test_valid_range_is_named():
    with pytest.raises(ValueError, match=re.escape(f"[1, {synthetic_tofu.N_TEMPLATES}]")):
        generate_tofu_like("/nonexistent/never", qa_per_author=synthetic_tofu.N_TEMPLATES + 1)
    with pytest.raises(ValueError, match=re.escape(f"[{synthetic_tofu.MIN_AUTHORS}, ")):
        generate_tofu_like("/nonexistent/never", n_authors=synthetic_tofu.MIN_AUTHORS - 1)


def test_explicit_retain_eval_rows(tmp_path):
    counts = generate_tofu_like(tmp_path, retain_eval_rows=10)
    assert counts["retain_perturbed.json"] == 10
    assert counts["forget10_perturbed.json"] == 8


def test_write_is_atomic_per_file(tmp_path, monkeypatch):
    """A write that fails part-way (the 4th ``os.replace`` of ``run_folder.write_atomic``) leaves every file
    whole, old or new, and no temporary file; the user's other files stay."""
    ref_old, ref_new = tmp_path / "old", tmp_path / "new"
    generate_tofu_like(ref_old, seed=0)
    generate_tofu_like(ref_new, seed=1)
    out = tmp_path / "parent" / "out"
    generate_tofu_like(out, seed=0)
    (out / "unrelated.txt").write_text("keep me")

    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk on fire")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk on fire"):
        generate_tofu_like(out, seed=1)
    monkeypatch.undo()

    # Every file is one complete version, old or new; nothing staged is left behind.
    kinds = set()
    for name in FILE_NAMES:
        data = (out / name).read_bytes()
        assert data in ((ref_old / name).read_bytes(), (ref_new / name).read_bytes()), name
        kinds.add(data == (ref_new / name).read_bytes())
    assert kinds == {True, False}  # the failure really happened part-way
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["out"]
    assert (out / "unrelated.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILE_NAMES, "unrelated.txt"])


def test_loads_with_datasets(default_set, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, counts = default_set
    for name in ("full.json", "forget10_perturbed.json", "real_authors_perturbed.json", "holdout01.json"):
        ds = datasets.load_dataset(
            "json", data_files=str(out / name), split="train", cache_dir=str(tmp_path / "hf_cache")
        )
        assert ds.num_rows == counts[name]
        assert tuple(ds.column_names) == EXPECTED_KEYS[name]
    ds = datasets.load_dataset(
        "json", data_files=str(out / "forget10_perturbed.json"), split="train", cache_dir=str(tmp_path / "c2")
    )
    assert all(len(w) == 5 for w in ds["perturbed_answer"])


def test_cli_prints_counts(tmp_path, capsys):
    counts = synthetic_tofu.main(["--out", str(tmp_path / "cli"), "--n-authors", "10", "--qa-per-author", "2"])
    assert json.loads(capsys.readouterr().out) == counts
    assert counts["full.json"] == 20 and counts["forget10.json"] == 2
    with pytest.raises(SystemExit):
        synthetic_tofu.main(["--out", str(tmp_path / "bad"), "--n-authors", "3"])
    assert "n_authors=3" in capsys.readouterr().err


def test_cli_runs_as_a_script(tmp_path):
    script = Path(synthetic_tofu.__file__)
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "s"), "--seed", "5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout) == generate_tofu_like(tmp_path / "t", seed=5)
    assert (tmp_path / "s" / "full.json").read_bytes() == (tmp_path / "t" / "full.json").read_bytes()
