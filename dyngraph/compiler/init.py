"""Blocks initialized from a checkpoint: `init: {checkpoint: FILE, prefix: ...}`.

On a block, its weights are the checkpoint's tensors under `prefix` (`{name}` stands for the
block's own dotted name, so `prefix: "blocks.{name}"` takes the same-named block of a network
with the same layout). A stage's `trainable:` then freezes it, so that exits or gates are
trained onto a trained static network. The checkpoint is a dyngraph checkpoint (its `model`)
or a plain state dict; a relative path is read from the spec's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

_READ: dict[str, dict[str, torch.Tensor]] = {}


def _weights(file: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (read once per build), or a ValueError in one line."""
    if file not in _READ:
        p = Path(file)
        if not p.is_file():
            raise ValueError(f"checkpoint {file}: no such file")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(
                f"checkpoint {file}: not a file of torch.save holding tensors"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {file}: expected a state dict")
        _READ.clear()  # one file at a time: a build reads few, and they may be large
        _READ[file] = {k: v for k, v in state.items() if torch.is_tensor(v)}
    return _READ[file]


def initialize(module: nn.Module, init: Any, name: str, spec_file: str) -> None:
    """Load `init`'s tensors into `module`; a ValueError in one line when they do not fit."""
    file = init.checkpoint
    if not Path(file).is_absolute() and spec_file not in ("", "<string>"):
        file = str(Path(spec_file).parent / file)
    weights = _weights(file)
    prefix = init.prefix.replace("{name}", name)
    prefix = prefix + "." if prefix and not prefix.endswith(".") else prefix
    picked = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f"checkpoint {init.checkpoint}: no tensors under '{prefix}'")
    own = module.state_dict()
    missing = sorted(set(own) - set(picked))
    extra = sorted(set(picked) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ValueError(f"checkpoint {init.checkpoint} under '{prefix}' does not fit: {what}")
    for k, v in picked.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"checkpoint {init.checkpoint}: '{prefix}{k}' is {list(v.shape)}, "
                f"the block's is {list(own[k].shape)}"
            )
    if next(iter(own.values())).is_meta:  # validation: shapes only
        return
    module.load_state_dict(picked)
