"""A metalayer's test-time setting: the preference values gamma its controller is fed
(`model.set_gamma`), saved in checkpoints, swept for the accuracy-versus-MACs curve and
written into an export's manifest."""

from __future__ import annotations

import math

from ..runtime.model import checked_setting
from .api import Sweep


def set_gamma(
    metalayers: list, value: float, preference: str | None = None, controller: str | None = None
) -> None:
    """Set the test-time preference value gamma of the controllers (`model.set_gamma`)."""
    value = checked_setting(value, 0.0, math.inf, "gamma")
    found = False
    for m in metalayers:
        if controller is not None and m.ctl_name != controller:
            continue
        for pref in m.ctl.preferences:
            if preference is None or pref == preference:
                m.gamma_test[pref] = float(value)
                found = True
    if not found:
        raise ValueError(f"no preference {preference!r} on controller {controller!r}")


def gamma_values(m) -> list[float]:
    """The values a metalayer's controller is fed at test time, in its preferences' order."""
    return [float(m.gamma_test.get(k, p.gamma.test)) for k, p in m.ctl.preferences.items()]


def save(metalayers: list) -> dict:
    return {m.key: dict(m.gamma_test) for m in metalayers if m.gamma_test}


def load(metalayers: list, values: dict) -> None:
    for m in metalayers:
        m.gamma_test.clear()
    for m in metalayers:
        m.gamma_test.update(values.get(m.key, {}))


GAMMAS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0]


def sweep(model, metalayers: list) -> Sweep:
    saved = save(metalayers)
    return Sweep(
        "gamma", GAMMAS, lambda v: set_gamma(metalayers, v), lambda: load(metalayers, saved)
    )
