"""What the command line checks before doing any work: option values and output paths.

Each problem is one line and exit status 2; nothing is written for a request that is refused.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class UsageError(Exception):
    """A request that cannot be carried out as given (one line, exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (the usage is one `--help` away)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(
            f"{text} is not a fraction of the longest path's MACs in (0, 1]"
        )
    return v


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {v}")
    return v


def check_writable(path: str | Path, folder: bool) -> Path:
    """`path` as an output that can be written (a folder, or a file), without creating it."""
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise UsageError(f"--out {p}: exists and is not a folder")
        if not folder and p.is_dir():
            raise UsageError(f"--out {p}: is a folder; name a file")
        target = p if folder else p.parent
    else:
        target = p.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise UsageError(f"--out {p}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK) or str(target.resolve()).startswith(("/proc", "/sys")):
        raise UsageError(f"--out {p}: {target} is not writable")
    return p


def check_rows(max_rows: int | None, batch_size: int) -> None:
    """A stream's bound on waiting rows holds at least one batch."""
    if max_rows is not None and max_rows < batch_size:
        raise UsageError(f"--max-rows {max_rows}: at least the batch size ({batch_size})")
