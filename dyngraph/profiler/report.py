"""Writing a profile: profile.json, report.md and PNG plots a person reads."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..training.measure import by_meta  # noqa: E402


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _macs_scale(v: float) -> tuple[float, str]:
    for unit, scale in (("GMACs", 1e9), ("MMACs", 1e6), ("kMACs", 1e3)):
        if v >= scale:
            return scale, unit
    return 1.0, "MACs"


def plot_macs_histogram(prof, path: Path) -> None:
    s = prof.summary
    scale, unit = _macs_scale(s["full_macs"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(
        (prof.per_input_macs.double() / scale).numpy(), bins=40, color="#4c72b0", edgecolor="white"
    )
    ax.axvline(
        s["full_macs"] / scale,
        color="#c44e52",
        linestyle="--",
        label=f"longest path {_si(s['full_macs'])} MACs",
    )
    ax.axvline(
        s["mean_macs"] / scale,
        color="#55a868",
        label=f"mean {_si(s['mean_macs'])} MACs ({s['saving']:.0%} saved)",
    )
    ax.set_xlabel(f"MACs per input ({unit})")
    ax.set_ylabel("inputs")
    ax.set_title(f"{prof.name}: MACs each input used ({s['inputs']:,} inputs)")
    # the legend sits above the plot area, where it cannot hide the tallest bar
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_by_path(prof, path: Path) -> None:
    timed = [p for p in prof.paths if p.latency_us is not None][:15]
    if not timed:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(timed) + 1.6))
    labels = [f"{p.description[:48]}  (n={p.count})" for p in timed]
    ys = range(len(timed))
    ax.barh(
        ys,
        [p.latency_us for p in timed],
        xerr=[p.latency_iqr_us / 2 for p in timed],
        color="#8172b2",
        capsize=3,
    )
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_ylabel("path (decisions taken; inputs that took it)")
    ax.invert_yaxis()
    ax.set_xlabel(
        f"batch-1 latency (µs, median, IQR bars; {prof.threads} thread(s), {prof.device})"
    )
    ax.set_title(f"{prof.name}: latency of the most frequent paths")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(prof, path: Path) -> None:
    c = prof.curve
    if not c:
        return
    pts = sorted(c["points"], key=lambda p: p["mean_macs"])
    scale, unit = _macs_scale(max(p["mean_macs"] for p in pts))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ys = [100 * p["quality"] if c["metric"] == "accuracy" else p["quality"] for p in pts]
    ax.plot(
        [p["mean_macs"] / scale for p in pts],
        ys,
        marker="o",
        color="#4c72b0",
        label=f"sweeping {c['setting']}",
    )
    _label_points(ax, [p["mean_macs"] / scale for p in pts], ys, [f"{p['value']:g}" for p in pts])
    cur = prof.summary.get("quality")
    if cur is not None:
        ax.plot(
            [prof.summary["mean_macs"] / scale],
            [100 * cur if c["metric"] == "accuracy" else cur],
            "r*",
            markersize=12,
            label="as profiled",
        )
    ax.set_xlabel(f"mean MACs per input ({unit})")
    ax.set_ylabel("accuracy (%)" if c["metric"] == "accuracy" else c["metric"])
    ax.set_title(f"{prof.name}: {c['metric']} versus compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_points(ax, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """Label each point with its setting, skipping a label that would overlap the last one
    drawn (points crowd near the knee of the curve)."""
    ax.figure.canvas.draw()  # data -> pixel transforms are final only after a draw
    to_px = ax.transData.transform
    placed: list[tuple[float, float]] = []
    for x, y, text in zip(xs, ys, labels, strict=True):
        px, py = to_px((x, y))
        if any(abs(px - qx) < 28 and abs(py - qy) < 11 for qx, qy in placed):
            continue
        placed.append((px, py))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def report_md(prof) -> str:
    s = prof.summary
    q = "accuracy" if prof.metric == "accuracy" else prof.metric
    lines = [
        f"# Profile: {prof.name}",
        "",
        f"{s['inputs']:,} inputs · counter `{prof.counter}` (1 multiply-add = 1 MAC; decision units counted) · "
        f"device `{prof.device}` · {prof.threads} thread(s) · batch {prof.batch_size} · torch {torch.__version__} "
        f"· heap `{prof.heap}`",
        "",
    ]
    if prof.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in prof.warnings] + [""]
    lines += ["## Summary", "", "| | |", "|---|---|"]
    rows = [
        ("mean MACs per input", s["mean_macs"]),
        (
            "p50 / p90 / max",
            f"{_fmt(s['p50_macs'])} / {_fmt(s['p90_macs'])} / {_fmt(s['max_macs'])}",
        ),
        ("longest path (static full model, with decision units)", s["full_macs"]),
        ("static backbone (no decision units)", s["backbone_macs"]),
        ("saving vs longest path", f"{s['saving']:.1%}"),
        ("distinct paths seen", s["paths_seen"]),
    ]
    if "quality" in s:
        rows.append(
            (
                q,
                f"{100 * s['quality']:.2f}%"
                if prof.metric == "accuracy"
                else f"{s['quality']:.2f}",
            )
        )
    if "dispatch_waste" in s:
        rows.append(
            (
                "executed / ideal MACs of the batched run (FlopCounterMode)",
                f"{_fmt(s['executed_macs'])} / {_fmt(s['ideal_macs'])} = {s['dispatch_waste']:.4f}",
            )
        )
    if s.get("query_padding_macs"):
        rows.append(
            ("of which attention past its keys (per-token exits)", _fmt(s["query_padding_macs"]))
        )
    if (ip := s.get("infer_pass")) is not None:  # the data's pass: streamed or per batch
        how = "streamed" if ip["mode"] == "stream" else "in independent batches"
        rows.append(
            (
                f"the data's infer pass ({how}, batch {ip['batch_size']}): throughput; "
                "latency per input, entry to result, p50 / p99",
                f"{ip['throughput']:,.0f} inputs/s; {ip['latency_p50_ms']:.2f} / "
                f"{ip['latency_p99_ms']:.2f} ms",
            )
        )
    if "throughput_per_s" in s:
        rows.append(
            (
                f"throughput at batch {s['throughput_batch']}",
                f"{s['throughput_per_s']:,.0f} inputs/s",
            )
        )
        rows.append(
            (
                "mean predicted batch-1 latency",
                f"{_fmt(s['latency_mean_us'])} µs ({s['inputs_with_latency']:,} inputs on timed paths)",
            )
        )
    if s.get("latency_prediction_median_rel_error") is not None:
        rows.append(
            (
                f"path latency vs {s['measure_each']} inputs timed alone: median relative error",
                f"{s['latency_prediction_median_rel_error']:.1%}",
            )
        )
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]
    groups = by_meta(
        prof.meta,
        prof.per_input_macs,
        None if prof.correct is None else lambda sel: float(prof.correct[sel].float().mean()),
    )
    for col, rows in groups.items():
        lines += [
            f"## By `{col}` (a column of the data)",
            "",
            f"| {col} | inputs | mean MACs | {q} |",
        ]
        lines += ["|---:|---:|---:|---:|"]
        for r in rows:
            acc = f"{100 * r['quality']:.1f}%" if "quality" in r else "–"
            lines.append(f"| {r['value']} | {r['inputs']:,} | {r['mean_macs']:,.0f} | {acc} |")
        lines.append("")
    lines += [
        "## Paths",
        "",
        f"| id | path | MACs | inputs | batch-1 latency µs (IQR) | {q} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in prof.paths[:30]:
        lat = f"{p.latency_us:,.1f} ({p.latency_iqr_us:,.1f})" if p.latency_us is not None else "–"
        qual = (
            "–"
            if p.quality is None
            else (f"{100 * p.quality:.1f}%" if prof.metric == "accuracy" else f"{p.quality:.2f}")
        )
        lines.append(f"| {p.id} | {p.description} | {p.macs:,} | {p.count:,} | {lat} | {qual} |")
    if len(prof.paths) > 30:
        lines.append(f"| | … {len(prof.paths) - 30} more paths in profile.json | | | | |")
    lines += [
        "",
        "## Units (static MACs per sample)",
        "",
        "| unit | kind | inputs | MACs | by module |",
        "|---|---|---|---:|---|",
    ]
    for u in prof.units:
        bym = ", ".join(f"{k} {v:,}" for k, v in u["by_module"].items())
        shapes = " ".join(str(s) for s in u["inputs"])
        lines.append(f"| {u['name']} | {u['kind']} | {shapes} | {u['macs']:,} | {bym} |")
    if prof.paths:
        top = prof.paths[0]
        lines += [
            "",
            f"Most frequent path ({top.description}), MACs by unit: "
            + ", ".join(f"{k} {v:,}" for k, v in top.units.items()),
            "",
        ]
    if prof.curve:
        c = prof.curve
        lines += [
            "## " + f"{q} versus compute (sweeping {c['setting']})",
            "",
            f"| {c['setting']} | mean MACs | {q} |",
            "|---:|---:|---:|",
        ]
        for p in c["points"]:
            qual = (
                f"{100 * p['quality']:.2f}%" if prof.metric == "accuracy" else f"{p['quality']:.2f}"
            )
            lines.append(f"| {p['value']:g} | {p['mean_macs']:,.0f} | {qual} |")
        lines.append("")
    lines += ["## Plots", "", "![MACs per input](macs_hist.png)", ""]
    if any(p.latency_us is not None for p in prof.paths):
        lines += ["![latency by path](latency_by_path.png)", ""]
    if prof.curve:
        lines += ["![accuracy versus MACs](accuracy_vs_macs.png)", ""]
    t = s.get("per_token")
    if t:
        pos = t["mean_macs_by_position"]
        lines += [
            "## Tokens",
            "",
            f"A token's MACs: {_si(t['mean_token_macs'])} on average; by position "
            f"{_si(pos[0])} (first) to {_si(pos[-1])} (last). Each sequence's token MACs sum "
            "to its MACs (attention counted per query row).",
            "",
        ]
        if t.get("depth_histogram"):
            h = ", ".join(f"{k}: {v}" for k, v in t["depth_histogram"].items())
            lines += [f"Routed bodies run per token (depth: tokens): {h}.", ""]
        lines += ["![tokens](tokens.png)", ""]
    return "\n".join(lines)


def plot_tokens(prof, path: Path) -> None:
    """A sequence model: mean MACs by position, and the depth-per-token histogram."""
    t = prof.summary.get("per_token")
    if t is None:
        return
    hist = t.get("depth_histogram")
    fig, axes = plt.subplots(1, 2 if hist else 1, figsize=(10 if hist else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(len(t["mean_macs_by_position"])), t["mean_macs_by_position"], color="#4c72b0")
    ax.set_xlabel("position")
    ax.set_ylabel("mean MACs of a token")
    ax.set_title(f"{prof.name}: MACs by position")
    if hist:
        ax = axes[0][1]
        ax.bar([int(k) for k in hist], list(hist.values()), color="#55a868")
        ax.set_xlabel("routed bodies a token ran (depth)")
        ax.set_ylabel("tokens")
        ax.set_title("depth per token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(prof, directory) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(prof.to_json(), indent=1))
    (out / "report.md").write_text(report_md(prof))
    plot_macs_histogram(prof, out / "macs_hist.png")
    plot_latency_by_path(prof, out / "latency_by_path.png")
    plot_curve(prof, out / "accuracy_vs_macs.png")
    plot_tokens(prof, out / "tokens.png")
    return out
