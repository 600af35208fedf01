"""What `dyngraph eval` and `dyngraph profile` print."""

from __future__ import annotations


def quality_text(model, res) -> str:
    """`accuracy 97.50%`, `NMSE -21.30 dB` or `no labels`."""
    if (q := res.get("quality")) is None:
        return "no labels"
    return f"accuracy {100 * q:.2f}%" if model.spec.task.classifies else f"NMSE {q:.2f} dB"


def pass_text(p: dict) -> str:
    """The data's infer pass: how it ran, its throughput and per-input latency."""
    from .runtime.heap import heap_state

    how = "streamed" if p["mode"] == "stream" else "in independent batches"
    return (
        f"  {how} (batch {p['batch_size']}): {p['throughput']:,.0f} inputs/s, latency per input "
        f"(entry to result) p50 {p['latency_p50_ms']:.2f} ms, p99 {p['latency_p99_ms']:.2f} ms; "
        f"heap {heap_state()}"
    )


def print_eval(model, data, res: dict) -> None:
    print(
        f"{model.name} on {data.origin}: {quality_text(model, res)}, mean {res['mean_macs']:,.0f} MACs "
        f"per input ({res['macs_fraction']:.1%} of the longest path's {res['full_macs']:,})"
    )
    if res.get("pass"):
        print(pass_text(res["pass"]))
    for key, counts in res.get("taken", {}).items():  # a whole-graph decision: inputs per value
        print(f"  inputs per {key}: " + ", ".join(f"{key} {v}: {c}" for v, c in counts.items()))
    for desc, c in list(res["paths"].items())[:10]:
        print(f"  {c:>6}  {desc}")
    for col, rows in res.get("by_meta", {}).items():
        print(f"  by {col}:")
        for r in rows:
            q = f", {quality_text(model, r)}" if "quality" in r else ""
            print(
                f"    {col} = {r['value']}: {r['inputs']:,} inputs, mean {r['mean_macs']:,.0f} MACs{q}"
            )


def print_profile(model, origin, prof, out) -> None:
    s = prof.summary
    print(
        f"{model.name} on {origin}: {s['inputs']:,} inputs, mean {s['mean_macs']:,.0f} MACs per input "
        f"({1 - s['saving']:.1%} of the longest path's {s['full_macs']:,}; {s['saving']:.1%} saved), "
        f"{s['paths_seen']} paths"
    )
    if "quality" in s:
        print(f"  {quality_text(model, {'quality': s['quality']})}")
    if s.get("infer_pass"):
        print(pass_text(s["infer_pass"]))
    if "dispatch_waste" in s:
        print(f"  executed/ideal MACs of the batched run: {s['dispatch_waste']:.4f}")
    if s.get("query_padding_macs"):
        print(
            f"  of which attention past its keys (per-token exits): {s['query_padding_macs']:,} MACs"
        )
    for w in prof.warnings:
        print(f"  warning: {w}")
    print(f"  wrote {out}/profile.json, report.md and plots")
