"""The command line."""

from __future__ import annotations

import re

from dyngraph.cli import main
from tests.conftest import SPECS

BY_NAME = {p.stem: p for p in SPECS}


def test_inspect_lists_every_exit_with_cumulative_macs(capsys):
    assert main(["inspect", str(BY_NAME["digits_early_exit"])]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"exit (\d): +([\d,]+) MACs", out)
    assert [int(i) for i, _ in rows] == [0, 1, 2, 3]
    macs = [int(m.replace(",", "")) for _, m in rows]
    assert macs == sorted(macs) and len(set(macs)) == 4
    # stem 64x128 + block 2x128x256 + head 128x10 (+ the same per later exit)
    assert macs[0] == 64 * 128 + 2 * 128 * 256 + 128 * 10
    assert macs[1] - macs[0] == 2 * 128 * 256 + 128 * 10
    assert "distinct paths: 4" in out


def test_blocks_lists_the_registry(capsys):
    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    for name in (
        "residual_mlp",
        "ff_gate",
        "rnn_gate",
        "blockdrop_policy",
        "composer_rnn",
        "gru_step",
        "lista_layer",
        "act_unit",
        "stop_mlp",
        "lambda_unit",
    ):
        assert name in out


def test_spec_reference_is_current():
    """docs/spec.md is generated from the schema and registries; regenerate it when they change."""
    from dyngraph.docs import generate
    from tests.conftest import ROOT

    assert (ROOT / "docs" / "spec.md").read_text() == generate(), (
        "run: python -m dyngraph.docs > docs/spec.md"
    )
