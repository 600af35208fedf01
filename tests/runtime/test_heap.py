"""dg.hold_heap: a model's passes stop faulting their temporaries' pages in again, and the
timing commands say which malloc policy they ran under. Each case runs in a fresh process:
the policy is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from dyngraph.profiler.profile import FAULTS_NOTED
from tests.conftest import SPECS

GLIBC = platform.libc_ver()[0] == "glibc"

# A per-token exit model at L = 64 (benchmarks/token_exits.py's) in a process whose heap gives
# its big blocks back when they are freed, as glibc's defaults do for blocks past a threshold
# they move with the process's history (so whether a given pass faults under the plain
# defaults differs from one process to the next; here it always does), then held or not.
MODEL = """
import json, resource, sys
import torch
import dyngraph as dg
from dyngraph.runtime.heap import heap_state

from dyngraph.runtime.heap import _libc

if _libc() is not None:  # a heap that gives big blocks back: each is a fresh map (mmap threshold)
    _libc().mallopt(-3, 1 << 16)
held = dg.hold_heap() if sys.argv[1] == "hold" else None
head = {"type": "token_classifier", "classes": 8}
spec = {
    "dyngraph": 1, "name": "heap",
    "input": {"shape": [64], "dtype": "int64", "vocab": 32, "pad_id": 0},
    "task": {"type": "classification", "classes": 8, "per": "token"},
    "graph": [
        {"type": "embedding", "vocab": 32, "dim": 128},
        {"exit": {"per": "token", "head": head,
                  "criterion": {"type": "max_prob", "threshold": 0.2}}},
        {"type": "transformer_block", "heads": 4, "mlp_ratio": 4, "causal": True},
        {"exit": {"per": "token", "head": head}},
    ],
}
torch.set_num_threads(1)
torch.manual_seed(0)
model = dg.compile(spec, backend="none").eval()
"""
PASSES = (
    MODEL
    + """
ids = torch.randint(1, 32, (32, 64), generator=torch.Generator().manual_seed(1))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.no_grad():
    for _ in range(10):
        model(ids)
    before = faults()
    for _ in range(20):
        model(ids)
print(json.dumps({"held": held, "state": heap_state(), "faults": (faults() - before) / 20}))
"""
)


def _env() -> dict[str, str]:
    """This environment without malloc settings of its own (they would change the policy)."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}


def _passes(policy: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PASSES, policy], capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_held_heap_keeps_repeated_passes_from_faulting_pages_in():
    held, giving = _passes("hold"), _passes("give back")
    assert giving["state"] == "default"
    if not GLIBC:  # nothing to hold: nothing changed, and the report says so
        assert (held["held"], held["state"]) == (False, "default")
        return
    assert held["held"] is True and held["state"] == "held"
    # pages per pass: a pass touches ~1,300; held, a few still come fresh while the heap grows
    assert held["faults"] < 64, held
    # what it prevents: a heap that gives the pass's pages back faults them in at every pass
    assert giving["faults"] > 1000, giving


PROFILE = (
    MODEL
    + """
ids = torch.randint(1, 32, (256, 64), generator=torch.Generator().manual_seed(1))
prof = dg.profile(model, ids, batch_size=256, max_paths=1, curve=False, check_waste=False)
print(json.dumps({"faults": prof.summary["page_faults_per_pass"], "warnings": prof.warnings}))
"""
)


def test_a_profile_says_when_its_timed_pass_faulted_pages_in():
    runs = {}
    for policy in ("hold", "give back"):
        out = subprocess.run(
            [sys.executable, "-c", PROFILE, policy], capture_output=True, text=True, env=_env()
        )
        assert out.returncode == 0, out.stderr
        runs[policy] = json.loads(out.stdout)
    noted = [w for w in runs["give back"]["warnings"] if "dg.hold_heap()" in w]
    if not GLIBC:  # nothing to hold: a warning, if any, does not name the call
        assert noted == []
        return
    # (a pass at B = 256 touches ~10,000 pages; held, a few come fresh from a growing heap)
    assert runs["hold"]["faults"] < FAULTS_NOTED, runs["hold"]
    assert not any("faulted" in w for w in runs["hold"]["warnings"])
    assert runs["give back"]["faults"] > FAULTS_NOTED and len(noted) == 1, runs["give back"]


def test_the_timing_commands_hold_the_heap_unless_asked_not_to(tmp_path):
    spec = str(next(p for p in SPECS if p.stem == "digits_early_exit"))
    common = ["profile", spec, "--data", "digits", "--n", "120", "--no-latency", "--no-progress"]
    for flag, want in (([], "held" if GLIBC else "default"), (["--glibc-heap"], "default")):
        out = tmp_path / f"p{len(flag)}"
        run = subprocess.run(
            [sys.executable, "-m", "dyngraph", *common, "--out", str(out), *flag],
            capture_output=True,
            text=True,
            env=_env(),
        )
        assert run.returncode == 0, run.stderr
        assert f"heap {want}" in run.stdout  # the pass's throughput line
        assert json.loads((out / "profile.json").read_text())["heap"] == want
        assert f"heap `{want}`" in (out / "report.md").read_text()
