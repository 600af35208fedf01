"""Static MACs of one unit at batch 1, by fvcore or by torch's FlopCounterMode.

Convention: one multiply-add = 1 MAC (fvcore's). FlopCounterMode counts 2 x MACs, so its
count is halved. Units are static graphs, so a count at batch 1 is exact, and a sample's
MACs are the sum over the units it executed.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

COUNTERS = ("fvcore", "torch")


def torch_macs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """MACs by FlopCounterMode (matmul, conv, attention only) / 2."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*inputs)
    return fc.get_total_flops() // 2


def fvcore_macs(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[int, dict[str, int]]:
    """MACs by fvcore's jit-traced count, and the ops it could not count (name -> occurrences)."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = int(fca.total())
        return total, dict(fca.unsupported_ops())


def unit_macs(unit, counter: str = "fvcore") -> int:
    """Static MACs of `unit` for one sample."""
    if counter not in COUNTERS:
        raise ValueError(f"unknown counter {counter!r}; expected one of {COUNTERS}")
    was_training = unit.module.training
    unit.module.eval()
    try:
        device = next((p.device for p in unit.module.parameters()), torch.device("cpu"))
        inputs = unit.example_inputs(1, device)
        if counter == "torch":
            return torch_macs(unit.module, inputs)
        return fvcore_macs(unit.module, inputs)[0]
    finally:
        unit.module.train(was_training)
