"""Golden end-to-end values: a fresh run of each workload of ``golden_workloads.py`` equals its committed
file in ``tests/golden/`` (1e-5 relative; generations and other strings exactly).

A failure lists where the numbers moved. If the change is meant (a bug fix, a new default), regenerate
with ``python tests/golden/regenerate.py <name>`` and say why in the commit; otherwise the refactor changed
behaviour. The TOFU and MUSE evaluations need the real data in ``../shared/data`` and skip without it.
"""

from __future__ import annotations

import copy

import pytest

import golden_workloads as g


def _check(name: str, actual) -> None:
    found = g.differences(g.load_golden(name), actual)
    assert not found, (f"{name}: the run differs from tests/golden/{name}.json (regenerate with "
                       f"`python tests/golden/regenerate.py {name}` only if the change is meant):\n  "
                       + "\n  ".join(found))


@pytest.fixture(scope="module")
def real_data():
    if not g.SHARED_DATA.is_dir():
        pytest.skip(f"the real TOFU / MUSE-News copies are not at {g.SHARED_DATA} (only on the project's machines)")
    return g.SHARED_DATA


@pytest.fixture(scope="module")
def tofu_ours(real_data, tmp_path_factory):
    return g.tofu_smollm2(tmp_path_factory.mktemp("golden") / "tofu")


def test_tofu_evaluation_of_smollm2(tofu_ours):
    _check("tofu_smollm2", tofu_ours)


def test_tofu_evaluation_of_smollm2_as_open_unlearning(real_data, tmp_path):
    retain = g.as_eval_file(g.load_golden("tofu_smollm2"), tmp_path / "retain" / "TOFU_EVAL.json")
    _check("tofu_smollm2_open_unlearning", g.tofu_smollm2(tmp_path / "tofu", compat=True, retain_logs=retain))


def test_muse_evaluation_of_smollm2(real_data, tmp_path):
    _check("muse_smollm2", g.muse_smollm2(tmp_path / "muse", g.muse_subset(tmp_path / "muse_data")))


def test_first_steps_of_every_method(tmp_path):
    data = g.method_data(tmp_path / "tofu")
    golden = g.load_golden("methods_tiny_llama")
    assert sorted(golden) == sorted(g.METHOD_FORGET_SETS)
    found = []
    for method in g.METHOD_FORGET_SETS:
        found += g.differences(golden[method], g.method_run(tmp_path / method, method, data), where=method)
    assert not found, ("methods_tiny_llama: the runs differ from tests/golden/methods_tiny_llama.json "
                       "(regenerate with `python tests/golden/regenerate.py methods_tiny_llama` only if the change "
                       "is meant):\n  " + "\n  ".join(found))


def test_every_trainer_config_has_a_golden_run(repo):
    """A new method gets its golden steps: every configs/trainer file but finetune is in the workload."""
    trainers = {p.stem for p in (repo / "configs" / "trainer").glob("*.yaml")} - {"finetune"}
    assert trainers == set(g.METHOD_FORGET_SETS)


def test_the_comparison_catches_every_kind_of_change(tofu_ours):
    """A number off by more than the tolerance, a changed generation, a missing key, a None, a longer list."""
    assert not g.differences(tofu_ours, copy.deepcopy(tofu_ours))
    changes = {
        "summary.forget_Q_A_Prob": lambda r: r["summary"].__setitem__(
            "forget_Q_A_Prob", r["summary"]["forget_Q_A_Prob"] * (1 + 3 * g.REL_TOL)),
        "generation": lambda r: r["eval"]["forget_Q_A_ROUGE"]["value_by_index"]["0"].__setitem__(
            "generation", r["eval"]["forget_Q_A_ROUGE"]["value_by_index"]["0"]["generation"] + " more"),
        "keys only in golden ['holdout']": lambda r: r["eval"]["mia_min_k"].pop("holdout"),
        "summary.privleak: golden": lambda r: r["summary"].__setitem__("privleak", None),
        "items in golden": lambda r: r["eval"]["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"].append(0.5),
    }
    for expected, change in changes.items():
        changed = copy.deepcopy(tofu_ours)
        change(changed)
        found = g.differences(tofu_ours, changed)
        assert len(found) == 1 and expected in found[0], (expected, found)
    nudged = copy.deepcopy(tofu_ours)
    nudged["summary"]["forget_Q_A_Prob"] *= 1 + g.REL_TOL / 10
    assert not g.differences(tofu_ours, nudged)  # within tolerance
