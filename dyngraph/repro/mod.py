"""Mixture-of-Depths: per-token routing on per-position state tracking with causal attention.

Claims (Raposo et al., 2024): routing a capacity of each sequence's tokens through a block, the
rest around it, trains to a model that spends less compute per token for little loss, and the
saved MACs become saved time. Here, on state_tokens with `full: true` (the state after every
step of a walk of 16 steps over six permutations of five states: a label at every position,
whose difficulty is its number of steps; causal attention), every model an embedding, causal pre-LN layers (d = 64) and a per-token head,
trained alike (1000 steps):
- (b) `mod_deep`: 2 layers, then 6 per-token gates routing the top 25% of tokens, against
  static models of depth 1..8 at the same mean MACs (interpolated); the depth each token
  reached (gates that routed it) by position;
- (c) specs/mod_tagger.yaml, the paper's layout: every other layer of 8 a gate at capacity
  12.5%, against the dense 8-layer model at equal training steps: test loss, accuracy, MACs,
  and infer time (one thread, B = 256, interleaved).
"""

from __future__ import annotations

import copy
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .. import tasks  # noqa: E402
from ..profiler.tokens import depth_per_token  # noqa: E402
from ..training.evaluate import evaluate  # noqa: E402
from .common import (  # noqa: E402
    claim,
    curve_stats,
    label,
    pm,
    save_figure,
    spearman,
    spec_dict,
    splits,
    stats,
    train_spec,
)

SPEC = "mod_tagger"
DEPTHS = range(1, 9)


def _layers(d: dict) -> tuple[dict, dict, dict]:
    """(embedding, a static layer, the head) of mod_tagger."""
    return d["graph"][0], d["graph"][1]["nodes"][0], d["graph"][2]


def static_model(depth: int) -> dict:
    """The same embedding, `depth` causal layers and the head; trained alike."""
    d = copy.deepcopy(spec_dict(SPEC))
    stem, layer, head = _layers(d)
    d["name"] = f"mod_static{depth}"
    d["graph"] = [stem] + [dict(layer) for _ in range(depth)] + [head]
    return d


def mod_deep() -> dict:
    """2 static layers, then 6 per-token gates at capacity 25%."""
    d = copy.deepcopy(spec_dict(SPEC))
    stem, layer, head = _layers(d)
    gate = copy.deepcopy(d["graph"][1]["nodes"][1])
    gate["gate"]["capacity"] = 0.25
    d["name"] = "mod_deep"
    d["graph"] = [stem, dict(layer), dict(layer)] + [copy.deepcopy(gate) for _ in range(6)] + [head]
    return d


@torch.no_grad()
def measure(model, test) -> dict:
    """Test accuracy, loss, mean MACs and, with per-token gates, mean depth by position."""
    r = evaluate(model, test)
    logits = model(test.x).logits
    out = {
        "accuracy": r["quality"],
        "loss": float(tasks.loss(model.spec.task, logits, test.y).mean()),
        "macs": r["mean_macs"],
    }
    trace = model(test.x).trace
    depth = depth_per_token(trace)
    if depth is not None:
        valid = depth >= 0
        out["depth_by_position"] = [
            float(depth[:, i][valid[:, i]].float().mean()) for i in range(depth.shape[1])
        ]
    return out


@torch.no_grad()
def decoding(model, test) -> dict:
    """Routing by the causal predictors (`set_decode(True)`): accuracy, and how often a token's
    decision agrees with the top-k's, over every gate."""
    topk = model(test.x).trace.tokens
    model.set_decode(True)
    try:
        out = measure(model, test)
        pred = model(test.x).trace.tokens
    finally:
        model.set_decode(False)
    same = torch.stack([(pred[k] == topk[k]).float().mean() for k in topk]).mean()
    return {"decode_accuracy": out["accuracy"], "predictor_agreement": float(same),
            "decode_macs": out["macs"]}  # fmt: skip


@torch.no_grad()
def infer_time(models: dict, x: torch.Tensor, rounds: int = 15) -> dict[str, float]:
    """Median seconds of each model's infer pass over `x`, one thread, interleaved rounds."""
    torch.set_num_threads(1)
    for m in models.values():
        m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_seed(seed: int, quick: bool = False) -> dict:
    static = []
    for depth in DEPTHS:
        m = train_spec(static_model(depth), quick, seed=seed)
        static.append({"depth": depth, **measure(m, splits(m)[1])})
        if depth == max(DEPTHS):
            dense = m
    deep = train_spec(mod_deep(), quick, seed=seed)
    test = splits(deep)[1]
    b = measure(deep, test)
    same = float(np.interp(b["macs"], [s["macs"] for s in static], [s["accuracy"] for s in static]))
    paper = train_spec(SPEC, quick, seed=seed)
    c = measure(paper, test) | decoding(paper, test)
    t = infer_time({"mod": paper, "dense": dense}, test.x[:256])
    return {
        "static": static,
        "deep": b | {"static_same_macs": same, "gain_points": 100 * (b["accuracy"] - same)},
        "paper": c | {"time_fraction": t["mod"] / t["dense"]},
        "dense": static[-1],
    }


