"""Spec problems: each one located at FILE:LINE:COL with a path into the spec."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem in a spec, located at a line and column (1-based; 0 when unknown)."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


#: Problems printed by a SpecError; the rest are counted ("and K more").
MAX_SHOWN = 50


class SpecError(Exception):
    """A spec has one or more problems; `problems` lists every one of them, each once.

    Its text lists the first MAX_SHOWN, then how many more there are.
    """

    def __init__(self, problems: Iterable[Problem]):
        self.problems = sorted(
            set(problems), key=lambda p: (p.file, p.line, p.col, p.path, p.message)
        )
        lines = [str(p) for p in self.problems[:MAX_SHOWN]]
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(lines))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" if none is close."""
    close = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_path(loc: Iterable[object]) -> str:
    """Format a location tuple as `graph[3].gate.body`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
