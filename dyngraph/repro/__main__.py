"""`python -m dyngraph.repro NAME [--quick]`: run one reproduction, write docs/repro/NAME.{json,png}."""

from __future__ import annotations

import argparse
import importlib
import json

NAMES = ("early_exit", "gates", "act", "pondernet", "l2s", "composer")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m dyngraph.repro")
    ap.add_argument("name", choices=NAMES)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="150 steps per stage: checks the pipeline, not the claim",
    )
    args = ap.parse_args()
    mod = importlib.import_module(f"dyngraph.repro.{args.name}")
    print(json.dumps(mod.run(quick=args.quick), indent=1, default=float)[:6000])


if __name__ == "__main__":
    main()
