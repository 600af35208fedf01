"""Does a refactor change behaviour? Every spec, at an earlier commit and now, on fixed inputs.

    python -m tests.same_behaviour 05b3349     # about 2 minutes

For every spec in specs/ (the earlier commit's copy for it, this tree's for now): the same
seed-0 model with every floating parameter redrawn from a generator seeded by its name (so
that decisions vary), a few exit thresholds moved into the range of the confidences, and one
fixed batch of 37 inputs through infer mode (generated and interpreted), dense and train mode.
Recorded: logits, every trace column (decisions), unit counts, per-input MACs, path ids and
path texts, train/dense extras, and for every training stage the loss terms and the squared
gradient norm of a train-mode pass. Both sides run in their own process; the answer is the
list of every difference (none: the refactor kept behaviour bit for bit).
"""

from __future__ import annotations

import argparse
import glob
import inspect
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = {"digits": 0.99, "msdnet": 0.38, "scan": 1.5}  # near the untrained confidences


def _flat(v, pre: str, out: dict) -> None:
    if torch.is_tensor(v):
        out[pre] = v.detach().clone()
    elif isinstance(v, dict):
        for k in sorted(v):
            _flat(v[k], f"{pre}.{k}", out)
    elif isinstance(v, list | tuple):
        for i, e in enumerate(v):
            _flat(e, f"{pre}[{i}]", out)
    elif isinstance(v, int | float | bool | str) or v is None:
        out[pre] = v


def record(path: str) -> None:
    """Run every spec of the current directory's specs/ with the importable dyngraph."""
    import dyngraph as dg
    from dyngraph.training.loss import compute_loss

    torch.set_num_threads(1)
    by_stage = "stage" in inspect.signature(compute_loss).parameters  # (not before 14)
    res = {}
    for p in sorted(glob.glob("specs/*.yaml")):
        torch.manual_seed(0)
        m = dg.compile(p, backend="none")
        with torch.no_grad():
            for name, t in sorted(m.state_dict().items()):
                if t.is_floating_point():
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    scale = 1.5 / max(1, t.shape[-1]) ** 0.5 if t.dim() > 1 else 0.3
                    t.copy_(torch.randn(t.shape, generator=g) * scale)
        for k, v in THRESHOLDS.items():
            if k in p:
                m.set_threshold(v, "exit")
        g = torch.Generator().manual_seed(7)
        x = 2 * torch.randn(37, *m.spec.input.shape, generator=g)
        d: dict = {}
        for mode in ("infer", "interpreted", "dense", "train"):
            torch.manual_seed(11)
            m.codegen = mode != "interpreted"
            run = {"interpreted": "infer"}.get(mode, mode)
            out = m.train()(x, mode=run) if mode == "train" else m.eval()(x, mode=run)
            m.codegen = True
            tr = out.trace
            for what, v in (
                ("logits", out.logits),
                ("decisions", tr.decisions()),
                ("unit_counts", tr.unit_counts),
                ("macs", m.per_input_macs(tr)),
                ("path_id", tr.path_id),
            ):
                _flat(v, f"{mode}.{what}", d)
            d[f"{mode}.paths"] = [m.describe_path(i) for i in range(len(m.paths.rows))]
            if mode in ("dense", "train"):
                _flat(dict(out.extras), f"{mode}.extras", d)
        if m.spec.train is not None:
            y = (
                torch.arange(37) % m.spec.task.classes
                if m.spec.task.type == "classification"
                else torch.randn(out.logits.shape, generator=g)
            )
            for si, st in enumerate(m.spec.train.stages):
                torch.manual_seed(12)
                o = m.train()(x, mode="train")
                total, terms = compute_loss(m, o, x, y, st if by_stage else st.objective)
                m.zero_grad()
                total.backward()
                d[f"stage{si}.terms"] = terms
                grads = [p.grad.double().pow(2).sum() for p in m.parameters() if p.grad is not None]
                d[f"stage{si}.grad"] = float(sum(grads))
        res[p] = d
    torch.save(res, path)


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for spec in sorted(set(a) | set(b)):
        da, db = a.get(spec, {}), b.get(spec, {})
        out += [f"{spec}: {k} only on one side" for k in sorted(set(da) ^ set(db))]
        for k in sorted(set(da) & set(db)):
            va, vb = da[k], db[k]
            same = (
                torch.is_tensor(vb) and va.dtype == vb.dtype and torch.equal(va, vb)
                if torch.is_tensor(va)
                else va == vb
            )
            if not same:
                out.append(f"{spec}: {k} differs")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("commit", help="the earlier commit")
    ap.add_argument("--record", help=argparse.SUPPRESS)  # (a side's own process)
    args = ap.parse_args()
    if args.record:
        record(args.record)
        return
    then = Path(tempfile.mkdtemp(prefix="same_behaviour_"))
    tar = subprocess.run(
        ["git", "archive", args.commit, "dyngraph", "specs"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    tarfile.open(fileobj=BytesIO(tar)).extractall(then, filter="data")
    me = [sys.executable, str(Path(__file__).resolve()), args.commit, "--record"]
    for where, out in ((then, then / "then.pt"), (ROOT, then / "now.pt")):
        env = {**os.environ, "PYTHONPATH": str(where)}
        subprocess.run([*me, str(out)], cwd=where, env=env, check=True)
    diffs = _differences(torch.load(then / "then.pt"), torch.load(then / "now.pt"))
    n = len(torch.load(then / "now.pt"))
    print("\n".join(diffs) or f"no difference: {n} specs, every value bit for bit")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
