"""Streaming (`dg.stream`) against per-batch infer and the per-batch oracle.

    python benchmarks/stream.py            # writes benchmarks/RESULTS-stream.md (~10 minutes)
    python benchmarks/stream.py --quick    # B = 256, c = 0.3 only; RESULTS-stream-quick.md
    python benchmarks/stream.py --sequences  # sequence models of mixed lengths (~1 minute);
                                           # RESULTS-stream-sequences.md
    python benchmarks/stream.py --steady-malloc  # glibc's heap held (dg.hold_heap, as
                                           # `dyngraph eval` and `profile` run); a -steady file

The cases of benchmarks/run.py (d = 512: 8 residual MLP blocks with an exit after each, 8 gated
blocks, an ACT loop of a GRU step with at most 20 steps), their decisions forced (a draw fixed
per input by its values) so that a fraction c of the rows continues past each exit, runs each
gated body, or goes on after each ponder step. N inputs (16 x B; and 64 x B for the target
case: a stream's last runs are short, a fixed cost that a longer stream spreads) are run

- per batch: `model(x)` on N / B independent batches of B;
- streamed:  `dg.stream(model, x, batch_size=B)` (every stage on full batches of B; gates run
  in place, and also with `pool_bodies=True`, each body a queue of its own);
- by the per-batch oracle: the same units called on pre-sliced inputs of the sizes the
  per-batch runs produced (no decisions, no compaction: the limit of any per-batch executor);
- by the stream's oracle: the same for the sizes the stream ran (its overhead);
- by the static model (every block for every input, per batch of B), which f and t divide by.

One thread, warm, interleaved rounds (one call of each per round), medians; every ratio is
taken in the same run. f = mean MACs per input / static MACs, t = time / static time, E = f / t.
Target (issue 18): E >= 0.9 for the stream at c = 0.3, early exit, B = 256; that case is also
measured on the longer stream `--target-runs` times (default 3), each a row of its own.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import machine  # noqa: E402
from run import case_model, case_specs, oracle, time_interleaved  # noqa: E402

import dyngraph as dg  # noqa: E402

KINDS = ("early_exit", "gates", "halting")


@torch.no_grad()
def measure(kind: str, c: float, b: int, n_batches: int, min_run_time: float) -> dict:
    model = case_model(kind, c)  # run.py's forcing: c continues past each decision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * b, 512, generator=g)
    batches = [x[i : i + b] for i in range(0, x.shape[0], b)]
    _, static_spec = case_specs(kind)
    if static_spec is not None:
        static = dg.compile(static_spec, backend="none").eval()
        static_macs = static.static_macs()
        run_static = lambda: [static(xb) for xb in batches]  # noqa: E731
    else:  # halting: the step max_steps times on every input, no halting unit
        h = model.haltings[0]
        static_macs = model.static_macs(decisions=False)
        full = [[(h.steps[0].index, xb.shape[0])] * h.max_steps for xb in batches]
        run_static = oracle(model, full)
    out = dg.stream(model, x, batch_size=b)
    per_batch = [model(xb).trace for xb in batches]
    fns = {
        "batch": lambda: [model(xb) for xb in batches],
        "stream": lambda: dg.stream(model, x, batch_size=b),
        "oracle": oracle(model, [t.unit_calls() for t in per_batch]),
        "stream_oracle": oracle(model, [out.trace.unit_calls()]),
        "static": run_static,
    }
    if kind == "gates":  # gate bodies in queues of their own (stream's `pool_bodies`)
        pooled = dg.stream(model, x, batch_size=b, pool_bodies=True)
        fns["pooled"] = lambda: dg.stream(model, x, batch_size=b, pool_bodies=True)
        fns["pooled_oracle"] = oracle(model, [pooled.trace.unit_calls()])
    med = time_interleaved(fns, min_run_time)
    macs = model.per_input_macs(out.trace).double().mean().item()
    f = macs / static_macs
    t = {k: v / med["static"] for k, v in med.items()}
    s = out.stats
    row = {
        "case": kind,
        "c": c,
        "B": b,
        "N": x.shape[0],
        "f": f,
        "E_batch": f / t["batch"],
        "E_stream": f / t["stream"],
        "E_oracle": f / t["oracle"],
        "E_stream_oracle": f / t["stream_oracle"],
        "stream_vs_batch": med["batch"] / med["stream"],
        "overhead": med["stream"] / med["stream_oracle"],
        "full_runs": f"{s['full_runs']}/{s['runs']}",
        "p50_ms": s["latency_p50_ms"],
        "p99_ms": s["latency_p99_ms"],
        "batch_ms": 1e3 * med["batch"] / len(batches),  # a per-batch input's latency
        "throughput": x.shape[0] / med["stream"],
        "throughput_batch": x.shape[0] / med["batch"],
        "peak_rows": s["peak_rows"],
        "E_pooled": f / t["pooled"] if "pooled" in t else None,
        "E_pooled_oracle": f / t["pooled_oracle"] if "pooled" in t else None,
    }
    print(
        f"{kind:<10} c={c} B={b:<3} f={f:.3f} E batch {row['E_batch']:.3f} stream "
        f"{row['E_stream']:.3f} oracle {row['E_oracle']:.3f} stream-oracle "
        f"{row['E_stream_oracle']:.3f} stream/batch {row['stream_vs_batch']:.2f}x "
        f"overhead {row['overhead']:.3f} runs {row['full_runs']}"
        + (
            f" pooled bodies {row['E_pooled']:.3f} (oracle {row['E_pooled_oracle']:.3f})"
            if row["E_pooled"]
            else ""
        ),
        flush=True,
    )
    return row


def write(rows: list[dict], path: Path, steady: bool = False) -> str:
    lines = [
        "# Streaming against per-batch execution",
        "",
        f"`python benchmarks/{Path(__file__).name}` — {machine.describe()}, 1 thread, torch "
        f"{torch.__version__}, Python {platform.python_version()}. d = 512; N = 16 x B inputs; "
        "medians over interleaved rounds, every ratio from the same run. E = f / t (MACs "
        "fraction over time fraction, against the static model). `oracle`: the per-batch "
        "runs' units on pre-sliced inputs; `stream oracle`: the stream's. Latency: entry to "
        "result (the stream: per input; per batch: every input of a batch waits for it)."
        + (f" {machine.HEAP_HELD}, as `dyngraph eval` and `profile` hold it." if steady else ""),
        "",
        "| case | c | B | N | f | E per batch | E stream | E per-batch oracle | E stream oracle "
        "| stream / per batch (speed) | stream overhead | full runs | latency p50 / p99 ms "
        "(per batch) | inputs/s stream (per batch) | peak rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['c']} | {r['B']} | {r['N']} | {r['f']:.3f} | {r['E_batch']:.3f} | "
            f"**{r['E_stream']:.3f}** | {r['E_oracle']:.3f} | {r['E_stream_oracle']:.3f} | "
            f"{r['stream_vs_batch']:.2f}x | {r['overhead']:.3f} | {r['full_runs']} | "
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ({r['batch_ms']:.1f}) | "
            f"{r['throughput']:.0f} ({r['throughput_batch']:.0f}) | {r['peak_rows']} |"
        )
    pooled = [r for r in rows if r["E_pooled"] is not None]
    if pooled:
        lines += [
            "",
            "Gates with their bodies pooled (`dg.stream(..., pool_bodies=True)`: each body a "
            "queue of its own, full batches of the rows that take it):",
            "",
            "| c | B | E per batch | E stream (in place) | E stream, pooled bodies | E its oracle |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['c']} | {r['B']} | {r['E_batch']:.3f} | {r['E_stream']:.3f} | "
            f"{r['E_pooled']:.3f} | {r['E_pooled_oracle']:.3f} |"
            for r in pooled
        ]
    target = [r for r in rows if r["case"] == "early_exit" and r["c"] == 0.3 and r["B"] == 256]
    lines.append("")
    for r in target:
        e = r["E_stream"]
        lines.append(
            f"- E >= 0.9 (early exit, c = 0.3, B = 256, N = {r['N']}): "
            f"**{'met' if e >= 0.9 else 'not met'}** (E = {e:.3f}; per batch {r['E_batch']:.3f}, "
            f"the per-batch oracle {r['E_oracle']:.3f})"
        )
    if len(target) > 1:
        es = sorted(r["E_stream"] for r in target if r["N"] == target[-1]["N"])
        lines.append(
            f"- N = {target[-1]['N']}: E >= 0.9 in {sum(e >= 0.9 for e in es)} of {len(es)} "
            f"runs (median E = {es[len(es) // 2]:.3f})"
        )
    beat = sum(r["E_stream"] > r["E_oracle"] for r in rows)
    lines.append(f"- the stream past the per-batch oracle: {beat} of {len(rows)} cases")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


SEQUENCES = ("deebert_transformer", "state_tagger", "mod_tagger", "composer_tokens", "calm_tagger")


@torch.no_grad()
def sequences(path: Path) -> str:
    """Sequence models on token ids of mixed lengths (uniform in 1..L, padded at the end):
    a batched pass runs each length of a batch as its own group, so a batch of 256 over L
    lengths runs groups of about 256 / L; the stream pools each length across the data. The
    specs' models, untrained (decisions spread as the test suite spreads them), B = 256, N =
    2048, streamed and per batch timed in interleaved rounds."""
    from tests.conftest import SPECS, compiled, random_batch

    by_name, rows = {p.stem: p for p in SPECS}, []
    for name in SEQUENCES:
        model = compiled(by_name[name], "none")
        x, b = random_batch(model, 2048, seed=7), 256
        out = dg.stream(model, x, batch_size=b)
        fns = {
            "batch": lambda m=model, x=x, b=b: [m(x[i : i + b]) for i in range(0, len(x), b)],
            "stream": lambda m=model, x=x, b=b: dg.stream(m, x, batch_size=b),
        }
        t = time_interleaved(fns, 1.0)
        rows.append(
            f"| {name} | {model.spec.input.shape[0]} | {1e3 * t['batch']:.1f} | "
            f"{1e3 * t['stream']:.1f} | {t['batch'] / t['stream']:.2f}x | "
            f"{out.stats['full_runs']}/{out.stats['runs']} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# Streaming sequences of mixed lengths",
            "",
            f"`python benchmarks/{Path(__file__).name} --sequences` — {machine.describe()}, "
            f"1 thread, torch {torch.__version__}. " + " ".join(sequences.__doc__.split()),
            "",
            "| spec | L | per batch ms | stream ms | stream / per batch (speed) | full runs |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    path.write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--sequences", action="store_true", help="only the sequence models")
    ap.add_argument("--steady-malloc", action="store_true", help="hold glibc's heap (dg.hold_heap)")
    ap.add_argument("--target-runs", type=int, default=3, help="runs of the target case, N = 64 B")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steady = args.steady_malloc and dg.hold_heap()
    if args.sequences:
        print(sequences(HERE / "RESULTS-stream-sequences.md"))
        return
    fractions, sizes = ((0.3,), (256,)) if args.quick else ((0.9, 0.6, 0.3), (256, 64))
    rows = [
        measure(kind, c, b, 16, 0.3 if args.quick else 1.0)
        for kind in args.kinds.split(",")
        for c in fractions
        for b in sizes
    ]
    if not args.quick and "early_exit" in args.kinds:  # the target case on a longer stream
        rows += [measure("early_exit", 0.3, 256, 64, 1.0) for _ in range(args.target_runs)]
    tail = ("-quick" if args.quick else "") + ("-steady" if steady else "")
    print(write(rows, HERE / f"RESULTS-stream{tail}.md", steady))


if __name__ == "__main__":
    main()
