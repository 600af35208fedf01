"""The command line and results file shared by the per-token benchmarks (tokens.py,
token_rows.py, token_choices.py): B = 32 at L = 64 and 256, three fractions each, one thread;
`--quick` times L = 64 only, shorter, into a `-quick` file that is not kept in git;
`--steady-malloc` holds glibc's heap (`dg.hold_heap`: no pages given back and faulted in again
between calls) and writes a `-steady` file; the committed default files keep glibc's defaults.
Each point is measured in `--runs` processes (default 3; `--quick`: 1) and the row kept is the
run with the median dyngraph / oracle: with glibc's defaults one process's ratios moved by
+-10-25% from the next (median_run)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import machine
import torch

import dyngraph as dg

HERE = Path(__file__).resolve().parent


def fractions(t: dict[str, float], ref: str) -> dict[str, float]:
    """dyngraph's (`t`), the oracle's and masking's times as fractions of `ref`'s, and `ref`'s
    own time in ms (`<ref>_ms`)."""
    out = {k: t[name] / t[ref] for k, name in (("t", "dyngraph"), ("oracle", "oracle"),
                                                 ("masking", "masking"))}  # fmt: skip
    return out | {f"{ref}_ms": t[ref] * 1e3}


def speedup_share(r: dict) -> float:
    """dyngraph's speedup over masking as a share of the oracle's: (m / t) / (m / o) = o / t."""
    return r["oracle"] / r["t"]


def main(
    doc: str,
    title: str,
    setup: str,
    measure: Callable[[int, float, float], dict],
    fractions: tuple[float, ...],
    table: Callable[[list[dict]], str],
    stem: str,
) -> None:
    """Parse the command line, measure every (L, fraction), print and write the table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steady-malloc", action="store_true", help="hold glibc's heap (dg.hold_heap)")
    ap.add_argument("--runs", type=int, default=None, help="processes (default 3; --quick 1)")
    ap.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # (one run's rows)
    args = ap.parse_args()
    torch.set_num_threads(1)
    steady = args.steady_malloc and dg.hold_heap()
    runs = args.runs or (1 if args.quick else 3)
    if args.rows_json or runs == 1:
        lengths = [64] if args.quick else [64, 256]
        rows = [measure(n, c, 0.5 if args.quick else 2.0) for n in lengths for c in fractions]
        if args.rows_json:
            Path(args.rows_json).write_text(json.dumps(rows))
            return
    else:
        rows = median_run([_one_run(args) for _ in range(runs)])
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"{machine.describe()}, torch {torch.__version__}, one "
            f"thread, {setup} Times are medians of interleaved rounds, every ratio taken in the "
            "same run"
            + (
                f"; each row is the run with the median dyngraph / oracle of {runs} processes"
                if runs > 1
                else ""
            )
            + (f"; {machine.HEAP_HELD}." if steady else "."),
            "",
            table(rows),
            "",
        ]
    )
    print(text)
    tail = ("-quick" if args.quick else "") + ("-steady" if steady else "")
    out = Path(args.out) if args.out else HERE / f"{stem}{tail}.md"
    out.write_text(text)


def _one_run(args: argparse.Namespace) -> list[dict]:
    """Every point measured in a new process (this script, with the same options)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        flags = ["--quick"] * args.quick + ["--steady-malloc"] * args.steady_malloc
        subprocess.run([sys.executable, sys.argv[0], *flags, "--rows-json", str(out)], check=True)
        return json.loads(out.read_text())


def median_run(runs: list[list[dict]]) -> list[dict]:
    """Per point, the row of the run whose dyngraph / oracle is the median of the runs': one
    real measurement (its columns from the same rounds), not a mix of runs. A process draws
    its own pattern of glibc's page returns, which moved a point's ratio by +-10-25% from one
    process to the next (benchmarks/RESULTS-tokens.md, two runs of one version: 1.126 / 1.303
    at L = 64, c = 0.125), more than the interleaved rounds within a process."""
    return [
        sorted(rs, key=lambda r: r["t"] / r["oracle"])[len(rs) // 2]
        for rs in zip(*runs, strict=True)
    ]
