"""Plan steps that are not constructs: a top-level static segment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SegmentStep:
    """A top-level static segment: writes its outputs into the environment."""

    unit: Any  # a compiler Unit
    reads: list[str]
    outputs: list[str]
    writes: str | None = None
    live_after: set[str] = field(default_factory=set)  # ids read after it (or the output)

    def run(self, ctx) -> None:
        env = ctx.env
        if len(self.reads) == 1 == len(self.outputs):  # the common case, with less Python
            env[self.outputs[0]] = ctx.call(self.unit, env[self.reads[0]])[0]
            return
        outs = ctx.call(self.unit, *[env[i] for i in self.reads])
        for k, v in zip(self.outputs, outs, strict=True):
            env[k] = v

    def emit_infer(self, g) -> None:
        """Infer code (runtime/codegen.py): `v3, = unit(v2)`."""
        call = g.call(self.unit, [g.var(r) for r in self.reads])
        g.line(f"{g.define(self.outputs)}= {call}")

    def export_step(self) -> dict:
        """Its step in an export's manifest (runtime/runner runs it)."""
        return {"kind": "segment", "unit": self.unit.index, "reads": list(self.reads),
                "outputs": list(self.outputs)}  # fmt: skip
