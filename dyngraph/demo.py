"""The README's demo: validate, compile, briefly train, calibrate and profile an example spec.

python -m dyngraph.demo        (or `make demo`) -> profiles/demo/
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "msdnet_early_exit.yaml"


def main(spec: Path = SPEC, steps: int = 800, out: Path = ROOT / "profiles" / "demo") -> int:
    import dyngraph as dg
    from dyngraph.inspect import inspect_text
    from dyngraph.training import evaluate, train
    from dyngraph.training.batches import Batches
    from dyngraph.training.calibrate import calibrate_budget, fit_temperatures

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"== 1. validate {spec.relative_to(ROOT)}")
    loaded = dg.load_spec(spec)
    print("ok")
    print(
        f"== 2. train {steps} steps (of the spec's {loaded.spec.train.stages[0].steps}) on {loaded.spec.train.data.name}"
    )
    run = train(loaded, out=ROOT / "runs" / "demo", stage_steps=steps)
    print(f"== 3. compile (backend {loaded.spec.compile.backend}) and load the trained weights")
    model = dg.compile(loaded)
    model.load_state_dict(run.model.state_dict())
    model.eval()
    print(inspect_text(model))
    print("== 4. calibrate: temperature per exit, then the exit threshold for 50% of the MACs")
    b = Batches(loaded.spec.train)
    val, test = b.split("val"), b.split("test")
    fit_temperatures(model, val)
    cal = calibrate_budget(model, val, 0.5)
    res = evaluate(model, test)
    model.set_threshold(1.01)
    full = evaluate(model, test)
    model.set_threshold(cal["value"])
    print(
        f"threshold {cal['value']:.3f}: test accuracy {100 * res['quality']:.2f}% at {res['macs_fraction']:.1%} "
        f"of the MACs (every input to the last exit: {100 * full['quality']:.2f}%)"
    )
    print("== 5. profile on the test split")
    dg.hold_heap()  # time with freed memory kept for the next pass, as `dyngraph profile` does
    prof = dg.profile(model, test, max_paths=8, n=2000)
    prof.save(out)
    s = prof.summary
    print(
        f"{s['inputs']:,} inputs: mean {s['mean_macs']:,.0f} MACs per input ({s['saving']:.0%} saved), "
        f"executed/ideal {s['dispatch_waste']:.3f}, {s['throughput_per_s']:,.0f} inputs/s at batch "
        f"{s['throughput_batch']}, {len(prof.paths)} paths"
    )
    print(
        f"wrote {out.relative_to(ROOT)}/report.md, profile.json and plots in {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
