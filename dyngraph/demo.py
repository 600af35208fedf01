"""The README's demo: validate, compile, run and inspect an example spec."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

SPEC = Path(__file__).resolve().parents[1] / "specs" / "digits_early_exit.yaml"


def main(spec: Path = SPEC) -> int:
    import dyngraph as dg
    from dyngraph.inspect import inspect_text

    torch.set_num_threads(1)
    print(f"== validate {spec.name}")
    loaded = dg.load_spec(spec)
    print("ok")
    print(f"== compile (backend {loaded.spec.compile.backend})")
    t = time.perf_counter()
    model = dg.compile(loaded).eval()
    x = torch.randn(256, *loaded.spec.input.shape)
    out = model(x)
    print(f"compiled and ran a batch of 256 in {time.perf_counter() - t:.1f} s")
    print(inspect_text(model))
    macs = model.per_input_macs(out.trace)
    print(f"mean MACs per input {macs.float().mean():,.0f} of {model.static_macs():,} static")
    return 0


if __name__ == "__main__":
    sys.exit(main())
