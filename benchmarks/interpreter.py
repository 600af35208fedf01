"""How much of the control overhead is the runtime's interpreter, and what does the generated
infer function (runtime/codegen.py) recover?

    python benchmarks/interpreter.py      # about 5 minutes; writes benchmarks/INTERPRETER.md

Early exit (8 blocks, d = 512, 30% of the rows continuing past each exit), timed in
interleaved rounds against the oracle (benchmarks/run.py), with five versions of the same
infer pass. All of them call the same units and the same fused kernels on the same rows, and
return the same logits (checked):

  dyngraph          `model(x)`: the function generated for the model, its log and the
                    DynamicOutput/Trace wrapper
  no wrapper        the generated function alone (RunContext + `_run`), without `forward`'s
                    checks, Trace and DynamicOutput
  interpreter       `model(x)` with `model.codegen = False`: the plan interpreter (the step
                    loop, the env dict, each construct's `run`), as dense and train mode run
  interp. no wrap.  the interpreter alone
  straight-line     the pass written out by hand for this model: locals, no construct objects,
                    the kernels called directly; still logs its unit calls

The straight-line column is about what any Python runtime could reach on this model.

A second table times `model(x)` generated and interpreted on one setting of each case.
"""

from __future__ import annotations

from pathlib import Path

import machine
import torch
from run import case_model, inputs, oracle, time_interleaved, unit_calls

from dyngraph.runtime import kernels
from dyngraph.runtime.context import RunContext, draw_scale

CONTINUING = 0.3
# the second table: each construct once (a setting of each of run.py's cases)
CASES = [
    ("early_exit", 0.3),
    ("gates", 0.6),
    ("metalayer", [0.55, 0.25, 0.15, 0.05]),
    ("halting", (1, 20)),
]


def straight_line(model):
    """The infer pass of the early-exit case, written out by hand."""
    k = kernels.for_device(torch.device("cpu"))
    segments, heads = model.units[0::2], model.units[1::2]
    scales = [draw_scale(e.index) for e in model.exits]
    leave_p = 1 - CONTINUING  # as case_model forces it

    def run(x: torch.Tensor) -> torch.Tensor:
        events, b, out, idx, rows = [], x.shape[0], None, None, x.shape[0]
        for i in range(len(heads) - 1):
            (h,) = segments[i](x)
            events.append((segments[i].index, idx, None))
            z = heads[i](h)
            events.append((heads[i].index, idx, None))
            stay = k.rows_where(h, kernels.DRAW_AT_LEAST, leave_p, scales[i])
            n = stay.shape[0]
            if n != rows:
                if out is None:
                    out = z.new_empty((b, z.shape[1]))
                k.copy_rows_(out, idx, z, None)
                if n == 0:
                    return out
                if idx is None:
                    h, idx = h.index_select(0, stay), stay
                else:
                    h, idx = k.gather_rows([h, idx], stay)
                rows = n
            x = h
        (h,) = segments[-1](x)
        z = heads[-1](h)
        if out is None:
            return z
        k.copy_rows_(out, idx, z, None)
        return out

    return run


def against_oracle(model, passes: dict, xs: list[torch.Tensor], seconds: float) -> dict:
    """Each pass's time / the oracle's on inputs `xs` (interleaved rounds), after checking that
    every pass returns the logits of `model(x)`; with the oracle's µs per input."""
    with torch.no_grad():
        want = [model(x).logits for x in xs]
        for fn in passes.values():
            assert all(torch.equal(fn(x), w) for x, w in zip(xs, want, strict=True))
        fns = {"oracle": oracle(model, unit_calls(model, xs))}

    def timed(fn):
        def go():
            with torch.no_grad():
                for x in xs:
                    fn(x)

        return go

    fns.update({name: timed(fn) for name, fn in passes.items()})
    med = time_interleaved(fns, seconds)
    ratios = {k: med[k] / med["oracle"] for k in passes}
    return {"oracle_us": 1e6 * med["oracle"] / len(xs), **ratios}


def passes_of(model) -> dict:
    """`model(x)` through the generated function and through the interpreter, and each without
    `forward`'s wrapper."""

    def no_wrapper(codegen: bool):
        def run(x):
            model.codegen = codegen
            ctx = RunContext(x, "infer", model._plan.trace_sizes)
            model._run(ctx)
            return ctx.out

        return run

    def forward(codegen: bool):
        def run(x):
            model.codegen = codegen
            return model(x).logits

        return run

    return {
        "dyngraph": forward(True),
        "no wrapper": no_wrapper(True),
        "interpreter": forward(False),
        "interp. no wrap.": no_wrapper(False),
    }


def main() -> None:
    torch.set_num_threads(1)
    assert kernels.load(), "the kernels did not build"
    model = case_model("early_exit", CONTINUING)
    passes = {**passes_of(model), "straight-line": straight_line(model)}
    lines = [
        "# The interpreter's share of the control overhead",
        "",
        f"`python benchmarks/interpreter.py` — {machine.describe()}, 1 thread, "
        f"torch {torch.__version__}, eager. Each column: time / the oracle's, medians over "
        "interleaved rounds (B = 1: 64 inputs, one at a time). What each column runs: the "
        "docstring of interpreter.py.",
        "",
        f"Early exit, {CONTINUING:.0%} of the rows continuing past each exit:",
        "",
        "| B | oracle | " + " | ".join(passes) + " |",
        "|---:|" + "---:|" * (len(passes) + 1),
    ]
    print("\n".join(lines[-2:]))
    for b in (256, 64, 1):
        r = against_oracle(model, passes, inputs(b), 6.0)
        cells = [f"{r['oracle_us']:.0f} µs"] + [f"{r[k]:.3f}" for k in passes]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "Every case, the generated function against the interpreter (`model.codegen = False`), "
        "in the same rounds:",
        "",
        "| case | B | oracle | dyngraph | interpreter | interpreter / dyngraph |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines[-2:]))
    for kind, setting in CASES:
        model = case_model(kind, setting)
        both = {k: v for k, v in passes_of(model).items() if k in ("dyngraph", "interpreter")}
        for b in (256, 64, 1):
            r = against_oracle(model, both, inputs(b), 3.0)
            lines.append(
                f"| {kind} {setting} | {b} | {r['oracle_us']:.0f} µs | {r['dyngraph']:.3f} | "
                f"{r['interpreter']:.3f} | {r['interpreter'] / r['dyngraph']:.3f} |"
            )
            print(lines[-1], flush=True)
    (Path(__file__).resolve().parent / "INTERPRETER.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
