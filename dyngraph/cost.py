"""Static MACs of one unit at batch 1, by fvcore or by torch's FlopCounterMode.

Convention: one multiply-add = 1 MAC (fvcore's). FlopCounterMode counts 2 x MACs, so its
count is halved. Units are static graphs, so a count at batch 1 is exact, and a sample's MACs
are the sum over the units it executed.

Neither counter knows every op: fvcore skips ops it has no handle for (it names them), and
FlopCounterMode silently ignores ops outside its registry. `count_unit` names every op that
carries multiply-adds and that the chosen counter did not count, so that no cost is silently
zero.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

COUNTERS = ("fvcore", "torch")

#: aten ops that carry multiply-adds (elementwise ops count 0 by convention).
MAC_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "matmul",
        "linear",
        "mv",
        "addmv",
        "dot",
        "vdot",
        "addr",
        "outer",
        "ger",
        "einsum",
        "tensordot",
        "bilinear",
        "_trilinear",
        "kron",
        "cdist",
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "_scaled_mm",
        "chain_matmul",
        "linalg_multi_dot",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "lstm",
        "gru",
        "rnn_tanh",
        "rnn_relu",
        "lstm_cell",
        "gru_cell",
        "rnn_tanh_cell",
        "rnn_relu_cell",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
    }
)


def attention_macs(q_shape, k_shape, v_shape, causal: bool) -> int:
    """MACs of scaled dot-product attention, counted per query row over the keys it reads:
    QK^T and the weighted sum of V, (d_q + d_v) per (query, key) pair read. Without a causal
    mask every query reads every key: FlopCounterMode's SDPA formula (halved). With one
    (top-left aligned, as SDPA's `is_causal`), query i reads keys 0..i."""
    b, h, sq, dq = q_shape[0], q_shape[1], q_shape[-2], q_shape[-1]
    sk, dv = k_shape[-2], v_shape[-1]
    if causal:
        m = min(sq, sk)
        pairs = m * (m + 1) // 2 + (sq - m) * sk
    else:
        pairs = sq * sk
    return b * h * pairs * (dq + dv)


def _sdpa_cpu_flops(query, key, value, dropout_p=0.0, is_causal=False, *a, out_shape=None, **kw):
    # FlopCounterMode hands shapes; it counts flops (2 x MACs)
    return 2 * attention_macs(query, key, value, bool(is_causal))


def _sdpa_fvcore(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    causal = inputs[5].toIValue() if len(inputs) > 5 else False
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    return attention_macs(q, k, v, bool(causal))


#: Cost handles the counters lack (fvcore's op handles; FlopCounterMode's custom mapping):
#: attention on the CPU, where FlopCounterMode counts 0 for the kernel SDPA runs.
FVCORE_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_fvcore}
TORCH_HANDLES = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def _rows_attention_flops(q, kv, pos, offsets, heads, block, causal, out_val=None) -> int:
    # the pairs the kernel computes (runtime/attention.cpp), (d_q + d_v) per pair and head
    from .blocks.sequence import blocked_pairs

    return 2 * blocked_pairs(pos, offsets, kv.shape[1], causal, block) * 2 * q.shape[1]


_rows_attention_flops._get_raw = True  # (FlopCounterMode hands it the tensors, not shapes)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode with dyngraph's handles (it counts 2 x MACs), the running tokens'
    attention kernel's among them where it is built (`torch.ops.dyngraph.rows_attention`)."""
    handles = dict(TORCH_HANDLES)
    if hasattr(torch.ops.dyngraph, "rows_attention"):
        handles[torch.ops.dyngraph.rows_attention] = _rows_attention_flops
    return FlopCounterMode(display=False, custom_mapping=handles)


_TORCH_COUNTED = frozenset(k.__name__ for k in flop_registry) | {k.__name__ for k in TORCH_HANDLES}


@dataclass
class UnitCost:
    """The static cost of one unit for one sample."""

    macs: int
    by_module: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)  # MAC-carrying ops the counter missed


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def torch_macs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """MACs by FlopCounterMode (matmul, conv, attention only) / 2."""
    with torch.no_grad(), flop_counter() as fc:
        module(*inputs)
    return fc.get_total_flops() // 2


def fvcore_macs(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[int, dict[str, int]]:
    """MACs by fvcore's jit-traced count, and the ops it could not count (name -> occurrences)."""
    return _fvcore(module, inputs)[:2]


def _fvcore(module, inputs):
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs).set_op_handle(**FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = int(fca.total())
        by_module = {k: int(v) for k, v in fca.by_module().items() if k and "." not in k}
        return total, dict(fca.unsupported_ops()), by_module


class _FrozenRows(torch.nn.Module):
    """A block's `forward_rows` on one token that does not run (its keys and values only)."""

    def __init__(self, block: torch.nn.Module, device):
        super().__init__()
        from .blocks.sequence import query_grid

        self.block = block
        self.grid = query_grid(torch.zeros(1, 1, dtype=torch.bool, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.forward_rows(x, self.grid)


def rows_macs(block: torch.nn.Module, counter: str = "fvcore") -> int:
    """The MACs one frozen token costs `block` run with partial queries (a per-token exit's
    later layers): its keys and values, what `forward_rows` computes for every token."""
    w = next(block.parameters())
    probe = _FrozenRows(block, w.device)
    x = torch.randn(1, 1, block.dim, device=w.device, dtype=w.dtype)
    was = block.training
    block.eval()
    try:
        return fvcore_macs(probe, (x,))[0] if counter == "fvcore" else torch_macs(probe, (x,))
    finally:
        block.train(was)


def count_unit(unit, counter: str = "fvcore", inputs: tuple | None = None) -> UnitCost:
    """Static cost of `unit` for one sample (`inputs` at batch 1, by default random ones of
    its recorded shapes), by submodule under readable names where the unit has them (a
    segment's `labels`)."""
    cost = _count(unit, counter, inputs)
    labels = getattr(unit.module, "labels", None)
    if labels:
        cost.by_module = {labels.get(k, k): v for k, v in cost.by_module.items()}
    return cost


def _count(unit, counter: str, inputs: tuple | None = None) -> UnitCost:
    if counter not in COUNTERS:
        raise ValueError(f"unknown counter {counter!r}; expected one of {COUNTERS}")
    module = unit.module
    # each submodule's own flag: a segment's GraphModule is not a child of the model, so its
    # flag can differ from its blocks' (module.train(was) would put the model's BatchNorms in
    # training mode)
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if inputs is None:
            inputs = unit.example_inputs(1, device)
        if counter == "fvcore":
            total, unsupported, by_module = _fvcore(module, inputs)
            missed = sorted(
                op.removeprefix("aten::")
                for op in unsupported
                if op.removeprefix("aten::") in MAC_OPS
            )
            return UnitCost(total, by_module, missed)
        rec = _OpRecorder()
        with torch.no_grad(), flop_counter() as fc, rec:
            module(*inputs)
        root = type(module).__name__
        by_module = {
            k[len(root) + 1 :]: sum(v.values()) // 2
            for k, v in fc.get_flop_counts().items()
            if k.startswith(root + ".") and "." not in k[len(root) + 1 :]
        }
        missed = sorted(op for op in rec.ops if op in MAC_OPS and op not in _TORCH_COUNTED)
        return UnitCost(fc.get_total_flops() // 2, by_module, missed)
    finally:
        for m, flag in flags:
            m.training = flag


def unit_macs(unit, counter: str = "fvcore") -> int:
    """Static MACs of `unit` for one sample."""
    return count_unit(unit, counter).macs
