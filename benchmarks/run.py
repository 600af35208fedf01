"""The performance suite: do saved MACs become saved time?

    python benchmarks/run.py            # full suite (eager and inductor), writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # eager only, fewer cases, under 2 minutes; writes
                                        # benchmarks/RESULTS-quick.md (not kept in git)

One thread, warm; the functions compared in a case are timed in interleaved rounds (one call of
each per round), and every ratio is one of medians over those rounds, taken in the same run.
Decisions are forced (dyngraph.forcing: a draw fixed per sample by its values) so that the
fraction of work each case skips is known.

Per case and batch size B (256, 64; and B = 1, the mean over 64 inputs run one at a time):
  f        = mean MACs per input (decision units counted) / the static model's MACs
  t        = dyngraph infer time / the static model's time         E = f / t
  oracle   = the same units called directly on pre-sliced inputs of the sizes the run produced
  overhead = dyngraph time / oracle time                           E_oracle = f / (oracle / static)
  masking  = full compute then select (dense mode: what SkipNet/MSDNet/L2S code does)
  waste    = MACs executed (FlopCounterMode / 2) / ideal MACs
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import machine
import torch
from torch._dynamo.utils import counters

import dyngraph as dg
from dyngraph import forcing
from dyngraph.cost import flop_counter

D = 512
HERE = Path(__file__).resolve().parent
BLOCK = {"type": "residual_mlp", "hidden": D}
HEAD = {"type": "classifier", "classes": 10}


def _spec(name: str, graph: list) -> dict:
    return {
        "dyngraph": 1,
        "name": name,
        "input": {"shape": [D]},
        "task": {"type": "classification", "classes": 10},
        "graph": graph,
    }


def case_specs(kind: str) -> tuple[dict, dict | None]:
    """(dynamic spec, static spec) of a case."""
    static = _spec(f"{kind}_static", [dict(BLOCK) for _ in range(8)] + [HEAD])
    if kind == "early_exit":
        g = [
            {
                "repeat": 7,
                "nodes": [
                    BLOCK,
                    {"exit": {"head": HEAD, "criterion": {"type": "max_prob", "threshold": 0.9}}},
                ],
            },
            BLOCK,
            {"exit": {"head": HEAD}},
        ]
        return _spec(kind, g), static
    if kind == "gates":
        g = [
            {"repeat": 8, "nodes": [{"gate": {"body": BLOCK, "policy": {"type": "ff_gate"}}}]},
            HEAD,
        ]
        return _spec(kind, g), static
    if kind == "metalayer":
        choices = [{"type": "residual_mlp", "hidden": h} for h in (128, 256, 512, 1024)]
        ctl = {
            "ctl": {
                "type": "composer_rnn",
                "hidden": 32,
                "preferences": {"g": {"gamma": {"test": 0.0}}},
            }
        }
        d = _spec(kind, [{"metalayer": {"choices": choices, "controller": "ctl"}}, HEAD])
        d["controllers"] = ctl
        return d, _spec("metalayer_static", [{"type": "residual_mlp", "hidden": 1024}, HEAD])
    if kind == "halting":
        g = [
            {"halting": {"rule": "act", "step": {"type": "gru_step", "dim": D}, "max_steps": 20}},
            HEAD,
        ]
        return _spec(kind, g), None
    if kind == "conv_gates":  # SkipNet on a ResNet: 6 gated basic blocks, 32 channels, 16 x 16
        stem = [{"type": "conv2d", "out": 32, "kernel": 3, "padding": 1}, {"type": "relu"}]
        tail = [{"type": "global_avgpool"}, HEAD]
        block = {"type": "resnet_block"}
        gate = {"gate": {"body": block, "policy": {"type": "ff_gate", "hidden": 16}}}
        image = {"shape": list(IMAGE)}
        return (
            _spec(kind, [*stem, {"repeat": 6, "nodes": [gate]}, *tail]) | {"input": image},
            _spec("conv_static", [*stem, *[dict(block) for _ in range(6)], *tail])
            | {"input": image},
        )
    if kind == "transformer_exits":  # DeeBERT: 6 layers, d = 128, L = 64, an exit after each
        emb = {"type": "embedding", "vocab": VOCAB, "dim": 128, "positions": "sinusoidal"}
        layer = {"type": "transformer_block", "heads": 4, "mlp_ratio": 4}
        ids = {"shape": [SEQ], "dtype": "int64", "vocab": VOCAB, "pad_id": 0}
        crit = {"type": "max_prob", "threshold": 0.9}
        g = [emb, {"repeat": 5, "nodes": [layer, {"exit": {"head": HEAD, "criterion": crit}}]}]
        g += [layer, {"exit": {"head": HEAD}}]
        return (
            _spec(kind, g) | {"input": ids},
            _spec("transformer_static", [emb, *[dict(layer) for _ in range(6)], HEAD])
            | {"input": ids},
        )
    raise ValueError(kind)


IMAGE, SEQ, VOCAB = (3, 16, 16), 64, 1000


def case_inputs(kind: str, b: int, g: torch.Generator) -> torch.Tensor:
    """One batch of `b` inputs of the case's shape (token ids of full length: the sequence
    case measures exits, not length groups)."""
    if kind == "transformer_exits":
        return torch.randint(1, VOCAB, (b, SEQ), generator=g)
    if kind == "conv_gates":
        return torch.randn(b, *IMAGE, generator=g)
    return torch.randn(b, D, generator=g)


def force(model, kind: str, setting) -> None:
    """Force the case's decisions: `setting` is the fraction continuing past each exit, running
    each gated block, the routing probabilities, or the range of steps."""
    key = {"early_exit": "exit", "gates": "gate", "conv_gates": "gate"}.get(kind, kind)
    key = "exit" if kind == "transformer_exits" else key
    forcing.force(model, key, 1 - setting if key == "exit" else setting)


def case_model(kind: str, setting, backend: str = "none"):
    """The case's dynamic model (seed-0 weights), in eval mode, with its decisions forced."""
    spec, _ = case_specs(kind)
    torch.manual_seed(0)
    model = dg.compile(spec, backend=backend).eval()
    force(model, kind, setting)
    return model


