"""Shared pieces of the reproductions: seeds run in parallel processes, their statistics and
claims, training a spec into runs/repro, static baselines.

A reproduction is a module with `run_seed(seed, quick) -> dict` (one training seed's numbers),
`summarize(runs) -> dict` (mean +- std over the seeds and its `claims`) and `plot(result, path)`;
`reproduce(NAME, seeds)` runs it. Each claim is tested on the spread: a margin on the seed mean,
or a trend of means by difficulty with a tolerance, never one per-sample statistic of one seed.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..compiler.compile import compile as compile_spec
from ..compiler.load import load_spec
from ..training import train
from ..training.batches import Batches
from ..training.checkpoint import load_into

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
DOCS = ROOT / "docs" / "repro"
RUNS = ROOT / "runs" / "repro"
RUNS_QUICK = ROOT / "runs" / "repro-quick"

#: The recipes' seeds (docs/repro/NAME.json).
SEEDS = (0, 1, 2)
#: Per reproduction, a second seed set never used while tuning its recipe or claims
#: (docs/repro/NAME.seeds-A-B-C.json). ACT and SkipNet-RNN (in gates) failed claims on 3, 4, 5;
#: their recipes and claims were then revised on seeds 0-5, which spent 3, 4, 5 for them.
HELD_OUT = {
    "pondernet": (3, 4, 5),
    "act": (6, 7, 8),
    "gates": (6, 7, 8),
    "early_exit": (3, 4, 5),
    "l2s": (3, 4, 5),
    "composer": (3, 4, 5),
    "transformer_exits": (3, 4, 5),
    "mod": (3, 4, 5),
    "act_time": (3, 4, 5),
    "calm": (3, 4, 5),
}
#: The reproductions, dearest first (CPU minutes per seed, measured: 12.6, 8.2, 7.2, 6.0, 3.2,
#: 2.8, 0.3), so that the pool's last jobs are short.
NAMES = (
    "transformer_exits",
    "act_time",
    "mod",
    "pondernet",
    "act",
    "gates",
    "calm",
    "early_exit",
    "l2s",
    "composer",
)


def spec_dict(name: str) -> dict[str, Any]:
    return yaml.safe_load((SPECS / f"{name}.yaml").read_text())


def train_spec(spec: dict | str, quick: bool = False, tag: str | None = None, seed: int = 0):
    """Train a spec (a dict or a specs/ name) with training seed `seed` into
    runs/repro/TAG/seedN; return the trained model.

    With DYNGRAPH_REPRO_REUSE=1 (`python -m dyngraph.repro --reuse`) a finished run of the same
    resolved spec there is loaded instead of trained again: a change to how results are
    evaluated or summarized then costs minutes, not the hours of training."""
    d = copy.deepcopy(spec_dict(spec) if isinstance(spec, str) else spec)
    tag = tag or d["name"]
    d["train"]["seed"] = seed
    out = (RUNS_QUICK if quick else RUNS) / tag / f"seed{seed}"
    torch.set_num_threads(1)
    if os.environ.get("DYNGRAPH_REPRO_REUSE") == "1" and (model := _finished(d, out)) is not None:
        return model
    with torch.enable_grad():  # callers evaluate under no_grad
        r = train(d, out=out, stage_steps=150 if quick else None, log=lambda *a: None)
    return r.model


def _finished(d: dict, out: Path):
    """The model of a finished run in `out` if it was trained from this very spec, else None."""
    loaded = load_spec(copy.deepcopy(d))
    resolved = out / "resolved.json"
    if not (out / "final.pt").exists() or not resolved.exists():
        return None
    if json.loads(resolved.read_text()) != loaded.spec.model_dump(mode="json"):
        return None
    model = compile_spec(loaded, backend=loaded.spec.train.backend)
    load_into(model, out / "final.pt")
    return model.eval()


def splits(model) -> tuple:
    b = Batches(model.spec.train)
    return b.split("val"), b.split("test")


def static_spec(depth: int, base: str = "msdnet_early_exit") -> dict[str, Any]:
    """A static network: the same stem, `depth` of the same blocks, one head; trained alike."""
    d = spec_dict(base)
    stem = d["graph"][0]
    block = {"type": "residual_mlp", "hidden": 16, "norm": True, "zero_init": True}
    d["name"] = f"static_depth{depth}"
    d["graph"] = (
        [stem]
        + [dict(block) for _ in range(depth)]
        + [{"type": "classifier", "classes": 5, "norm": True}]
    )
    d["train"]["stages"] = [
        {
            "name": "static",
            "steps": d["train"]["stages"][0]["steps"],
            "optimizer": {"type": "adamw", "lr": 2.0e-3},
            "schedule": {"type": "onecycle"},
        }
    ]
    d["train"].pop("calibrate", None)
    return d


def _static_seed(depth: int, seed: int, quick: bool) -> tuple[float, float]:
    from ..training.evaluate import evaluate

    model = train_spec(static_spec(depth), quick, tag=f"static_depth{depth}", seed=seed)
    r = evaluate(model, splits(model)[1])
    return r["quality"], r["mean_macs"]


def static_baselines(quick: bool = False) -> list[dict[str, Any]]:
    """Static networks of depth 1..8 on state_tracking, each trained with the recipes' seeds:
    MACs and test accuracy (the seed mean, with its std and values). Cached in docs/repro:
    both seed sets are compared with this one reference curve."""
    cache = results_dir(quick) / "static_baselines.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
        if all("accuracies" in r for r in rows):
            return rows
    jobs = [(d, s) for d in range(8, 0, -1) for s in SEEDS]  # deepest (dearest) first
    accs = dict(
        zip(jobs, in_processes(_static_seed, [(d, s, quick) for d, s in jobs]), strict=True)
    )
    rows = []
    for depth in range(1, 9):
        acc = stats([accs[depth, s][0] for s in SEEDS])
        rows.append(
            {
                "depth": depth,
                "macs": accs[depth, SEEDS[0]][1],
                "accuracy": acc["mean"],
                "accuracy_std": acc["std"],
                "accuracies": acc["values"],
            }
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def interpolate(rows: list[dict[str, float]], macs: float) -> float:
    """Static accuracy at `macs` by linear interpolation between depths (clamped at the ends)."""
    xs = [r["macs"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    return float(np.interp(macs, xs, ys))


def steps_by(steps: torch.Tensor, level: torch.Tensor, name: str) -> dict:
    """Mean steps, the mean steps at each difficulty `level` (`steps_by_<name>`) and their
    Spearman correlation: how a halting model's pondering follows a task's difficulty."""
    s, levels = steps.float(), sorted(set(level.tolist()))
    return {
        "mean_steps": float(s.mean()),
        name: levels,
        f"steps_by_{name}": [float(s[level == v].mean()) for v in levels],
        "spearman": spearman(level.numpy(), s.numpy()),
    }


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):
            m = v == val
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0  # one of them constant (every input the same steps): no correlation
    return float(np.corrcoef(ra, rb)[0, 1])


def stats(values: Sequence[float], better: str = "higher") -> dict[str, Any]:
    """Mean, sample std, the worst value (the lowest where higher is better) and the values."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    worst = min(v) if better == "higher" else max(v)
    return {"mean": mean, "std": std, "worst": worst, "values": v}


