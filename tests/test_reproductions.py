"""The slow tier: each seed system's headline experiment, reproduced (minutes each).

    make test-slow      (python -m pytest -m slow)

Each test re-runs its reproduction (`python -m dyngraph.repro NAME`, which also rewrites
docs/repro/NAME.json and .png) and checks the claim. Static baselines are cached in
docs/repro/static_baselines.json; delete it to retrain them.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_act_parity():
    from dyngraph.repro import act

    r = act.run()
    assert r["act_n8"]["accuracy"] >= 0.99
    assert r["fixed_one_step_n8"]["accuracy"] < 0.95
    assert r["act_n8"]["spearman"] > 0.5, (
        "ponder steps should grow with the number of non-zero bits"
    )


def test_l2s_beats_fixed_depth():
    from dyngraph.repro import l2s

    r = l2s.run()
    assert r["budgets_with_gain_0.1dB"] >= 2


def test_composer_gamma_sweep():
    from dyngraph.repro import composer

    r = composer.run()
    inner = [
        p for p in r["points"] if r["small_params_fraction"] + 0.02 < p["params_fraction"] < 0.98
    ]
    assert inner and all(p["gain_points"] > 0 for p in inner)
    assert r["max_gain_50_65"] is not None and r["max_gain_50_65"] >= 15
    # as gamma rises, left-half digits go to the small module before right-half ones
    assert any(p["left_to_small"] >= 0.5 and p["right_to_small"] < 0.5 for p in r["points"])


def test_early_exits_beat_static_networks():
    from dyngraph.repro import early_exit

    r = early_exit.run()
    for name in ("msdnet_early_exit", "scan_early_exit"):
        rows = {(b["of"], b["budget"]): b for b in r[name]["budgets"]}
        for b in (0.4, 0.5):
            assert rows["backbone", b]["gain_points"] >= 3, (name, b)
        for row in r[name]["budgets"]:
            if row["of"] == "longest_path":
                assert abs(row["test_macs_fraction"] - row["budget"]) <= 0.05 * row["budget"]
        depth = r[name]["mean_exit_depth_by_k"]
        assert depth == sorted(depth)
    assert r["digits"]["full_accuracy"] - r["digits"]["accuracy_at_half"] <= 0.01
    assert r["digits"]["macs_fraction"] <= 0.5


def test_gates_track_difficulty_and_match_static():
    from dyngraph.repro import gates

    r = gates.run()
    for name in ("skipnet_ff", "skipnet_rnn", "blockdrop"):
        g = r[name]
        assert g["spearman_blocks_k"] > 0, name
        assert g["macs_fraction"] <= 0.6 + 0.03, name
        assert g["gain_points"] >= -1.0, name


def test_pondernet_parity():
    from dyngraph.repro import pondernet

    r = pondernet.run()
    assert r["accuracy"] >= 0.9
    assert 1 <= r["mean_steps"] <= 20
