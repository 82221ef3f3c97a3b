"""A results report over many runs: one table, a few plots and a per-sample view of the forget set.

    python src/report.py saves/unlearn saves/eval [--out saves/report] [--target saves/eval/target] \
        [--retain saves/eval/retain90] [--title "forget10 sweep"]

Every folder given is walked recursively for runs of ``src/train.py`` and evaluations of ``src/eval.py``. The
output folder (``--out``, default ``<first folder>/report``) receives ``report.md``, ``report.csv``,
``report.html`` (self-contained) and one PNG per plot, each written atomically. This is the command line;
the report itself is the package ``reporting`` (src/reporting/). See docs/report.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reporting import DEFAULT_TITLE, ReportError, make_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="report.py", description="Collect the runs under the given folders into a table, plots and a "
        "per-sample view (report.md, report.csv, report.html).")
    parser.add_argument("folders", nargs="+", help="folders searched recursively for runs")
    parser.add_argument("--out", help="output folder (default: <first folder>/report)")
    parser.add_argument("--target", help="the target model's evaluation folder (default: detected)")
    parser.add_argument("--retain", help="the retain model's evaluation folder (default: detected)")
    parser.add_argument("--title", default=DEFAULT_TITLE, help="title of the report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: writes the report and prints the path of report.html."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        page = make_report(args.folders, out=args.out, target=args.target, retain=args.retain, title=args.title)
    except ReportError as e:
        raise SystemExit(f"report: error: {e}") from None
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
