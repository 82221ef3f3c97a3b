"""Runs one open-unlearning entry point (src/eval.py or src/train.py) from a checkout, on local TOFU files.

This file runs in open-unlearning's own virtualenv (``benchmarks/vs_open_unlearning.py`` starts it);
it imports nothing of ours. open-unlearning reads TOFU from the Hub (``load_hf_dataset(path=
"locuslab/TOFU", name=<split>)``); here that function is replaced so that the same call reads
``<tofu>/<split>.json`` instead, which is the only change made to its behaviour. The rest is its own
code, driven through its Hydra entry point with the overrides given:

    python benchmarks/ou_driver.py --checkout <open-unlearning> --tofu <folder> --timings <file.json> \
        eval -- model=... eval=tofu ...

``--timings`` receives ``{"entry_s": seconds inside the entry point, "import_s": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time


def _local_tofu_loader(tofu_dir: str, original):
    def load_hf_dataset(path, **kwargs):
        if path != "locuslab/TOFU":
            return original(path, **kwargs)
        import datasets

        name = kwargs.pop("name")
        split = kwargs.pop("split", "train")
        data_file = os.path.join(tofu_dir, f"{name}.json")
        if not os.path.isfile(data_file):
            raise FileNotFoundError(f"open-unlearning asked for TOFU split {name!r}: no file {data_file}")
        return datasets.load_dataset("json", data_files=data_file, split=split)

    return load_hf_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="the open-unlearning checkout")
    parser.add_argument("--tofu", required=True, help="folder of TOFU json files")
    parser.add_argument("--timings", required=True, help="where to write the timings (JSON)")
    parser.add_argument("entry", choices=["eval", "train"])
    # REMAINDER: Hydra options such as --config-name=unlearn.yaml pass through untouched
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    started = time.perf_counter()
    src = os.path.join(os.path.abspath(args.checkout), "src")
    sys.path.insert(0, src)
    import data.qa

    import data.utils

    loader = _local_tofu_loader(os.path.abspath(args.tofu), data.utils.load_hf_dataset)
    data.utils.load_hf_dataset = loader
    data.qa.load_hf_dataset = loader
    imported = time.perf_counter()

    sys.argv = [os.path.join(src, f"{args.entry}.py"), *args.overrides]
    os.chdir(os.path.abspath(args.checkout))  # its configs use paths relative to the checkout
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # hydra exits through sys.exit
        if e.code not in (0, None):
            raise
    finished = time.perf_counter()
    with open(args.timings, "w", encoding="utf-8") as f:
        json.dump({"import_s": imported - started, "entry_s": finished - imported}, f)


if __name__ == "__main__":
    main()
