"""The command line and results file shared by the per-token benchmarks (tokens.py,
token_rows.py, token_choices.py): B = 32 at L = 64 and 256, three fractions each, one thread;
`--quick` times L = 64 only, shorter, into a `-quick` file that is not kept in git."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import torch

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
    args = ap.parse_args()
    torch.set_num_threads(1)
    lengths = [64] if args.quick else [64, 256]
    rows = [measure(n, c, 0.5 if args.quick else 2.0) for n in lengths for c in fractions]
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one "
            f"thread, {setup} Times are medians of interleaved rounds, every ratio taken in the "
            "same run.",
            "",
            table(rows),
            "",
        ]
    )
    print(text)
    out = Path(args.out) if args.out else HERE / f"{stem}{'-quick' if args.quick else ''}.md"
    out.write_text(text)
