"""Paired comparison of two transfer evaluations on the same images.

    python eval/compare.py A/results.json B/results.json [--out comparison.json] [--csv comparison.csv]

For every (source, target, eps) in both results (matched by model name and epsilon): both transfer
rates, their difference (B - A), and McNemar's exact test (two-sided binomial test on the discordant
images) of the per-image outcome "the target is fooled by the source's adversarial example" over all
shared images. Both runs must have evaluated the same images (settings.samples_sha256 and num_samples);
otherwise a one-line error. A folder holding results.json works too. --out and --csv are refused when they
would overwrite A or B (or each other), and when they exist, unless --overwrite. See docs/transfer.md.
"""

from __future__ import annotations

import argparse

from decorr.config import parse_with_config
from decorr.evaluation.compare import compare_results, load_results
from decorr.errors import cli_entry
from decorr.evaluation.report import COMPARE_CSV_HEADER, compare_rows, format_comparison
from decorr.io import check_output_file, check_paths_apart, results_file, write_csv, write_results_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="results.json of the first evaluation (or its folder)")
    p.add_argument("b", metavar="B", help="results.json of the second evaluation (or its folder)")
    p.add_argument("--out", default=None, help="also write the comparison as JSON (decorr-transfer-compare/1)")
    p.add_argument("--csv", default=None, help="also write one CSV row per (source, target, eps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --csv file")
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    outputs = {"--out": args.out, "--csv": args.csv}
    for flag, path in outputs.items():  # before anything is read or written
        if path:
            check_output_file(path, flag=flag, overwrite=args.overwrite)
    check_paths_apart(outputs, {args.a: results_file(args.a), args.b: results_file(args.b)})
    comparison = compare_results(load_results(args.a), load_results(args.b), labels=(args.a, args.b))
    if args.out:
        write_results_json(args.out, comparison)
    if args.csv:
        write_csv(args.csv, COMPARE_CSV_HEADER, compare_rows(comparison))
    print(format_comparison(comparison))
    return comparison


if __name__ == "__main__":
    main()