def curve_stats(curves: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Pointwise mean and std of per-seed curves (the same x for every seed)."""
    cols = [stats(c) for c in zip(*curves, strict=True)]
    return {"mean": [c["mean"] for c in cols], "std": [c["std"] for c in cols]}


def trend(curves: Sequence[Sequence[float]], min_rise: float, tol: float) -> dict[str, Any]:
    """Does a quantity rise with difficulty? On the seed-mean curve (x = difficulty): the mean
    of its upper half exceeds that of its lower half by `min_rise`, and no step down between
    neighbours is larger than `tol`. Per seed, how many rise at all (reported)."""
    mean = curve_stats(curves)["mean"]

    def rise(c: Sequence[float]) -> float:
        h = len(c) // 2
        return sum(c[-h:]) / h - sum(c[:h]) / h

    drop = max([a - b for a, b in zip(mean, mean[1:], strict=False)] + [0.0])
    return {
        "rise": rise(mean),
        "largest_drop": drop,
        "seeds_rising": sum(rise(c) > 0 for c in curves),
        "holds": rise(mean) >= min_rise and drop <= tol,
    }


def claim(holds: bool, text: str, measured: str) -> dict[str, Any]:
    """One claim of a reproduction: what is claimed, what was measured, whether it holds."""
    return {"claim": text, "measured": measured, "holds": bool(holds)}


def pm(st: dict[str, Any], scale: float = 1.0, fmt: str = ".2f", unit: str = "") -> str:
    """'mean ± std' of a `stats` dict, e.g. pm(acc, 100, '.2f', '%')."""
    return f"{scale * st['mean']:{fmt}} ± {scale * st['std']:{fmt.lstrip('+')}}{unit}"


def _workers(n_jobs: int) -> int:
    env = os.environ.get("DYNGRAPH_REPRO_JOBS")
    return max(1, min(n_jobs, int(env) if env else (os.cpu_count() or 1)))


def in_processes(fn: Callable, args: Sequence[tuple]) -> list:
    """fn(*a) for each a, in parallel processes (one per core, one thread each; spawned, so
    that nothing of this process's torch state is shared), results in the order of `args`."""
    if _workers(len(args)) == 1:
        return [fn(*a) for a in args]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(_workers(len(args)), mp_context=ctx) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        return [f.result() for f in futures]


def _run_seed(name: str, seed: int, quick: bool) -> dict:
    # CPU seconds of this process (one thread): what a seed costs a core, whatever else runs
    t = time.process_time()
    r = importlib.import_module(f"dyngraph.repro.{name}").run_seed(seed, quick)
    return {**r, "seconds": time.process_time() - t}


def suffix(seeds: Sequence[int]) -> str:
    """'' for the recipes' seeds, '.seeds-3-4-5' for another set."""
    return "" if tuple(seeds) == SEEDS else ".seeds-" + "-".join(str(x) for x in seeds)


def results_dir(quick: bool) -> Path:
    """docs/repro for real runs; quick runs (which check the pipeline only) stay in runs/."""
    return RUNS_QUICK if quick else DOCS


def reproduce_all(
    names: Sequence[str] = NAMES, seeds: Sequence[int] = SEEDS, quick: bool = False
) -> dict[str, dict]:
    """Run reproductions over `seeds`, every (reproduction, seed) pair in one pool of processes
    (dearest first, so that the cores stay busy), then summarize, save and plot each."""
    if {"early_exit", "gates"} & set(names):
        static_baselines(quick)  # once, before the seeds that read it
    jobs = [(n, s) for n in names for s in seeds]
    done = in_processes(_run_seed, [(n, s, quick) for n, s in jobs])
    results = {}
    for name in names:
        runs = {s: r for (n, s), r in zip(jobs, done, strict=True) if n == name}
        mod = importlib.import_module(f"dyngraph.repro.{name}")
        result = {
            "seeds": list(seeds),
            "seconds_per_seed": stats([r["seconds"] for r in runs.values()], "lower"),
            # with --reuse the seconds are evaluation only: the training was an earlier run's
            "reused_runs": os.environ.get("DYNGRAPH_REPRO_REUSE") == "1",
            **mod.summarize(runs, quick),
            "runs": {str(s): r for s, r in runs.items()},
        }
        out, stem = results_dir(quick), name + suffix(seeds)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
        mod.plot(result, out / f"{stem}.png")
        results[name] = result
    return results


def reproduce(name: str, seeds: Sequence[int] = SEEDS, quick: bool = False) -> dict:
    """One reproduction over `seeds` (see `reproduce_all`)."""
    return reproduce_all((name,), seeds, quick)[name]


def label(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    """Axis labels, title, a light grid and a small legend: every reproduction plot's style."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def spread(ax, x, curves: Sequence[Sequence[float]], style: str = "o-", label: str = "") -> None:
    """Each seed's curve faint, their mean with std bars: how every reproduction plot shows
    the spread over seeds."""
    line = None
    for c in curves:
        (line,) = ax.plot(x, c, "-", alpha=0.25, lw=1, color=line.get_color() if line else None)
    cs = curve_stats(curves)
    ax.errorbar(
        x,
        cs["mean"],
        yerr=cs["std"],
        fmt=style,
        capsize=3,
        color=line.get_color(),
        label=f"{label + ': ' if label else ''}mean ± std of {len(curves)} seeds",
    )


def save_figure(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
