"""A seeded fuzz of the spec loader in the default tier (tests/spec/fuzz.py runs more).

It runs in a fresh process, so that its memory is measured from a clean start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_three_hundred_mutations_end_in_exit_0_or_a_line():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.spec.fuzz", "--n", "300", "--seed", "12", "--json"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    fails = [o for o in outcomes if o["status"].startswith("FAIL")]
    assert not fails, fails[:5]
    assert max(o["seconds"] for o in outcomes) < 10
    assert max(o["grew_mb"] for o in outcomes) < 1024
    assert len({o["kind"] for o in outcomes}) >= 20  # every class of mutation was tried
    assert {o["status"] for o in outcomes} == {"ok", "error"}
