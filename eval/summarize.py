"""Markdown tables across several transfer evaluations: target errors, or ensemble measures over seeds.

    python eval/summarize.py PGD=runs/eval/pgd/results.json "SGM 0.2=runs/eval/sgm02/results.json" \\
        [--source NAME] [--targets A B] [--out table.md]
    python eval/summarize.py --across-seeds ce=runs/eval/ce_s0,runs/eval/ce_s1 dec=runs/eval/dec_s0,runs/eval/dec_s1 \\
        [--baseline ce]
    python eval/summarize.py --defence ce=runs/eval/surr:ce_s0,runs/eval/surr:ce_s1 dec=runs/eval/dec_s0,... \\
        [--baseline ce] [--eps 0.0314]
The first form: each target's error under one source's attack, 95% Wilson intervals (decorr/evaluation/summary.py).
With --across-seeds each LABEL names one method's evaluations, one per training seed (results.json files or
their folders, comma-separated): member accuracy, feature R^2, active features, effective rank and the
members' mean transfer rate, as means over seeds with 95% t-intervals, and with --baseline each group's
seed-by-seed difference to that group (decorr/evaluation/seeds.py). Every run must have evaluated the same images
(their samples_sha256 agree). With --defence each LABEL names one defended model per seed (RESULTS:TARGET, or
RESULTS alone when it has one ensemble target): its clean accuracy, white-box accuracy (when it was attacked),
accuracy on every other source's examples and its members' disagreement-detection AUC, over seeds.
--out and --plot are refused when they would overwrite an input results.json (or each other), and when they
exist, unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from decorr.config import parse_with_config
from decorr.errors import DecorrError, cli_entry, pixel_value
from decorr.evaluation.seeds import defence_table, plot_accuracy_transfer, seed_table
from decorr.evaluation.summary import error_table
from decorr.io import check_output_file, check_paths_apart, results_file, write_text

#: Every results.json read by this run, by the text that named it: no output may overwrite one.
_inputs: dict[str, Path] = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RESULTS_JSON",
                   help="LABEL=RESULTS_JSON; with --across-seeds LABEL=RESULTS_JSON,RESULTS_JSON,...")
    p.add_argument("--across-seeds", action="store_true",
                   help="each LABEL is a method's evaluations over seeds: means with 95%% t-intervals")
    p.add_argument("--defence", action="store_true",
                   help="each LABEL is one defended model per seed (RESULTS[:TARGET],...): accuracies under attack, AUC")
    p.add_argument("--baseline", default=None,
                   help="--across-seeds / --defence: also the seed-by-seed difference to this LABEL")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="--across-seeds: also plot members' transfer against clean accuracy per LABEL")
    p.add_argument("--plot-eps", type=pixel_value, default=None, help="--plot: the epsilon (default: the largest)")
    p.add_argument("--eps", nargs="+", type=pixel_value, default=None,
                   help="--defence: only these epsilons' columns (pixel units, e.g. 8/255)")
    p.add_argument("--transpose", action="store_true",
                   help="--defence / --across-seeds: measures (attacks) as rows and the LABELs as columns")
    p.add_argument("--source", default=None, help="the attacked model (default: the first source)")
    p.add_argument("--targets", nargs="+", default=None, help="target columns (default: every other target)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot file")
    return parse_with_config(p, argv)


def _load(path: str) -> dict:
    file = results_file(path)
    _inputs[path] = file
    try:
        result = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DecorrError(f"cannot read {file} ({err}); give a results.json of eval/transfer.py") from None
    if not isinstance(result, dict) or not str(result.get("format", "")).startswith("decorr-transfer/"):
        raise DecorrError(f"{file} is not a results.json of eval/transfer.py (no 'format': 'decorr-transfer/...')")
    return result


def _load_target(path: str) -> tuple[dict, str | None]:
    """``RESULTS[:TARGET]``: the part after the last ':' is a target name unless the whole is a file or folder."""
    head, sep, target = path.rpartition(":")
    if not sep or Path(path).exists() or not head:
        return _load(path), None
    return _load(head), target


def _read(text: str, many: bool = False) -> tuple[str, dict | list[dict]]:
    label, sep, paths = text.partition("=")
    if not sep or not label or not paths:
        example = "ce=runs/eval/ce_s0,runs/eval/ce_s1" if many else "PGD=runs/eval/pgd/results.json"
        raise DecorrError(f"{text!r} is not LABEL={'RESULTS,...' if many else 'RESULTS_JSON'}; e.g. {example}")
    if many:
        return label, [_load(path) for path in paths.split(",") if path]
    return label, _load(paths)


def _unique(labels: list[str]) -> None:
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise DecorrError(f"label {repeated[0]!r} is given twice; give every run (or group) its own LABEL")


def _groups(texts: list[str], many: bool) -> dict:
    groups = [_read(text, many) for text in texts]
    _unique([label for label, _ in groups])
    return dict(groups)


def _labelled(texts: list[str]) -> dict[str, list[str]]:
    """``LABEL=PATH,PATH,...`` texts as label -> paths (the --defence form, whose paths may name a target)."""
    groups = []
    for text in texts:
        label, sep, paths = text.partition("=")
        if not sep or not label or not paths:
            raise DecorrError(f"{text!r} is not LABEL=RESULTS[:TARGET],...; e.g. ce=runs/eval/surr:ce_s0")
        groups.append((label, [p for p in paths.split(",") if p]))
    _unique([label for label, _ in groups])
    return dict(groups)


@cli_entry
def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    _inputs.clear()
    outputs = {"--out": args.out, "--plot": args.plot}
    for flag, path in outputs.items():  # before anything is read or written
        if path:
            check_output_file(path, flag=flag, overwrite=args.overwrite)
    if (args.plot or args.plot_eps is not None) and not args.across_seeds:
        raise DecorrError("--plot draws the --across-seeds groups; add --across-seeds")
    if args.transpose and not (args.defence or args.across_seeds):
        raise DecorrError("--transpose lays out the --defence and --across-seeds tables; add one of them")
    if args.eps is not None and not args.defence:
        raise DecorrError("--eps selects columns of the --defence table; add --defence")
    if args.defence:
        if args.across_seeds or args.source or args.targets:
            raise DecorrError("--defence is its own table: drop --across-seeds, --source and --targets")
        groups = {label: [_load_target(path) for path in paths] for label, paths in _labelled(args.runs).items()}
        table = defence_table(groups, baseline=args.baseline, eps=args.eps, transpose=args.transpose)
    elif args.across_seeds:
        if args.source or args.targets:
            raise DecorrError("--source and --targets belong to the error table; --across-seeds uses every member")
        groups = _groups(args.runs, True)
        check_paths_apart(outputs, _inputs)
        table = seed_table(groups, baseline=args.baseline, transpose=args.transpose)
        if args.plot:
            eps = args.plot_eps if args.plot_eps is not None else max(r["eps"] for r in
                                                                       next(iter(groups.values()))[0]["by_eps"])
            plot_accuracy_transfer(groups, eps, args.plot)
    else:
        if args.baseline:
            raise DecorrError("--baseline needs --across-seeds or --defence")
        table = error_table(_groups(args.runs, False), source=args.source, targets=args.targets)
    check_paths_apart(outputs, _inputs)
    print(table)
    if args.out:
        write_text(args.out, table + "\n")
    return table


if __name__ == "__main__":
    main()
