"""`python -m dyngraph.repro NAME... [--seeds 0,1,2] [--quick]`: run reproductions over seeds.

Writes docs/repro/NAME.{json,png} (for another seed set, e.g. NAME.seeds-3-4-5.{json,png}) and prints
each claim with what was measured and whether it holds; exits 1 if one does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .common import NAMES, SEEDS, reproduce_all


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2; got {text!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected >= 2 distinct seeds >= 0; got {text!r}")
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m dyngraph.repro")
    ap.add_argument(
        "names",
        nargs="+",
        choices=(*NAMES, "all"),
        metavar="NAME",
        help=f"one or more of {', '.join(NAMES)}, or all",
    )
    ap.add_argument(
        "--seeds",
        type=_seeds,
        default=SEEDS,
        help="training seeds, comma-separated (default 0,1,2; each reproduction's held-out set "
        "is in dyngraph/repro/common.py HELD_OUT)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="load finished runs of the same spec from runs/repro instead of training them again",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="150 steps per stage: checks the pipeline, not the claim",
    )
    args = ap.parse_args()
    if args.reuse:  # read by train_spec in every worker process
        os.environ["DYNGRAPH_REPRO_REUSE"] = "1"
    names = NAMES if "all" in args.names else tuple(dict.fromkeys(args.names))
    t = time.perf_counter()
    results = reproduce_all(names, args.seeds, args.quick)
    failed = 0
    for name, r in results.items():
        print(f"\n{name} (seeds {', '.join(map(str, r['seeds']))})")
        for c in r["claims"].values():
            failed += not c["holds"]
            print(f"  {'holds' if c['holds'] else 'FAILS'}  {c['claim']}\n         {c['measured']}")
    print(f"\n{time.perf_counter() - t:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
