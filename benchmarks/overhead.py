"""What the control overhead is made of: `python benchmarks/overhead.py` (about 3 minutes).

For a few cases of the suite (eager, one thread, forced decisions as in run.py), times in
interleaved rounds, per input:
  oracle        the units called back to back on pre-sliced inputs (run.py's oracle)
  oracle+k ops  the same, with k tiny tensor ops between consecutive unit calls: what any
                runtime that does *something* between units pays (dispatch, and the caches and
                branch predictors the units find colder)
  runtime only  dyngraph's infer pass with every unit replaced by a lookup of its output, right
                after the other functions' units ran (cold caches), and run again at once (warm)
  dyngraph      the real infer pass; and the time spent inside units, in it and in the oracle
  dyngraph (ATen decisions)  the same pass with the fused decision kernels off
Writes benchmarks/OVERHEAD.md.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import machine
import torch
from run import case_specs, force, inputs, oracle, time_interleaved, unit_calls

import dyngraph as dg
from dyngraph.runtime import kernels

HERE = Path(__file__).resolve().parent
CASES = [
    ("early_exit", 0.3),
    ("early_exit", "max_prob 0.3"),
    ("gates", 0.6),
    ("metalayer", [0.55, 0.25, 0.15, 0.05]),
    ("halting", (1, 20)),
]


class UnitClock:
    """Wraps every unit of a model: times the calls, or answers from a table of outputs."""

    def __init__(self, model):
        self.units, self.seconds, self.stub = model.units, 0.0, False
        self.table: dict[tuple[int, int], object] = {}
        for u in self.units:
            u.fn = self._wrap(u)

    def _wrap(self, unit):
        module = unit.module

        def fn(*args):
            if self.stub:
                key = (unit.index, args[0].shape[0])
                if key not in self.table:
                    self.table[key] = module(*args)
                return self.table[key]
            t0 = time.perf_counter()
            out = module(*args)
            self.seconds += time.perf_counter() - t0
            return out

        return fn


def real_thresholds(model, xs: list[torch.Tensor], continuing: float) -> None:
    """Early exit with its real criterion (max_prob): each exit's threshold at the quantile of
    its confidence over the inputs that lets the fraction `continuing` of its arrivals go on."""
    from dyngraph.constructs.exit import confidence

    x = torch.cat(xs)
    logits = model(x, mode="dense").extras["exit_logits"]
    arrived = torch.ones(x.shape[0], dtype=torch.bool)
    for e, z in zip(model.exits[:-1], logits, strict=False):
        conf = confidence(z, "max_prob", 1.0)
        e.threshold = float(torch.quantile(conf[arrived], continuing)) if arrived.any() else 0.0
        arrived &= conf < e.threshold


@torch.no_grad()
def measure(kind: str, setting, b: int) -> dict:
    spec, _ = case_specs(kind)
    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").eval()
    xs = inputs(b)
    if kind == "early_exit" and isinstance(setting, str):  # "max_prob 0.3": a real criterion
        real_thresholds(model, xs, float(setting.split()[1]))
    else:
        force(model, kind, setting)
    calls = unit_calls(model, xs)
    clock = UnitClock(model)
    inside: dict[str, list[float]] = {"dyngraph": [], "oracle": []}

    def timed(name, fn):
        def go():
            clock.seconds = 0.0
            fn()
            inside[name].append(clock.seconds)

        return go

    warm: list[float] = []

    def stubbed():  # timed as a whole when cold (after the other functions' units), and again warm
        clock.stub = True
        [model(x) for x in xs]
        t0 = time.perf_counter()
        [model(x) for x in xs]
        warm.append(time.perf_counter() - t0)
        clock.stub = False

    def aten_decisions():  # the same pass with the fused decision kernels off
        with kernels.disabled():
            [model(x) for x in xs]

    fns = {
        "oracle": timed("oracle", oracle(model, calls)),
        "oracle+3 ops": oracle(model, calls, between=3),
        "oracle+10 ops": oracle(model, calls, between=10),
        "runtime only": stubbed,
        "dyngraph": timed("dyngraph", lambda: [model(x) for x in xs]),
        "dyngraph (ATen decisions)": aten_decisions,
    }
    med = time_interleaved(fns, 0.3)
    n = len(xs)
    row = {k: 1e6 * v / n for k, v in med.items()}
    row["runtime only"] -= statistics.median(warm) * 1e6 / n  # the cold pass alone
    row["runtime only (warm)"] = statistics.median(warm) * 1e6 / n
    for k, v in inside.items():
        row[f"in units ({k})"] = 1e6 * sorted(v)[len(v) // 2] / n
    row["unit calls"] = sum(len(c) for c in calls) / n
    return row


def main() -> None:
    torch.set_num_threads(1)
    cols = [
        "oracle",
        "oracle+3 ops",
        "oracle+10 ops",
        "runtime only (warm)",
        "runtime only",
        "dyngraph",
        "in units (oracle)",
        "in units (dyngraph)",
        "dyngraph (ATen decisions)",
    ]
    lines = [
        "# Control overhead, decomposed",
        "",
        f"`python benchmarks/overhead.py` — {machine.describe()}, 1 thread, torch {torch.__version__}, "
        "eager. µs per call (B = 256, 64: one batch; B = 1: one input, the mean over 64); "
        "medians over interleaved rounds. `in units`: time spent inside the units' calls. "
        "`dyngraph (ATen decisions)`: the same pass with the fused decision kernels off (where a "
        "quantile threshold equals a sample's score, as at an exit that one sample reaches in the "
        "`max_prob` case, the two paths' scores may differ in the last bit and the pass may run "
        "other units).",
        "",
        "| case | B | unit calls | " + " | ".join(cols) + " | dyngraph / oracle |",
        "|---|---:|---:|" + "---:|" * (len(cols) + 1),
    ]
    for kind, setting in CASES:
        for b in (256, 64, 1):
            r = measure(kind, setting, b)
            lines.append(
                f"| {kind} {setting} | {b} | {r['unit calls']:.1f} | "
                + " | ".join(f"{r[c]:.1f}" for c in cols)
                + f" | {r['dyngraph'] / r['oracle']:.3f} |"
            )
            print(lines[-1], flush=True)
    (HERE / "OVERHEAD.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