def summarize(runs: dict[int, dict], quick: bool = False) -> dict:
    rs = list(runs.values())
    dense_macs = rs[0]["dense"]["macs"]
    static = [
        {"depth": d, "macs": rs[0]["static"][i]["macs"],
         "accuracy": stats([r["static"][i]["accuracy"] for r in rs])}
        for i, d in enumerate(DEPTHS)
    ]  # fmt: skip
    deep = {
        k: stats([r["deep"][k] for r in rs])
        for k in ("accuracy", "static_same_macs", "gain_points")
    }
    deep["macs_fraction"] = stats([r["deep"]["macs"] / dense_macs for r in rs], "lower")
    depth = [r["deep"]["depth_by_position"] for r in rs]
    mean_depth = curve_stats(depth)["mean"]
    rho = spearman(list(range(len(mean_depth))), mean_depth)
    paper = {
        "accuracy": stats([r["paper"]["accuracy"] for r in rs]),
        "loss": stats([r["paper"]["loss"] for r in rs], "lower"),
        "dense_accuracy": stats([r["dense"]["accuracy"] for r in rs]),
        "dense_loss": stats([r["dense"]["loss"] for r in rs], "lower"),
        "macs_fraction": stats([r["paper"]["macs"] / dense_macs for r in rs], "lower"),
        "time_fraction": stats([r["paper"]["time_fraction"] for r in rs], "lower"),
        "decode_accuracy": stats([r["paper"].get("decode_accuracy", float("nan")) for r in rs]),
        "predictor_agreement": stats(
            [r["paper"].get("predictor_agreement", float("nan")) for r in rs]
        ),
        "decode_macs_fraction": stats(
            [r["paper"].get("decode_macs", float("nan")) / dense_macs for r in rs], "lower"
        ),
    }
    claims = {
        "beats_static": claim(
            deep["gain_points"]["mean"] >= 3 and deep["macs_fraction"]["mean"] <= 0.5,
            "per-token gates (2 layers + 6 gates at 25%) beat static models of the same MACs "
            "by >= 3 points (seed mean) at <= 50% of the dense 8-layer model's MACs",
            f"{pm(deep['gain_points'], 1, '+.2f')} points (worst seed "
            f"{deep['gain_points']['worst']:+.2f}) at {pm(deep['macs_fraction'], 100, '.1f', '%')}",
        ),
        "deeper_later": claim(
            rho > 0.5,
            "tokens at later positions are routed through more gates (Spearman of position "
            "and the seed-mean depth > 0.5)",
            f"Spearman {rho:.2f}; depth {mean_depth[0]:.2f} at position 0, "
            f"{mean_depth[-1]:.2f} at position {len(mean_depth) - 1}",
        ),
        "time_follows_macs": claim(
            paper["time_fraction"]["mean"] <= paper["macs_fraction"]["mean"] + 0.1,
            "the paper's layout (every other layer at 12.5%) runs in a time fraction within "
            "0.1 of its MAC fraction of the dense model (infer, B = 256, one thread)",
            f"time {pm(paper['time_fraction'], 100, '.1f', '%')}, MACs "
            f"{pm(paper['macs_fraction'], 100, '.1f', '%')}; test loss "
            f"{pm(paper['loss'], 1, '.3f')} against dense {pm(paper['dense_loss'], 1, '.3f')}, "
            f"accuracy {pm(paper['accuracy'], 100, '.2f', '%')} against "
            f"{pm(paper['dense_accuracy'], 100, '.2f', '%')}",
        ),
    }
    return {"static": static, "deep": deep, "depth_by_position": curve_stats(depth),
            "depth_spearman": rho, "paper": paper, "claims": claims}  # fmt: skip


def plot(result: dict, path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = result["static"][-1]["macs"]
    st = result["static"]
    a.errorbar([s["macs"] / dense for s in st], [100 * s["accuracy"]["mean"] for s in st],
               yerr=[100 * s["accuracy"]["std"] for s in st], fmt="k.-", capsize=2,
               label="static, depth 1..8")  # fmt: skip
    d = result["deep"]
    a.errorbar([d["macs_fraction"]["mean"]], [100 * d["accuracy"]["mean"]],
               yerr=[100 * d["accuracy"]["std"]], fmt="o", capsize=2,
               label="2 layers + 6 MoD gates at 25%")  # fmt: skip
    p = result["paper"]
    a.errorbar([p["macs_fraction"]["mean"]], [100 * p["accuracy"]["mean"]],
               yerr=[100 * p["accuracy"]["std"]], fmt="s", capsize=2,
               label="every other layer MoD at 12.5%")  # fmt: skip
    n = len(result["seeds"])
    label(a, "mean MACs per sequence / dense 8 layers", "test accuracy per token (%)",
          f"state_tokens: MoD vs static depth ({n} seeds)")  # fmt: skip
    dp = result["depth_by_position"]
    b.errorbar(range(len(dp["mean"])), dp["mean"], yerr=dp["std"], fmt="o-", capsize=2)
    label(b, "position", "gates that routed the token (of 6)", "depth per token by position",
          legend=False)  # fmt: skip
    save_figure(fig, path)
