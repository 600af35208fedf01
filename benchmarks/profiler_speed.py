"""Profiler throughput: per-input MACs for N inputs from one batched pass, versus counting each
input alone with FlopCounterMode and with fvcore (what a user of those tools would do).

    python benchmarks/profiler_speed.py [--n 10000] [--spec specs/msdnet_early_exit.yaml]

One thread. The per-input fvcore count is slow (a jit trace per input): it is timed on a
subset and reported per input, and its total is extrapolated (marked as such).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import dyngraph as dg
from dyngraph.cost import fvcore_macs
from dyngraph.data import load_data

ROOT = Path(__file__).resolve().parents[1]


def per_input_flopcounter(model, x) -> tuple[float, list[int]]:
    t = time.perf_counter()
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            with FlopCounterMode(display=False) as fc:
                model(x[i : i + 1])
            out.append(fc.get_total_flops() // 2)
    return time.perf_counter() - t, out


class _Whole(torch.nn.Module):
    """The model as one module for fvcore (it traces the path this input takes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def per_input_fvcore(model, x) -> float:
    t = time.perf_counter()
    whole = _Whole(model)
    for i in range(x.shape[0]):
        fvcore_macs(whole, (x[i : i + 1],))
    return time.perf_counter() - t


def run(spec: Path, n: int, fvcore_n: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dg.compile(spec, backend="none").eval()
    data = load_data(model.spec.train.data.name, split="train", n=n, **model.spec.train.data.params)
    x = data.x
    model.unit_costs("torch")  # static costs are counted once per model; timed separately below
    t0 = time.perf_counter()
    model._costs.clear()
    model.unit_costs("torch")
    t_static = time.perf_counter() - t0
    dg.profile(
        model, x[:256], latency=False, curve=False, check_waste=False, counter="torch"
    )  # warm
    t0 = time.perf_counter()
    prof = dg.profile(
        model, x, latency=False, curve=False, check_waste=False, counter="torch", batch_size=256
    )
    t_prof = time.perf_counter() - t0
    t_fc, alone = per_input_flopcounter(model, x)
    assert prof.per_input_macs.tolist() == alone, "profile and per-input FlopCounterMode disagree"
    t_fv = per_input_fvcore(model, x[:fvcore_n])
    return {
        "spec": spec.name,
        "n": x.shape[0],
        "profile_s": t_prof,
        "static_count_s": t_static,
        "flopcounter_s": t_fc,
        "fvcore_s_per_input": t_fv / fvcore_n,
        "fvcore_n": fvcore_n,
        "speedup_vs_flopcounter": t_fc / t_prof,
        "speedup_vs_fvcore": (t_fv / fvcore_n * x.shape[0]) / t_prof,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--fvcore-n", type=int, default=300)
    ap.add_argument("--spec", type=Path, default=ROOT / "specs" / "msdnet_early_exit.yaml")
    args = ap.parse_args()
    r = run(args.spec, args.n, args.fvcore_n)
    print(f"{r['spec']}: {r['n']:,} inputs, identical per-input MACs")
    print(
        f"  dg.profile (MACs only, one batched pass): {r['profile_s']:.2f} s  (+{r['static_count_s']:.2f} s counting the units once)"
    )
    print(
        f"  per-input FlopCounterMode:                {r['flopcounter_s']:.2f} s  -> {r['speedup_vs_flopcounter']:.0f}x slower"
    )
    print(
        f"  per-input fvcore: {1e3 * r['fvcore_s_per_input']:.1f} ms/input on {r['fvcore_n']} inputs "
        f"-> {r['speedup_vs_fvcore']:.0f}x slower (extrapolated to {r['n']:,})"
    )
    print(f"profiler_speedup={r['speedup_vs_flopcounter']:.0f}")


if __name__ == "__main__":
    main()
