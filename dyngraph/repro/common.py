"""Shared pieces of the reproductions: training a spec into runs/repro, static baselines."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..spec.load import load_spec
from ..training import train
from ..training.batches import Batches

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
DOCS = ROOT / "docs" / "repro"
RUNS = ROOT / "runs" / "repro"
RUNS_QUICK = ROOT / "runs" / "repro-quick"


def spec_dict(name: str) -> dict[str, Any]:
    return yaml.safe_load((SPECS / f"{name}.yaml").read_text())


def train_spec(spec: dict | str, quick: bool = False, tag: str | None = None):
    """Train a spec (a dict or a specs/ name) into runs/repro/TAG; return the trained model."""
    d = copy.deepcopy(spec_dict(spec) if isinstance(spec, str) else spec)
    tag = tag or d["name"]
    torch.set_num_threads(1)
    with torch.enable_grad():  # callers evaluate under no_grad
        r = train(
            d,
            out=(RUNS_QUICK if quick else RUNS) / tag,
            stage_steps=150 if quick else None,
            log=lambda *a: None,
        )
    return r.model


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


def static_baselines(quick: bool = False) -> list[dict[str, float]]:
    """Static networks of depth 1..8 on state_tracking: test accuracy and MACs (cached)."""
    from ..training.evaluate import evaluate

    cache = DOCS / ("static_baselines_quick.json" if quick else "static_baselines.json")
    if cache.exists():
        return json.loads(cache.read_text())
    rows = []
    for depth in range(1, 9):
        model = train_spec(static_spec(depth), quick, tag=f"static_depth{depth}")
        _, test = splits(model)
        r = evaluate(model, test)
        rows.append({"depth": depth, "macs": r["mean_macs"], "accuracy": r["quality"]})
    DOCS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def interpolate(rows: list[dict[str, float]], macs: float) -> float:
    """Static accuracy at `macs` by linear interpolation between depths (clamped at the ends)."""
    xs = [r["macs"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    return float(np.interp(macs, xs, ys))


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
    return float(np.corrcoef(ra, rb)[0, 1])


def save_result(name: str, result: dict) -> Path:
    DOCS.mkdir(parents=True, exist_ok=True)
    p = DOCS / f"{name}.json"
    p.write_text(json.dumps(result, indent=1, default=float))
    return p


def load(name: str):
    return load_spec(SPECS / f"{name}.yaml")


def label(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    """Axis labels, title, a light grid and a small legend: every reproduction plot's style."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def save_figure(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
