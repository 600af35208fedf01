"""A minimal progress bar on stderr (shown on a terminal, or when asked)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, "profile") as p: p.update(n, loss=...)`."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def update(self, n: int = 1, **fields: float) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac)
        info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:,.0f}/s {info}   "
        )
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            sys.stderr.write("\n")
