"""The configs' resolvers are registered by the entry points (src/resolvers.py), never by importing a library."""

import subprocess
import sys

from conftest import REPO

CHECK = """
import sys
sys.path.insert(0, {src!r})
from omegaconf import OmegaConf
import data, evals, model, trainer, attacks  # the library, imported as train.py imports it
names = ["holdout_for", "forget_split_of", "muse_corpus", "lower", "upper", "dataset_names", "sweep_subdir"]
assert not any(OmegaConf.has_resolver(n) for n in names), [n for n in names if OmegaConf.has_resolver(n)]
assert "sweep" not in sys.modules, "data (or another library package) imports sweep"
from resolvers import register_resolvers
register_resolvers()
assert all(OmegaConf.has_resolver(n) for n in names)
cfg = OmegaConf.create({{"f": "forget05", "h": "${{holdout_for:${{f}}}}", "d": "${{upper:${{f}}}}"}})
print(cfg.h, cfg.d)
"""


def test_importing_the_library_registers_no_resolver_and_the_entry_points_register_all():
    proc = subprocess.run([sys.executable, "-c", CHECK.format(src=str(REPO / "src"))], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["holdout05", "FORGET05"]


ENTRY = """
import importlib, sys
sys.path.insert(0, {src!r})
from omegaconf import OmegaConf
names = ["holdout_for", "forget_split_of", "muse_corpus", "lower", "upper", "dataset_names", "sweep_subdir"]
import train, eval, sequential
for module in (train, eval, sequential):
    for name in names:
        OmegaConf.clear_resolver(name)
    importlib.reload(module)  # runs the module's top level again, as a launcher's worker importing it would
    missing = [n for n in names if not OmegaConf.has_resolver(n)]
    assert not missing, (module.__name__, missing)
print("ok")
"""


def test_every_entry_point_registers_the_resolvers_when_imported():
    proc = subprocess.run([sys.executable, "-c", ENTRY.format(src=str(REPO / "src"))], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "ok"


def test_the_dataset_resolvers_read_names_and_composed_nodes_alike():
    """``${dataset_names:${data.forget}}`` (a task name) and ``${forget_split_of:${data.forget}}`` give the same
    answer whether data.forget is still a name or already the composed config (resolvers.compose_names)."""
    from omegaconf import OmegaConf

    from data import compose_dataset
    from resolvers import register_resolvers

    register_resolvers()
    for forget in ("TOFU_QA_FORGET05_IDK", compose_dataset("TOFU_QA_FORGET05_IDK")):
        cfg = OmegaConf.create({"data": {"forget": forget, "train": ["MUSE_forget", compose_dataset("MUSE_retain")]},
                                "task": "x_${dataset_names:${data.forget}}", "split": "${forget_split_of:${data.forget}}",
                                "both": "${dataset_names:${data.train}}"})
        assert (cfg.task, cfg.split, cfg.both) == ("x_TOFU_QA_FORGET05_IDK", "forget05", "MUSE_forget+MUSE_retain")
