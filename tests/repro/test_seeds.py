"""The reproductions' seed machinery: statistics, trend tests, the process pool and the report.

The reproductions themselves are the slow tier (tests/test_reproductions.py); here a quick
Composer run over two seeds checks the pipeline end to end in a few seconds per seed.
"""

from __future__ import annotations

import json
import math

import pytest

from dyngraph.repro import composer, sections
from dyngraph.repro.common import (
    RUNS_QUICK,
    _finished,
    reproduce,
    spec_dict,
    stats,
    suffix,
    trend,
)


def test_stats_use_the_sample_std_and_name_the_worst_seed():
    s = stats([0.9, 0.8, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    assert s["worst"] == 0.8 and stats([3.0, 5.0], "lower")["worst"] == 5.0
    assert stats([2.0])["std"] == 0.0


@pytest.mark.parametrize(
    "curves, holds",
    [
        ([[1, 2, 3, 4], [1, 1.5, 3.5, 4]], True),  # rises on every seed
        ([[1, 1.05, 3, 4], [1, 0.95, 3, 4]], True),  # a dip within the tolerance
        ([[3, 2.7, 3.5, 4.5]], False),  # the 3.00 -> 2.74: a step down > 0.25
        ([[2, 2, 2, 2.1]], False),  # flat: no rise
    ],
)
def test_trend_is_tested_on_the_seed_mean_curve_with_a_tolerance(curves, holds):
    t = trend(curves, min_rise=1.0, tol=0.25)
    assert t["holds"] is holds
    assert t["seeds_rising"] == sum(sum(c[2:]) > sum(c[:2]) for c in curves)


def test_other_seed_sets_are_saved_beside_the_recipes_seeds():
    assert suffix((0, 1, 2)) == "" and suffix((3, 4, 5)) == ".seeds-3-4-5"


def test_a_quick_reproduction_over_seeds_runs_in_processes_and_reports_spreads(monkeypatch):
    monkeypatch.setenv("DYNGRAPH_REPRO_JOBS", "2")
    r = reproduce("composer", seeds=(0, 1), quick=True)
    saved = json.loads((RUNS_QUICK / "composer.seeds-0-1.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["runs"]) == {"0", "1"}
    assert (RUNS_QUICK / "composer.seeds-0-1.png").stat().st_size > 0
    # the headline numbers are the mean and std of the seeds' own numbers
    small = [r["runs"][s]["small_only_accuracy"] for s in ("0", "1")]
    assert r["small_only_accuracy"]["mean"] == pytest.approx(sum(small) / 2)
    assert r["small_only_accuracy"]["std"] == pytest.approx(abs(small[0] - small[1]) / math.sqrt(2))
    assert all(isinstance(c["holds"], bool) and c["measured"] for c in r["claims"].values())
    # gamma is calibrated to each parameter budget on val, within the gamma trained on: the
    # test fraction lands at the budget unless even the largest gamma keeps more parameters
    for b in r["runs"]["1"]["budgets"]:
        assert 0 <= b["gamma"] <= 8.0
        assert b["params_fraction"] <= b["budget"] + 0.05 or b["gamma"] == 8.0
    # a seed in a spawned process gives what it gives in this one
    again = composer.run_seed(1, quick=True)
    assert again["points"] == r["runs"]["1"]["points"]
    # --reuse loads the finished run instead of training, and only for the very same spec
    monkeypatch.setenv("DYNGRAPH_REPRO_REUSE", "1")
    assert composer.run_seed(1, quick=True)["points"] == again["points"]
    d = spec_dict("composer_wide_digits") | {"name": "composer_wide_digits"}
    d["train"]["seed"] = 1
    out = RUNS_QUICK / "composer_wide_digits" / "seed1"
    assert _finished(d, out) is not None
    d["train"]["batch_size"] = 64
    assert _finished(d, out) is None
    text = sections.section_composer(saved | {"folder": RUNS_QUICK})
    assert any("±" in line for line in text)