def inputs(b: int) -> list[torch.Tensor]:
    """Seeded inputs: one batch of b rows, or (b = 1) 64 single inputs."""
    g = torch.Generator().manual_seed(0)
    n, rows = (1, b) if b > 1 else (64, 1)
    return [torch.randn(rows, D, generator=g) for _ in range(n)]


def time_interleaved(fns: dict[str, object], min_run_time: float) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (one call of each
    per round), so that the machine's drift and noise fall on all of them alike and their
    ratios stay meaningful. Each round runs them in a new (seeded) random order: in a fixed
    order each function would always follow the same one, which leaves the caches warm for
    some (the oracle ran right after the masking baseline, which reads the same weights) and
    cold for others. Each function runs for about `min_run_time` seconds in all."""
    for fn in fns.values():  # warm
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    spent, rounds = 0.0, 0
    while rounds < 15 or (spent < min_run_time * len(fns) and rounds < 500):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[k].append(dt)
            spent += dt
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def unit_calls(model, xs: list[torch.Tensor]) -> list[list[tuple[int, int]]]:
    """For each input batch, the (unit, rows) calls its infer run made, in order."""
    return [model(x).trace.unit_calls() for x in xs]


def oracle(model, calls: list[list[tuple[int, int]]], between: int = 0):
    """Call the same units on inputs already sliced to the sizes the run produced (with
    `between` tiny tensor ops after each call: benchmarks/overhead.py)."""
    pre = {}
    for run in calls:
        for u, n in run:
            if (u, n) not in pre:
                pre[u, n] = model.units[u].example_inputs(n)
    plan = [[(model.units[u], pre[u, n]) for u, n in run] for run in calls]

    def go():
        for run in plan:
            for unit, args in run:
                unit(*args)

    if not between:
        return go
    small = torch.zeros(4)

    def padded():
        for run in plan:
            for unit, args in run:
                unit(*args)
                for _ in range(between):
                    small.add(1.0)

    return padded


@torch.no_grad()
def measure_case(
    kind: str, setting, backend: str, batches: list[int], min_run_time: float
) -> list[dict]:
    _, static_spec = case_specs(kind)
    t0 = time.perf_counter()
    model = case_model(kind, setting, backend)
    g = torch.Generator().manual_seed(0)
    xs_all = {
        b: [case_inputs(kind, b, g)] if b > 1 else [case_inputs(kind, 1, g) for _ in range(64)]
        for b in batches
    }
    for b in batches:  # warm: compile every unit at the sizes it will see
        for x in xs_all[b]:
            model(x)
    compile_s = time.perf_counter() - t0
    static = dg.compile(static_spec, backend=backend).eval() if static_spec else None
    static_macs = static.static_macs() if static else model.static_macs(decisions=False)
    if static is not None:  # compile the static model too before recompilations are counted
        for b in batches:
            for x in xs_all[b]:
                static(x)
    rows = []
    for b in batches:
        xs = xs_all[b]
        before = counters["stats"]["unique_graphs"]
        calls = unit_calls(model, xs)
        fns = {
            "dyn": lambda xs=xs: [model(x) for x in xs],
            "mask": lambda xs=xs: [model(x, mode="dense") for x in xs],
            "oracle": oracle(model, calls),
        }
        if static is not None:
            fns["static"] = lambda xs=xs: [static(x) for x in xs]
        else:  # halting: the step run max_steps times on every input, no halting unit
            h = model.haltings[0]
            full = [[(h.steps[0].index, x.shape[0])] * h.max_steps for x in xs]
            fns["static"] = oracle(model, full)
        med = time_interleaved(fns, min_run_time)
        t_dyn, t_mask, t_orc, t_static = med["dyn"], med["mask"], med["oracle"], med["static"]
        recompiles = counters["stats"]["unique_graphs"] - before
        macs = torch.cat([model.per_input_macs(model(x).trace) for x in xs]).double().mean().item()
        with model.eager(), flop_counter() as fc:
            traces = [model(x).trace for x in xs]
        # counted after, not inside, the counter (a unit's first count would be counted too)
        ideal = sum(int(model.per_input_macs(t, "torch").sum()) for t in traces)
        waste = fc.get_total_flops() / 2 / ideal
        f = macs / static_macs
        t, t_o = t_dyn / t_static, t_orc / t_static
        rows.append(
            {
                "case": kind,
                "setting": str(setting),
                "backend": backend,
                "B": b,
                "f": f,
                "t": t,
                "E": f / t,
                "E_oracle": f / t_o,
                "overhead": t_dyn / t_orc,
                "speedup_vs_mask": t_mask / t_dyn,
                "oracle_speedup_vs_mask": t_mask / t_orc,
                "waste": waste,
                "recompiles": recompiles,
                "compile_s": compile_s,
                "ms_dyn": 1e3 * t_dyn / len(xs),
                "ms_static": 1e3 * t_static / len(xs),
            }
        )
        r = rows[-1]
        print(
            f"{kind:<10} {r['setting']:<26} {backend:<8} B={b:<3}  f={f:.3f} t={t:.3f} E={r['E']:.3f} "
            f"E_or={r['E_oracle']:.3f} overhead={r['overhead']:.3f} vs-mask={r['speedup_vs_mask']:.2f}x "
            f"(oracle {r['oracle_speedup_vs_mask']:.2f}x) waste={waste:.3f} recompiles={recompiles}",
            flush=True,
        )
    return rows


CASES = (
    [("early_exit", c) for c in (0.9, 0.6, 0.3)]
    + [("gates", r) for r in (0.9, 0.6, 0.3)]
    + [
        ("metalayer", [0.25, 0.25, 0.25, 0.25]),
        ("metalayer", [0.55, 0.25, 0.15, 0.05]),
        ("halting", (1, 20)),
    ]
)
#: The papers' own architectures (issue 15): run with --cases (B = 64 and 1).
EXTRA = [("conv_gates", r) for r in (0.6, 0.3)] + [("transformer_exits", c) for c in (0.6, 0.3)]
QUICK = [
    ("early_exit", 0.6),
    ("gates", 0.6),
    ("metalayer", [0.25, 0.25, 0.25, 0.25]),
    ("halting", (1, 20)),
]


def write_results(rows: list[dict], profiler: dict | None, path: Path, quick: bool) -> str:
    cpu = machine.describe()
    lines = [
        "# Benchmark results",
        "",
        f"`python benchmarks/run.py{' --quick' if quick else ''}` — {cpu}, {torch.get_num_threads()} thread, "
        f"torch {torch.__version__}, Python {platform.python_version()}. Medians over "
        "interleaved rounds (one call of each compared function per round); every ratio taken in the same run. d = 512.",
        "",
        "| case | forced setting | backend | B | f (MACs) | t (time) | E = f/t | E_oracle | overhead | vs masking (oracle) | waste | recompiles | ms per call dyn / static (B=1: per input) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['setting']} | {r['backend']} | {r['B']} | {r['f']:.3f} | {r['t']:.3f} | {r['E']:.3f} | "
            f"{r['E_oracle']:.3f} | {r['overhead']:.3f} | {r['speedup_vs_mask']:.2f}× ({r['oracle_speedup_vs_mask']:.2f}×) | "
            f"{r['waste']:.3f} | {r['recompiles']} | {r['ms_dyn']:.3f} / {r['ms_static']:.3f} |"
        )
    lines += ["", "Compile time (first calls, every unit at every size the case produces):", ""]
    seen = set()
    for r in rows:
        key = (r["case"], r["setting"], r["backend"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r['case']} {r['setting']} {r['backend']}: {r['compile_s']:.1f} s")
    if profiler:
        lines += [
            "",
            f"Profiler: {profiler['n']:,} inputs in {profiler['profile_s']:.2f} s vs per-input FlopCounterMode "
            f"{profiler['flopcounter_s']:.1f} s: {profiler['speedup_vs_flopcounter']:.0f}× "
            f"(per-input fvcore {1e3 * profiler['fvcore_s_per_input']:.1f} ms/input: {profiler['speedup_vs_fvcore']:.0f}×).",
        ]
    lines += [""] + targets(rows, profiler)
    summary = summarize(rows)
    lines += ["", f"`{summary}`", ""]
    path.write_text("\n".join(lines))
    return summary


def targets(rows: list[dict], profiler: dict | None) -> list[str]:
    """Issue 4's targets, each met or not, with the numbers (analysis: docs/performance.md)."""
    big = [r for r in rows if r["B"] > 1]
    one = [r for r in rows if r["B"] == 1]

    def status(ok: bool) -> str:
        return "met" if ok else "**not met**"

    worst_e = min(rows, key=lambda r: r["E"] / r["E_oracle"])
    worst_m = min(rows, key=lambda r: r["speedup_vs_mask"] / r["oracle_speedup_vs_mask"])
    faster = {}
    for r in rows:
        if r["B"] == max(x["B"] for x in rows):
            faster.setdefault((r["case"], r["setting"]), {})[r["backend"]] = r["ms_dyn"]

    def spread(rs: list[dict], key: str = "overhead") -> str:
        v = sorted(r[key] for r in rs)
        return f"max {v[-1]:.3f}, median {v[len(v) // 2]:.3f}"

    def count(rs: list[dict], ok) -> str:
        return f"{sum(1 for r in rs if ok(r))} of {len(rs)} rows"

    default = [r for r in rows if r["backend"] == "none"]
    e_ok = lambda r: r["E"] >= 0.95 * r["E_oracle"]  # noqa: E731
    m_ok = lambda r: r["speedup_vs_mask"] >= 0.9 * r["oracle_speedup_vs_mask"]  # noqa: E731
    lines = [
        "## Targets (CPU, one thread); why they are missed: docs/performance.md",
        "",
        f"- control overhead <= 1.05 at B = 256 and 64: {status(max(r['overhead'] for r in big) <= 1.05)} "
        f"({spread(big)}; {count(big, lambda r: r['overhead'] <= 1.05)}; default backend: "
        f"{spread([r for r in big if r['backend'] == 'none'])})",
        f"- control overhead <= 1.10 at B = 1: {status(max(r['overhead'] for r in one) <= 1.10)} "
        f"({spread(one)}; {count(one, lambda r: r['overhead'] <= 1.10)}; default backend: "
        f"{spread([r for r in one if r['backend'] == 'none'])})",
        f"- E >= 0.95 x E_oracle in every case: {status(all(e_ok(r) for r in rows))} "
        f"({count(rows, e_ok)}, default backend {count(default, e_ok)}; worst "
        f"{worst_e['E'] / worst_e['E_oracle']:.2f}: {worst_e['case']} {worst_e['setting']} {worst_e['backend']} B={worst_e['B']})",
        f"- speedup vs masking >= 0.9 x the oracle's: {status(all(m_ok(r) for r in rows))} "
        f"({count(rows, m_ok)}, default backend {count(default, m_ok)}; worst "
        f"{worst_m['speedup_vs_mask'] / worst_m['oracle_speedup_vs_mask']:.2f}: {worst_m['case']} {worst_m['setting']} {worst_m['backend']} B={worst_m['B']})",
        f"- dispatch waste = 1.00 in every case: {status(all(abs(r['waste'] - 1) < 1e-9 for r in rows))}",
        f"- recompilations bounded (no recompile per subset size; at most the size-0/1 specializations): "
        f"{status(max(r['recompiles'] for r in rows) <= 3)} (max {max(r['recompiles'] for r in rows)} during a timed case)",
    ]
    if profiler:
        lines.append(
            f"- profiler >= 100x faster than per-input FlopCounterMode: {status(profiler['speedup_vs_flopcounter'] >= 100)} "
            f"({profiler['speedup_vs_flopcounter']:.0f}x)"
        )
    if len(next(iter(faster.values()))) > 1:
        lines += [
            "",
            "Faster backend at B = 256 (ms per batch): "
            + "; ".join(
                f"{c} {s}: {min(v, key=v.get)} ({', '.join(f'{b} {t:.3f}' for b, t in v.items())})"
                for (c, s), v in faster.items()
            ),
        ]
    return lines


