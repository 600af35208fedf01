"""Progress bars (tqdm) on stderr: shown on a terminal, or when asked."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """`with Progress(total, "profile") as p: p.update(n, loss=...)`."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.bar = tqdm(total=total, desc=label, disable=not self.enabled, dynamic_ncols=True)

    def update(self, n: int = 1, **fields: float) -> None:
        if self.enabled:
            if fields:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in fields.items()}, refresh=False)
            self.bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
