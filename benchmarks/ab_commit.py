"""Same-run A/B of the infer pass against an earlier commit: is a refactor slower?

    python benchmarks/ab_commit.py 05b3349      # about 10 minutes; prints a table

The earlier commit's package is unpacked (git archive) and imported as `dyngraph_then`
beside the working tree's `dyngraph`; each case of run.py (eager, one thread, decisions
forced as run.py forces them; one case with its real exit criterion) is compiled by both
with the same seed, checked to give identical logits and unit counts, and timed in
interleaved rounds (run.py's time_interleaved: medians, same run). B = 1 is 64 inputs run
one at a time. A ratio now / then above 1 is a slowdown.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch
from run import case_specs, inputs, time_interleaved

import dyngraph as now
from dyngraph import forcing

HERE = Path(__file__).resolve().parent
CASES = [
    ("early_exit", 0.3),
    ("early_exit", 0.9),
    ("early_exit", "criterion"),
    ("gates", 0.6),
    ("metalayer", [0.55, 0.25, 0.15, 0.05]),
    ("halting", (1, 20)),
]
KEYS = {"early_exit": "exit", "gates": "gate", "metalayer": "metalayer", "halting": "halting"}
PLURAL = {"early_exit": "exits", "gates": "gates", "metalayer": "metalayers", "halting": "haltings"}


def unpack(commit: str) -> object:
    """The package at `commit`, imported as `dyngraph_then`."""
    tar = subprocess.run(
        ["git", "archive", commit, "dyngraph"], cwd=HERE.parent, capture_output=True, check=True
    ).stdout
    root = Path(tempfile.mkdtemp(prefix="dyngraph_then_"))
    tarfile.open(fileobj=BytesIO(tar)).extractall(root, filter="data")
    (root / "dyngraph").rename(root / "dyngraph_then")
    sys.path.insert(0, str(root))
    return importlib.import_module("dyngraph_then")


def force_then(model, kind: str, setting) -> None:
    """Decisions forced the way commits before dyngraph.forcing did: a `force` attribute."""
    nodes = getattr(model, PLURAL[kind])
    for n in nodes[:-1] if kind == "early_exit" else nodes:
        n.force = 1 - setting if kind == "early_exit" else setting


def build(pkg, kind: str, setting, then: bool):
    spec, _ = case_specs(kind)
    torch.manual_seed(0)
    m = pkg.compile(spec, backend="none").eval()
    if setting == "criterion":
        return m
    if then and not hasattr(pkg, "forcing"):
        force_then(m, kind, setting)
    else:
        f = importlib.import_module(pkg.__name__ + ".forcing")
        f.force(m, KEYS[kind], 1 - setting if kind == "early_exit" else setting)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("commit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    then = unpack(args.commit)
    assert forcing  # the working tree's
    print(f"now / then against {args.commit}: one thread, eager, medians of interleaved rounds")
    print("| case | setting | B | then | now | now / then |\n|---|---|---:|---:|---:|---:|")
    ratios = []
    for kind, setting in CASES:
        a, b = build(then, kind, setting, True), build(now, kind, setting, False)
        for n in (256, 64, 1):
            xs = inputs(n)
            with torch.no_grad():
                for x in xs:  # the same answers and the same work, or the comparison is void
                    oa, ob = a(x), b(x)
                    assert torch.equal(oa.logits, ob.logits)
                    assert torch.equal(oa.trace.unit_counts, ob.trace.unit_counts)

            def run(m, xs=xs):
                def f():
                    with torch.no_grad():
                        for x in xs:
                            m(x)

                return f

            t = time_interleaved({"then": run(a), "now": run(b)}, 1.0 if n > 1 else 2.0)
            ratios.append(t["now"] / t["then"])
            print(
                f"| {kind} | {setting} | {n} | {t['then'] * 1e3:.2f} ms | {t['now'] * 1e3:.2f} ms "
                f"| {ratios[-1]:.3f} |",
                flush=True,
            )
    print(
        f"\nnow / then: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
