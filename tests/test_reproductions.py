"""The slow tier: each seed system's headline experiment, reproduced over seeds (minutes each).

    make test-slow      (python -m pytest -m slow)

The selected reproductions run together, every (reproduction, seed) pair in one pool of
processes (`python -m dyngraph.repro NAME...` does the same and also rewrites
docs/repro/NAME.json and .png); each test checks its claims, which are stated on the seed means
(see dyngraph/repro/common.py). Static baselines are cached in docs/repro/static_baselines.json;
delete it to retrain them.
"""

from __future__ import annotations

import pytest

from dyngraph.repro.common import NAMES, reproduce_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(request) -> dict[str, dict]:
    wanted = [n for n in NAMES if any(f"[{n}]" in item.name for item in request.session.items)]
    return reproduce_all(wanted)


@pytest.mark.parametrize("name", NAMES)
def test_claims_hold_over_seeds(results, name):
    failed = [
        f"{c['claim']}: {c['measured']}" for c in results[name]["claims"].values() if not c["holds"]
    ]
    assert not failed, "\n".join(failed)
