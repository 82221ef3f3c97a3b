"""Regenerate the golden files of this folder: ``python tests/golden/regenerate.py [name ...]``.

Run it only when a change is meant to change numbers (a bug fix, a new default), and say so in the commit:
every file here pins what ``tests/test_golden.py`` checks, to 1e-5 relative (generations exactly). It runs
the workloads of ``tests/golden_workloads.py`` offline on the real TOFU and MUSE-News copies in
``../shared/data`` (SmolLM2-135M-Instruct from its GGUF copy) and on generated TOFU-format data
(tiny-random-llama, every unlearning method), and rewrites:

- ``tofu_smollm2.json``: the TOFU evaluation, ours;
- ``tofu_smollm2_open_unlearning.json``: the same in ``compat=open_unlearning``, with ours as the retain logs;
- ``muse_smollm2.json``: the MUSE evaluation on a subset of MUSE-News;
- ``methods_tiny_llama.json``: the first steps of every method and a digest of its final weights.

With names (``tofu_smollm2 methods_tiny_llama``), only those files.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import golden_workloads as g  # noqa: E402


def main(names: list[str]) -> None:
    every = ["tofu_smollm2", "tofu_smollm2_open_unlearning", "muse_smollm2", "methods_tiny_llama"]
    unknown = sorted(set(names) - set(every))
    if unknown:
        sys.exit(f"unknown golden file(s) {unknown}; valid: {', '.join(every)}")
    wanted = names or every
    if not g.SHARED_DATA.is_dir() and set(wanted) - {"methods_tiny_llama"}:
        sys.exit(f"the real benchmark data is not at {g.SHARED_DATA}")
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        tmp = Path(tmp)
        if "tofu_smollm2" in wanted:
            g.write_golden("tofu_smollm2", g.tofu_smollm2(tmp / "tofu"))
        if "tofu_smollm2_open_unlearning" in wanted:
            g.write_golden("tofu_smollm2_open_unlearning",
                           g.tofu_smollm2(tmp / "tofu_ou", compat=True, retain_logs=g.as_eval_file(g.load_golden("tofu_smollm2"),
                                                                       tmp / "retain" / "TOFU_EVAL.json")))
        if "muse_smollm2" in wanted:
            g.write_golden("muse_smollm2", g.muse_smollm2(tmp / "muse", g.muse_subset(tmp / "muse_data")))
        if "methods_tiny_llama" in wanted:
            data = g.method_data(tmp / "tofu_data")
            g.write_golden("methods_tiny_llama", {m: g.method_run(tmp / m, m, data) for m in g.METHOD_FORGET_SETS})
    for name in wanted:
        print(f"wrote {g.golden_path(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
