"""`profile(model, data)`: exact per-input MACs, per-path latency, and what the batch executed.

One batched infer pass gives every input's trace; its MACs are the sum of the static costs of
the units it ran (no per-input tracing). Paths (distinct decision tuples) are timed at batch 1
on a representative input; an input's predicted latency is its path's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import tasks
from ..cost import flop_counter
from ..data.inputs import as_data
from ..progress import Progress
from ..runtime.heap import heap_state, holdable, page_faults
from ..runtime.stream import infer_pass
from . import tokens
from .latency import measure
from .sweep import quality, sweep

SCHEMA = "dyngraph.profile/1"


@dataclass
class PathStats:
    """One distinct path: its decisions, cost, latency, and who took it."""

    id: int
    description: str
    macs: int
    count: int
    units: dict[str, int]
    latency_us: float | None = None
    latency_iqr_us: float | None = None
    quality: float | None = None


@dataclass
class Profile:
    """What `profile` measured. `save(dir)` writes profile.json, report.md and PNG plots."""

    name: str
    counter: str
    device: str
    threads: int
    batch_size: int
    metric: str
    per_input_macs: torch.Tensor
    per_input_path: torch.Tensor
    paths: list[PathStats]
    units: list[dict[str, Any]]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    curve: dict | None = None
    per_input_latency_us: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    per_token_macs: torch.Tensor | None = None  # [N, L] a sequence model's (0: padding)
    per_token_depth: torch.Tensor | None = None  # [N, L] routed bodies run (-1: padding)
    heap: str = "default"  # the malloc policy the timings ran under (runtime/heap.py)

    def to_json(self) -> dict[str, Any]:
        """The versioned, documented JSON form (docs/profile.md)."""
        return {
            "schema": SCHEMA,
            "name": self.name,
            "counter": self.counter,
            "device": self.device,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "torch": torch.__version__,
            "heap": self.heap,
            "metric": self.metric,
            "summary": self.summary,
            "warnings": self.warnings,
            "units": self.units,
            "paths": [vars(p) for p in self.paths],
            "curve": self.curve,
            "per_input": {
                "macs": self.per_input_macs.tolist(),
                "path": self.per_input_path.tolist(),
                "latency_us": None
                if self.per_input_latency_us is None
                else self.per_input_latency_us.tolist(),
                "correct": None if self.correct is None else self.correct.tolist(),
                **{k: v.tolist() for k, v in self.meta.items()},
                **{
                    k: v.tolist()
                    for k, v in (
                        ("token_macs", self.per_token_macs),
                        ("token_depth", self.per_token_depth),
                    )
                    if v is not None
                },
            },
        }

    def save(self, directory) -> Any:
        from .report import save

        return save(self, directory)


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def profile(
    model,
    data,
    labels=None,
    latency: bool = True,
    batch_size: int = 256,
    counter: str = "fvcore",
    threads: int = 1,
    max_paths: int = 20,
    measure_each: int = 0,
    curve: bool = True,
    check_waste: bool = True,
    n: int | None = None,
    progress: bool | None = None,
    stream: bool = True,
    max_rows: int | None = None,
) -> Profile:
    """Profile a compiled model on data.

    Args:
        model: a DynamicModel (put on the device to profile on).
        data: a tensor of inputs, a Data, a Dataset/DataLoader, or a built-in data set's name.
        labels: targets, when `data` is a tensor.
        latency: time each distinct path at batch 1 (the `max_paths` most frequent) and the
            batched throughput.
        batch_size: the batch size of the infer pass.
        counter: "fvcore" or "torch" (FlopCounterMode / 2) for the units' static MACs.
        threads: torch threads while timing.
        max_paths: how many paths to time.
        measure_each: also time this many inputs one by one, and report how well their path's
            latency predicts theirs.
        curve: sweep the main decision setting for an accuracy-versus-MACs curve (needs labels).
        check_waste: run the batches under FlopCounterMode and compare executed with ideal MACs.
        n: use only the first n inputs.
        stream: run the data as a stream (`dg.stream`: every stage on full batches), or
            (False) in independent batches of `batch_size`.
        max_rows: the stream's bound on rows waiting in its queues (default 16 x batch_size).
        progress: show a progress bar (default: on a terminal).
    """
    d = as_data(data, labels, model.spec, n)
    model.eval()
    device = _device(model)
    x = d.x.to(device)
    N = x.shape[0]
    costs = model.unit_costs(counter)
    warnings = [
        f"unit '{u.name}': op {op} carries multiply-adds that the {counter} counter does not count"
        + (" (try counter: torch)" if counter == "fvcore" else "")
        for u, c in zip(model.units, costs, strict=True)
        for op in c.uncounted
    ]

    # one infer pass over the data (streamed, or in independent batches): traces -> per-input
    # MACs and paths; its throughput and per-input latency (entry to result)
    path_ids, macs, logits, token = [], [], [], []
    with Progress(N, f"{model.name}: infer", progress) as bar:
        outs, summary_pass = infer_pass(model, x, batch_size, stream, max_rows)
        for out in outs:
            path_ids.append(out.trace.path_id.cpu())
            macs.append(model.per_input_macs(out.trace, counter))
            logits.append(out.logits)
            if out.trace.lengths is not None:  # a sequence model: its tokens' costs
                token.append(tokens.per_token(model, out.trace, counter, x.shape[1]))
            bar.update(out.logits.shape[0])
    per_path = torch.cat(path_ids)
    per_macs = torch.cat(macs)
    logits_all = torch.cat(logits)
    correct = None
    q_all = None
    if d.y is not None:
        q_all = quality(model, logits_all, d.y)
        if model.spec.task.classifies and not tasks.per_token(model.spec.task):
            correct = logits_all.argmax(1).cpu() == d.y.cpu()

    # paths
    ids, counts = per_path.unique(return_counts=True)
    rep = {int(p): int((per_path == p).nonzero()[0, 0]) for p in ids}
    paths = []
    for p, c in sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: -t[1]):
        members = per_path == p
        m = per_macs[members]
        if not bool((m == m[0]).all()):
            raise RuntimeError(
                f"path {p} has inputs of different MACs: the cost of a path must be static"
            )
        out = model(x[rep[p] : rep[p] + 1])
        um = model.sample_unit_macs(out.trace, counter)[0].tolist()
        units = {
            model.units[u].name: int(v) for u, v in enumerate(um) if out.trace.unit_counts[0, u]
        }
        qp = None
        if d.y is not None:
            qp = (
                float(correct[members].float().mean())
                if correct is not None
                else quality(model, logits_all[members], d.y[members])
            )
        paths.append(PathStats(p, model.describe_path(p), int(m[0]), c, units, quality=qp))

    summary: dict[str, Any] = _macs_summary(model, per_macs, counter)
    summary["infer_pass"] = summary_pass
    per_token = tokens.merged(token) if token else None
    if per_token is not None:
        summary["per_token"] = tokens.summary(*per_token)
    summary["paths_seen"] = len(paths)
    if q_all is not None:
        summary["quality"] = q_all

    if check_waste:
        traces = []
        with (
            model.eager(),
            flop_counter() as fc,
        ):  # compiled graphs can't run under it
            for i in range(0, N, batch_size):
                traces.append(model(x[i : i + batch_size]).trace)
        executed = fc.get_total_flops() // 2
        # (after, not inside: a unit's cost counted for the first time would be counted too)
        ideal = sum(int(model.per_input_macs(t, "torch").sum()) for t in traces)
        summary.update(
            executed_macs=executed, ideal_macs=ideal, dispatch_waste=executed / max(ideal, 1)
        )
        padding = sum(t.query_padding_macs for t in traces)
        if padding:  # attention past each query's keys (after a per-token exit): the known waste
            summary["query_padding_macs"] = padding

    per_lat = None
    if latency:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xb = x[:batch_size]
            t, _ = measure(lambda: model(xb), device, threads)
            summary["throughput_per_s"] = xb.shape[0] / t
            summary["throughput_batch"] = xb.shape[0]
            faults = _faults_per_pass(lambda: model(xb))
            summary["page_faults_per_pass"] = faults
            if faults is not None and faults > FAULTS_NOTED and heap_state() == "default":
                warnings.append(
                    f"the timed batch pass faulted {faults:,.0f} pages in per call (its memory "
                    "was given back between calls), so its time includes page faults"
                    + (
                        ": call dg.hold_heap() before profiling (as `dyngraph profile` does)"
                        if holdable()
                        else ""
                    )
                )
            timed = paths[:max_paths]
            with Progress(len(timed), f"{model.name}: latency", progress) as bar:
                for ps in timed:
                    xi = x[rep[ps.id] : rep[ps.id] + 1]
                    med, iqr = measure(lambda xi=xi: model(xi), device, threads)
                    ps.latency_us, ps.latency_iqr_us = med * 1e6, iqr * 1e6
                    bar.update()
            lat = {ps.id: ps.latency_us for ps in paths if ps.latency_us is not None}
            per_lat = torch.tensor([lat.get(int(p), float("nan")) for p in per_path])
            known = ~per_lat.isnan()
            summary["latency_mean_us"] = float(per_lat[known].mean()) if known.any() else None
            summary["inputs_with_latency"] = int(known.sum())
            if measure_each:
                k = min(measure_each, N)
                errs = []
                for i in range(k):
                    xi = x[i : i + 1]
                    med, _ = measure(lambda xi=xi: model(xi), device, threads, min_run_time=0.05)
                    pred = lat.get(int(per_path[i]))
                    if pred is not None:
                        errs.append(abs(pred - med * 1e6) / (med * 1e6))
                summary["measure_each"] = k
                summary["latency_prediction_median_rel_error"] = (
                    float(torch.tensor(errs).median()) if errs else None
                )
        finally:
            torch.set_num_threads(prev)

    curve_data = sweep(model, d, batch_size, counter) if curve else None
    units = [
        {
            "index": u.index,
            "name": u.name,
            "kind": u.kind,
            "construct": u.construct,
            "macs": c.macs,
            "by_module": c.by_module,
            "uncounted": c.uncounted,
            "inputs": [list(s) for s in u.in_shapes],
        }
        for u, c in zip(model.units, costs, strict=True)
    ]
    return Profile(
        name=model.name,
        counter=counter,
        device=str(device),
        threads=threads,
        batch_size=batch_size,
        metric=tasks.metric(model.spec.task),
        per_input_macs=per_macs,
        per_input_path=per_path,
        paths=paths,
        units=units,
        summary=summary,
        warnings=warnings,
        curve=curve_data,
        per_input_latency_us=per_lat,
        correct=correct,
        meta={k: v.cpu() for k, v in d.meta.items()},
        per_token_macs=None if per_token is None else per_token[0],
        per_token_depth=None if per_token is None else per_token[2],
        heap=heap_state(),
    )


FAULTS_NOTED = 256  # pages (1 MiB) faulted in per timed pass past which a profile says so


def _faults_per_pass(fn, calls: int = 5) -> float | None:
    """The pages a warm call of `fn` faults in, on average (None where not counted)."""
    before = page_faults()
    if before is None:
        return None
    for _ in range(calls):
        fn()
    return (page_faults() - before) / calls


def _macs_summary(model, per_macs: torch.Tensor, counter: str) -> dict[str, Any]:
    f = per_macs.double()
    full = model.static_macs(counter)
    backbone = model.static_macs(counter, decisions=False)
    return {
        "inputs": int(per_macs.numel()),
        "mean_macs": float(f.mean()),
        "p50_macs": float(f.quantile(0.5)),
        "p90_macs": float(f.quantile(0.9)),
        "max_macs": int(per_macs.max()),
        "min_macs": int(per_macs.min()),
        "full_macs": full,
        "backbone_macs": backbone,
        "saving": 1 - float(f.mean()) / full if full else 0.0,
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