def summarize(rows: list[dict]) -> str:
    return (
        f"E_min={min(r['E'] for r in rows):.3f} overhead_max={max(r['overhead'] for r in rows):.3f} "
        f"waste_max={max(r['waste'] for r in rows):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--backends", default=None, help="comma-separated (default: none,inductor; quick: none)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="default RESULTS.md (quick: RESULTS-quick.md)"
    )
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated case kinds (early_exit, gates, metalayer, halting, conv_gates, "
        "transformer_exits) at their default settings, B = 64 and 1, no profiler run",
    )
    args = ap.parse_args()
    # a quick run must not replace the full run's recorded results
    args.out = args.out or HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    torch.set_num_threads(1)
    backends = (args.backends or ("none" if args.quick else "none,inductor")).split(",")
    cases = QUICK if args.quick else CASES
    batches = [256, 1] if args.quick else [256, 64, 1]
    mrt = 0.1 if args.quick else 0.4
    if args.cases:
        kinds = args.cases.split(",")
        cases = [c for c in CASES + EXTRA if c[0] in kinds]
        batches = [64, 1]
    rows = []
    for backend in backends:
        for kind, setting in cases:
            rows += measure_case(kind, setting, backend, batches, mrt)
    if args.cases:
        print(write_results(rows, None, args.out, args.quick))
        return
    from profiler_speed import run as profiler_run

    prof = profiler_run(
        Path(dg.__file__).resolve().parents[1] / "specs" / "msdnet_early_exit.yaml",
        n=2000 if args.quick else 10_000,
        fvcore_n=50 if args.quick else 300,
    )
    print(f"profiler: {prof['speedup_vs_flopcounter']:.0f}x faster than per-input FlopCounterMode")
    import json

    (args.out.with_suffix(".json")).write_text(
        json.dumps({"rows": rows, "profiler": prof}, indent=1)
    )
    print(write_results(rows, prof, args.out, args.quick))


if __name__ == "__main__":
    main()
