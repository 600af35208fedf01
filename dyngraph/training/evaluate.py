"""Evaluation on a split: accuracy (or NMSE), mean MACs per input, and how inputs were routed."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..data import Data
from ..runtime.stream import infer_pass
from .measure import by_meta, quality


@torch.no_grad()
def evaluate(
    model,
    data: Data,
    batch_size: int = 512,
    counter: str = "fvcore",
    stream: bool = True,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Infer-mode metrics of `model` on `data`, streamed (`dg.stream`: every stage on full
    batches of `batch_size`) or with `stream=False` in independent batches of `batch_size`;
    `pass`: how the pass ran, its throughput and per-input latency. `max_rows`: the stream's
    bound on rows waiting in its queues (default 16 x batch_size)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    logits, macs, paths = [], [], []
    # constructs with one trace column for the whole graph (exits): how many took each value
    single = [c for c in model._constructs.values() if not c.column.per_node and model.nodes[c.key]]
    taken: dict[str, list] = {c.key: [] for c in single}
    outs, stats = infer_pass(model, data.x.to(device), batch_size, stream, max_rows)
    for out in outs:
        logits.append(out.logits.cpu())
        macs.append(model.per_input_macs(out.trace, counter))
        paths.append(out.trace.path_id.cpu())
        for c in single:
            taken[c.key].append(out.trace.columns[c.column.name].cpu())
    logits, macs = torch.cat(logits), torch.cat(macs)
    path = torch.cat(paths)
    full = model.static_macs(counter)
    res: dict[str, Any] = {
        "inputs": len(data),
        "mean_macs": float(macs.double().mean()),
        "full_macs": full,
        "macs_fraction": float(macs.double().mean()) / full,
        "paths": {model.describe_path(int(p)): c for p, c in Counter(path.tolist()).most_common()},
        "per_input_macs": macs,
        "logits": logits,
        "pass": stats,
    }
    if taken:  # {construct: {value: inputs}}: {"exit": {0: 412, 3: 88}}
        res["taken"] = {
            k: dict(sorted(Counter(torch.cat(v).tolist()).items())) for k, v in taken.items()
        }
    if data.y is not None:
        res["quality"] = quality(model, logits, data.y)
    res["by_meta"] = by_meta(
        data.meta,
        macs,
        None if data.y is None else lambda sel: quality(model, logits[sel], data.y[sel]),
    )
    return res
