"""Runs one open-unlearning entry point (src/eval.py or src/train.py) from a checkout, on local data files.

This file runs in open-unlearning's own virtualenv (``benchmarks/vs_open_unlearning.py`` starts it);
it imports nothing of ours. open-unlearning reads its benchmarks from the Hub through one function,
``data.utils.load_hf_dataset(path, name=..., split=...)``; here that function is replaced so that the
same calls read local JSON-lines files instead, which is the only change made to its behaviour:

- ``locuslab/TOFU``, config ``<split>`` -> ``<tofu>/<split>.json``;
- ``muse-bench/MUSE-News``, subset ``<name>``, split ``<split>`` -> ``<muse>/<name>_<split>.json``
  (``muse_local_stem``: the layout of ../shared/data/muse_news, whose README maps each file to its
  Hub subset and split).

Any other path goes to the Hub loader as before. The rest is its own code, driven through its Hydra
entry point with the overrides given:

    python benchmarks/ou_driver.py --checkout <open-unlearning> --tofu <folder> --timings <file.json> \
        eval -- model=... eval=tofu ...
    python benchmarks/ou_driver.py --checkout <open-unlearning> --muse <folder> --timings <file.json> \
        eval -- model=... eval=muse ...

``--timings`` receives ``{"entry_s": seconds inside the entry point, "import_s": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

TOFU_HUB_PATH = "locuslab/TOFU"
MUSE_HUB_PATH = "muse-bench/MUSE-News"
#: (subset, split) pairs of the MUSE-News Hub dataset whose local file is not ``<subset>_<split>.json``:
#: the local copy keeps the retain-set membership chunks as privleak_retain2.json.
MUSE_LOCAL_EXCEPTIONS = {("privleak", "retain"): "privleak_retain2"}


def muse_local_stem(name: str, split: str) -> str:
    """The local file (without ``.json``) holding subset ``name``, split ``split`` of muse-bench/MUSE-News."""
    return MUSE_LOCAL_EXCEPTIONS.get((name, split), f"{name}_{split}")


def _read_json_lines(path: str, what: str, split: str = "train"):
    import datasets

    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        present = sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
        raise FileNotFoundError(f"open-unlearning asked for {what}: no file {path} (the folder has: "
                                f"{', '.join(present) or 'nothing'})")
    return datasets.load_dataset("json", data_files=path, split=split)


def local_loader(original, tofu_dir: str | None = None, muse_dir: str | None = None):
    """A ``load_hf_dataset`` that reads TOFU / MUSE-News from the given folders and passes anything else on."""

    def load_hf_dataset(path, **kwargs):
        if path == TOFU_HUB_PATH and tofu_dir:
            name = kwargs.pop("name")
            split = kwargs.pop("split", "train")
            return _read_json_lines(os.path.join(tofu_dir, f"{name}.json"), f"TOFU split {name!r}", split)
        if path == MUSE_HUB_PATH and muse_dir:
            # a local file holds one Hub split, which datasets calls "train"
            name, split = kwargs.pop("name"), kwargs.pop("split")
            return _read_json_lines(os.path.join(muse_dir, f"{muse_local_stem(name, split)}.json"),
                                    f"MUSE-News {name}/{split}")
        return original(path, **kwargs)

    return load_hf_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="the open-unlearning checkout")
    parser.add_argument("--tofu", default=None, help="folder of TOFU json files")
    parser.add_argument("--muse", default=None, help="folder of MUSE-News json files (../shared/data/muse_news)")
    parser.add_argument("--timings", required=True, help="where to write the timings (JSON)")
    parser.add_argument("entry", choices=["eval", "train"])
    # REMAINDER: Hydra options such as --config-name=unlearn.yaml pass through untouched
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if not (args.tofu or args.muse):
        parser.error("give --tofu and/or --muse: the folders that replace the Hub datasets")

    started = time.perf_counter()
    src = os.path.join(os.path.abspath(args.checkout), "src")
    sys.path.insert(0, src)
    import data.pretraining
    import data.qa

    import data.utils

    loader = local_loader(data.utils.load_hf_dataset, tofu_dir=args.tofu and os.path.abspath(args.tofu),
                          muse_dir=args.muse and os.path.abspath(args.muse))
    # every module that imported the function by name gets the replacement
    for module in (data.utils, data.qa, data.pretraining):
        module.load_hf_dataset = loader
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
