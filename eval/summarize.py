"""A markdown table of target errors (with 95% intervals) across several transfer evaluations.

    python eval/summarize.py PGD=runs/eval/pgd/results.json "SGM 0.2=runs/eval/sgm02/results.json" \\
        [--source NAME] [--targets A B] [--out table.md]
Every run must have evaluated the same images (their samples_sha256 agree). See decorr/summary.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from decorr.errors import DecorrError, cli_entry
from decorr.summary import error_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RESULTS_JSON")
    p.add_argument("--source", default=None, help="the attacked model (default: the first source)")
    p.add_argument("--targets", nargs="+", default=None, help="target columns (default: every other target)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p.parse_args(argv)


def _read(text: str) -> tuple[str, dict]:
    label, sep, path = text.partition("=")
    if not sep or not label:
        raise DecorrError(f"{text!r} is not LABEL=RESULTS_JSON; e.g. PGD=runs/eval/pgd/results.json")
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    try:
        return label, json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DecorrError(f"cannot read {file} ({err}); give a results.json of eval/transfer.py") from None


@cli_entry
def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    runs = dict(_read(text) for text in args.runs)
    table = error_table(runs, source=args.source, targets=args.targets)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
