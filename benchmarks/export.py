"""An export (`dg.export`) run by its standalone runner against the compiled model it came from.

    python benchmarks/export.py            # writes benchmarks/RESULTS-export.md

For specs of every kind of step (exits and gates per sample, a transformer with exits on
sequences of mixed lengths, a Composer metalayer per sample and per token, ACT through time,
Mixture-of-Depths, per-token exits, halting per position), at B = 1 and 256, one thread: the compiled model's infer pass
(`backend: none`: eager units, the generated infer function, the fused decision kernels) and
the exported runner's (`torch.export` programs, the manifest's steps, torch alone) and, for
two specs, the runner of an `--aot` export (AOTInductor packages), timed in interleaved rounds
in the same run, on the same inputs and weights (untrained, decisions spread as the test suite
spreads them). Target: the runner <= 1.05 x the compiled model. The runner takes its
decisions with the export's copy of the fused kernels, as the compiled model does; the same
export loaded with `DYNGRAPH_KERNELS=0` (decisions as ATen ops) is timed beside it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import machine  # noqa: E402
from run import time_interleaved  # noqa: E402

from dyngraph.export import export, load_exported  # noqa: E402
from tests.conftest import compiled, random_batch  # noqa: E402

SPECS = (
    "digits_early_exit",
    "msdnet_early_exit",
    "skipnet_ff",
    "skipnet_rnn",
    "deebert_transformer",
    "composer_wide_digits",  # a metalayer per sample
    "act_addition",  # halting through time
    "mod_tagger",  # Mixture-of-Depths
    "composer_tokens",  # a metalayer per token
    "calm_tagger",  # per-token exits: the layers after them run partial queries
    "ut_tagger",  # halting over depth per position
)
AOT = ("digits_early_exit", "skipnet_ff")  # also exported with --aot (minutes of compiling)


@torch.no_grad()
def measure(name: str, batch: int, folder: Path, aot: bool) -> dict:
    model = compiled(HERE.parent / "specs" / f"{name}.yaml", "none")
    fns = {"compiled": lambda: model(x)}
    for kind, on in (("runner", False), ("aot", True)):
        if on and not aot:
            continue
        where = folder / kind
        runner = load_exported(where if where.exists() else export(model, where, aot=on))
        fns[kind] = lambda r=runner: r(x)
        if kind == "runner":  # the same export, its decisions as ATen ops (no kernels)
            os.environ["DYNGRAPH_KERNELS"] = "0"
            try:
                aten = load_exported(where)
            finally:
                del os.environ["DYNGRAPH_KERNELS"]
            assert aten.kernels is None and runner.kernels is not None
            fns["aten"] = lambda r=aten: r(x)
    x = random_batch(model, batch, seed=11)
    t = time_interleaved(fns, 1.0)
    return {"spec": name, "B": batch, **{f"{k}_ms": v * 1e3 for k, v in t.items()}}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SPECS:
            for b in (1, 256):
                rows.append(measure(name, b, Path(tmp) / name, name in AOT))
    lines = [
        "# Exported runner against the compiled model (benchmarks/export.py)",
        "",
        f"{machine.describe()}, torch {torch.__version__}, one thread. "
        "Times are medians of interleaved rounds, every ratio taken in the same run. The runner "
        "takes its decisions with the fused kernels the export carries (runner/fused.py); "
        "'ATen decisions': the same export loaded with DYNGRAPH_KERNELS=0.",
        "",
        "| spec | B | compiled ms | runner ms | runner / compiled | runner, ATen decisions "
        "/ compiled | runner --aot ms | --aot / compiled | best <= 1.05 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        c, ratio = r["compiled_ms"], r["runner_ms"] / r["compiled_ms"]
        aot = r.get("aot_ms")
        best = min(ratio, aot / c if aot else ratio)
        lines.append(
            f"| {r['spec']} | {r['B']} | {c:.3f} | {r['runner_ms']:.3f} | {ratio:.3f} | "
            f"{r['aten_ms'] / c:.3f} | "
            + (f"{aot:.3f} | {aot / c:.3f} | " if aot else "- | - | ")
            + f"{'yes' if best <= 1.05 else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "RESULTS-export.md").write_text(text)


if __name__ == "__main__":
    main()
