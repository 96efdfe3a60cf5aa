"""Many transfer evaluations from one sweep file; killed and started again, only what is missing is computed.

    python eval/sweep.py sweep.yaml --out runs/sweep           # every cell not done yet, then the summary
    python eval/sweep.py sweep.yaml --out runs/sweep --dry-run # the cells, which are done, the cost of the rest
    python eval/sweep.py sweep.yaml --out runs/sweep --summary # the summary tables of the done cells only
    torchrun --nproc_per_node 2 eval/sweep.py sweep.yaml --out runs/sweep   (each cell split over processes)
The sweep file (YAML or JSON) names datasets, model groups, attacks, epsilons and shared settings (any
eval/transfer.py setting); it expands into cells (datasets x model groups x attacks), each an evaluation
kept under DIR/cells/ by a hash of its resolved settings and its models' files (decorr/evaluation/sweep.py
has the format). DIR/summary.md tabulates every target's accuracy per attack and under any attack of the
sweep, with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import sys

from decorr.config import parse_with_config, set_threads
from decorr.distributed import rank
from decorr.errors import cli_entry
from decorr.evaluation.progress import sweep_reporters
from decorr.evaluation.sweep import load_sweep, pending_gradients, plan_sweep, run_sweep, summarise_sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep file (YAML or JSON)")
    p.add_argument("--out", required=True, help="the sweep's folder (cells and summary); a sweep there continues")
    p.add_argument("--dry-run", action="store_true", help="list the cells, which are done, and the cost of the rest")
    p.add_argument("--summary", action="store_true", help="write the summary of the done cells and stop")
    p.add_argument("--quiet", action="store_true", help="no progress, only errors and the final line")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 1 on a shared machine)")
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    cells = load_sweep(args.sweep)
    if args.dry_run:
        plans = plan_sweep(cells, args.out)
        print(json.dumps(plans, indent=2))
        return {"cells": len(cells), "done": sum(p["done"] for p in plans)}
    if args.summary:
        print(f"wrote {summarise_sweep(cells, args.out)}")
        return {"cells": len(cells)}
    say = (lambda *_: None) if args.quiet else (lambda cell, what: print(f"{cell.name}: {what}", file=sys.stderr,
                                                                        flush=True))
    reporters = sweep_reporters(pending_gradients(cells, args.out), quiet=args.quiet)
    counts = run_sweep(cells, args.out, reporters=reporters, on_cell=say)
    if rank() == 0:
        print(f"sweep {args.out}: {counts['cells']} cells, {counts['computed']} computed now, {counts['reused']} "
              "reused; summary in summary.md")
    return counts


if __name__ == "__main__":
    main()
