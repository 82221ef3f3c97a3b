"""List, and with ``--yes`` remove, the folders that killed runs left behind.

A run works in a staging folder next to its output (``<name>.incomplete-<pid>-<time>-<random>``) and removes
it when it fails; a run killed outright (SIGKILL, power loss) cannot, so the folder stays until the next run of
the same output finishes. Those folders, and runs set aside by an interrupted replacement
(``<name>.replaced-<pid>``), are found under the folders given, at any depth; a folder whose run is still alive
(its output's lock is held) is never touched, and nothing else is ever removed.

    python src/clean.py saves            # list them, with their sizes and checkpoints
    python src/clean.py saves --yes      # remove them
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from run_folder import checkpoints, folder_bytes, resumable_checkpoint, stale_folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="where to look (e.g. saves)")
    parser.add_argument("--yes", action="store_true", help="remove what is listed (default: only list it)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    found = [p for root in args.folders for p in stale_folders(root)]
    if not found:
        print("nothing to clean: no staging folder of a dead run under " + ", ".join(map(str, args.folders)))
        return 0
    total = 0
    for folder in found:
        size = folder_bytes(folder)
        total += size
        held = checkpoints(folder)
        note = ""
        if any(resumable_checkpoint(c) for c in held):
            note = " (resumable: trainer.args.resume_from_checkpoint=true with that run's paths.output_dir)"
        elif held:
            note = " (weights-only checkpoints: not resumable)"
        names = f"; checkpoints {', '.join(c.name for c in held)}" if held else ""
        print(f"{folder}  {size / 1e6:.1f} MB{names}{note}")
    print(f"{len(found)} folder(s), {total / 1e6:.1f} MB")
    if not args.yes:
        print("run again with --yes to remove them")
        return 0
    for folder in found:
        shutil.rmtree(folder)
    print(f"removed {len(found)} folder(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
