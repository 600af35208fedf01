"""The profiler: exact per-input MACs, reports, named uncounted ops."""

from __future__ import annotations

import json

import pytest
import torch

import dyngraph as dg
from dyngraph.cli import main
from dyngraph.cost import flop_counter
from tests.conftest import SPECS, compiled, random_batch

BY_NAME = {p.stem: p for p in SPECS}


def _alone_macs(model, x: torch.Tensor) -> list[int]:
    """What each input executes alone, less the attention waste its trace reports (a per-token
    exit's later layers: runtime/token_rows.py)."""
    out = []
    for i in range(x.shape[0]):
        with torch.no_grad(), flop_counter() as fc:  # FlopCounterMode + the CPU SDPA handle
            one = model(x[i : i + 1])
        out.append(fc.get_total_flops() // 2 - one.trace.query_padding_macs)
    return out


def test_per_input_macs_equal_each_input_counted_alone(spec_path):
    model = compiled(spec_path, "none")
    x = random_batch(model, 50, seed=5)
    prof = dg.profile(model, x, latency=False, curve=False, counter="torch", batch_size=16)
    assert prof.per_input_macs.tolist() == _alone_macs(model, x)
    s = prof.summary
    assert s["executed_macs"] - s.get("query_padding_macs", 0) == s["ideal_macs"]
    assert s["dispatch_waste"] <= 1.05  # (#16: attention past its keys included)
    assert prof.summary["paths_seen"] >= 2


def test_fvcore_profile_equals_flop_counter_where_both_count_everything():
    model = compiled(BY_NAME["digits_early_exit"], "none")  # linear layers only
    x = random_batch(model, 50, seed=6)
    prof = dg.profile(model, x, latency=False, curve=False)
    assert prof.per_input_macs.tolist() == _alone_macs(model, x)


def test_paths_table_and_summary_add_up():
    model = compiled(BY_NAME["msdnet_early_exit"], "none")
    from dyngraph.data import load_data

    data = load_data("state_tracking", n=300)
    prof = dg.profile(model, data, latency=False)
    assert sum(p.count for p in prof.paths) == 300
    assert prof.summary["mean_macs"] == pytest.approx(float(prof.per_input_macs.double().mean()))
    for p in prof.paths:
        assert p.description.startswith("exit ")
        assert sum(p.units.values()) == p.macs
        assert 0.0 <= p.quality <= 1.0
    assert prof.summary["full_macs"] >= prof.per_input_macs.max()
    assert prof.curve is not None and len(prof.curve["points"]) >= 5
    means = [pt["mean_macs"] for pt in prof.curve["points"]]
    assert means == sorted(means)  # a higher max_prob threshold never exits earlier


def test_report_and_plots_are_written(tmp_path):
    model = compiled(BY_NAME["skipnet_ff"], "none")
    from dyngraph.data import load_data

    prof = dg.profile(model, load_data("state_tracking", n=200), max_paths=3, measure_each=3)
    out = prof.save(tmp_path / "p")
    for f in (
        "profile.json",
        "report.md",
        "macs_hist.png",
        "latency_by_path.png",
        "accuracy_vs_macs.png",
    ):
        assert (out / f).stat().st_size > 0, f
    js = json.loads((out / "profile.json").read_text())
    assert js["schema"] == "dyngraph.profile/1"
    assert len(js["per_input"]["macs"]) == 200
    timed = [p for p in js["paths"] if p["latency_us"] is not None]
    assert 1 <= len(timed) <= 3 and all(p["latency_us"] > 0 for p in timed)
    md = (out / "report.md").read_text()
    for section in ("## Summary", "## Paths", "## Units", "gate threshold"):
        assert section in md


ATTENTION_SPEC = """
dyngraph: 1
name: attention_user_block
input: {shape: [32]}
task: {type: classification, classes: 3}
graph:
  - {type: custom, target: tests.helpers.SelfAttention, kwargs: {tokens: 4}}
  - exit: {head: {type: classifier, classes: 3}, criterion: {type: max_prob, threshold: 0.4}}
  - {type: custom, target: tests.helpers.SelfAttention, kwargs: {tokens: 4}}
  - exit: {head: {type: classifier, classes: 3}}
"""


def test_user_block_fvcore_cannot_count_is_named_and_torch_counts_it():
    torch.manual_seed(0)
    model = dg.compile(ATTENTION_SPEC, backend="none", trust_imports=True).eval()
    x = torch.randn(40, 32)
    fv = dg.profile(model, x, latency=False, curve=False)
    assert any("baddbmm" in w and "counter: torch" in w for w in fv.warnings)
    th = dg.profile(model, x, latency=False, curve=False, counter="torch")
    assert th.warnings == []
    assert th.per_input_macs.tolist() == _alone_macs(model, x)
    assert (th.per_input_macs > fv.per_input_macs).all()  # fvcore missed the score MACs
    assert "baddbmm" in dg.profiler.report.report_md(fv)


def test_cli_profile_writes_a_profile(tmp_path, capsys):
    out = tmp_path / "ee"
    rc = main(
        [
            "profile",
            str(BY_NAME["digits_early_exit"]),
            "--backend",
            "none",
            "--data",
            "digits",
            "--n",
            "120",
            "--no-latency",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean" in text and "executed/ideal MACs of the batched run: 1.0000" in text
    assert (out / "report.md").exists() and (out / "macs_hist.png").exists()
