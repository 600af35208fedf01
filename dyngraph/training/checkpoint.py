"""Checkpoints: atomic writes, safe loads (weights_only), and the architecture they fit.

Every checkpoint dyngraph writes records its spec's name and an architecture fingerprint: a
hash of the compiled model's structure (every unit's modules and code, and the generated infer
function that wires them), which decision settings (thresholds, gamma) and training settings do
not change. A checkpoint of another model is refused by name even where its tensors happen to
have the same shapes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ..compiler.names import leaves, rename_legacy


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or of another model (one line, for the command line)."""


def fingerprint(model) -> str:
    """A short hash of a compiled model's architecture (see the module's docstring)."""
    parts = [model.source()]
    for u in model.units:
        parts += [u.name, u.kind, repr(u.module), str(getattr(u.module, "code", ""))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def model_state(model, **extra: Any) -> dict:
    """What a checkpoint of `model` holds: weights, decision settings, spec name, fingerprint."""
    return {
        "model": model.state_dict(),
        "settings": model.decision_settings(),
        "spec": model.name,
        "arch": fingerprint(model),
        **extra,
    }


def save_atomic(obj: dict, path: Path) -> None:
    """Write `obj` so that `path` always holds a whole checkpoint, even if killed mid-write."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> Any:
    """A checkpoint's contents, or a CheckpointError saying in one line what is wrong."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p}: is a folder, not a checkpoint file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds: each is a damaged file here
        reason = (
            "not a file of torch.save holding tensors"
            if "Weights only load failed" in str(e) or "pickle" in type(e).__name__.lower()
            else (str(e).strip().split(".")[0][:100] or type(e).__name__)
        )
        raise CheckpointError(
            f"checkpoint {p}: unreadable ({reason}); damaged or truncated?"
        ) from None


def check_fits(state: Any, model, path: str | Path) -> dict:
    """The weights of `state` for `model`, or a CheckpointError naming both models."""
    if isinstance(state, dict) and "model" in state:
        arch, name = state.get("arch"), state.get("spec", "?")
        own = fingerprint(model)
        if arch is not None and arch != own:
            raise CheckpointError(
                f"checkpoint {path} is of spec '{name}' (architecture {arch}), not of "
                f"'{model.name}' (architecture {own})"
            )
        weights = state["model"]
    else:
        weights = state
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise CheckpointError(f"checkpoint {path}: holds no state dict of tensors")
    own = model.state_dict()
    # written before the readable block names (the architecture hash does not see names)
    renamed = rename_legacy(weights, model._plan.legacy_names)
    if renamed.keys() != weights.keys() and renamed.keys() == own.keys():
        weights = renamed
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or extra or shapes:
        first = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"{shapes[0]} has shape {list(weights[shapes[0]].shape)}, the model {list(own[shapes[0]].shape)}"
        )
        n = len(missing) + len(extra) + len(shapes)
        raise CheckpointError(
            f"checkpoint {path} does not fit '{model.name}': {first}"
            + (f" (and {n - 1} more differences)" if n > 1 else "")
        )
    return weights


def refuse_old_order(state: dict, model, path: str | Path) -> None:
    """Refuse to resume from a checkpoint whose optimizer state lists the parameters in another
    order than `model` does: one written before the readable block names, of a spec whose named
    modules are now registered apart from the graph's blocks."""
    legacy = model._plan.legacy_names
    if not any(k.split(".")[1] in legacy for k in state["model"] if k.startswith("blocks.")):
        return
    if list(legacy.values()) != [n for n, _ in leaves(model.blocks)]:
        raise CheckpointError(
            f"checkpoint {path}: written before the readable parameter names, with the "
            "parameters in another order, so its optimizer state cannot be resumed; its "
            "weights still load (dg.load, --checkpoint): start the training run again"
        )


def load_into(model, path: str | Path) -> dict | None:
    """Load weights (and calibrated decision settings) saved by `dyngraph train` or
    `dyngraph calibrate`, or a plain state dict, into `model`; return the checkpoint's dict."""
    state = load(path)
    model.load_state_dict(check_fits(state, model, path))
    if isinstance(state, dict) and "settings" in state:
        try:
            model.load_decision_settings(state["settings"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: damaged decision settings ({e})") from None
    return state if isinstance(state, dict) else None
