"""dyngraph's standalone runner: runs an exported model (`dyngraph export`) with torch alone.

An export is a folder: `manifest.json` (format `dyngraph.export/1`: the plan's steps, the
decision settings, the trace's columns, each unit's MACs) and one `torch.export` program per
unit (`units/*.pt2`, a dynamic batch dimension and, for sequences, a dynamic length), with
`--aot` also its AOTInductor package (`units/*.aoti.pt2`), which the runner then runs. This
file is copied into the folder as `dyngraph_runner.py` and imports nothing but torch, so a
deployment needs neither dyngraph nor its dependencies:

    import sys; sys.path.insert(0, "DIR"); import dyngraph_runner
    model = dyngraph_runner.load("DIR")
    out = model(x)          # out.logits, out.columns, out.unit_counts, out.macs

It runs the plan as dyngraph's infer mode does: rows that leave at an exit are compacted away,
a gated body runs on the rows whose gate is on, each length of a batch of sequences runs as its
own group. Steps it runs: static segments, exits per sample (max_prob, entropy, patience),
gates per sample (feed-forward, recurrent and one-shot policies) and halting per sample (ACT,
PonderNet, Learning to Stop). A damaged or mismatched export (version, missing unit, wrong
shapes) is a one-line `ExportError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FORMAT = "dyngraph.export/1"
RUNNER = "dyngraph_runner.py"


class ExportError(ValueError):
    """A damaged or mismatched export (one line)."""


class Output:
    """What a pass returns: `logits` [B, ...]; the trace, built when first read: `columns`
    (each construct's decisions, as in dyngraph's trace), `unit_counts` [B, U], each input's
    `macs` [B]; `lengths` [B] for sequences."""

    def __init__(self, logits: torch.Tensor, build, lengths: torch.Tensor | None = None):
        self.logits, self.lengths = logits, lengths
        self._build, self._trace = build, None

    def _get(self, i: int):
        self._trace = self._trace or self._build()
        return self._trace[i]

    columns = property(lambda self: self._get(0))
    unit_counts = property(lambda self: self._get(1))
    macs = property(lambda self: self._get(2))


class _Pass:
    """The state of one pass over rows (as dyngraph's RunContext in infer mode). Unit calls
    and decisions are logged with the row map of the time; the trace is built from the log
    when first read."""

    def __init__(self, model: Exported, x: torch.Tensor):
        b = x.shape[0]
        self.m, self.batch, self.rows = model, b, b
        self.idx: torch.Tensor | None = None  # the original row of each current row
        self.env: dict[str, torch.Tensor] = {"input": x}
        self.states: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None
        self.calls: list[tuple] = []  # (unit, row map, positions among its rows or None)
        self.decisions: list[tuple] = []  # (column, node, values, row map, positions)

    def trace(self, macs: torch.Tensor) -> tuple:
        """(columns, unit counts, MACs per input) from the log."""
        b, m = self.batch, self.m
        counts = torch.zeros(b, len(m.units), dtype=torch.long)
        for u, g in ((u, _rows_of(idx, rows)) for u, idx, rows in self.calls):
            if g is None:
                counts[:, u] += 1
            else:
                counts[g.cpu(), u] += 1
        columns = {
            c["name"]: torch.full(
                (b,) if c["width"] is None else (b, c["width"]), c["empty"], dtype=torch.long
            )  # fmt: skip
            for c in m.manifest["columns"]
        }
        for name, col, values, idx, rows in self.decisions:
            g = _rows_of(idx, rows)
            target = columns[name] if col is None else columns[name][:, col]
            v = values.cpu().long() if torch.is_tensor(values) else values
            if g is None:
                target[:] = v
            else:
                target[g.cpu()] = v
        return columns, counts, (counts * macs).sum(1)

    def call(self, u: int, *args: torch.Tensor, rows: torch.Tensor | None = None):
        self.calls.append((u, self.idx, rows))
        return self.m.units[u](*args)

    def record(self, name: str, col: int | None, values, rows: torch.Tensor | None = None):
        self.decisions.append((name, col, values, self.idx, rows))

    def leave(self, out: torch.Tensor, where: int) -> None:
        """Every current row takes `out` (taken at exit `where`); rows that go on are written
        again where they leave."""
        self.record(self.m.out_column, None, where)
        if self.out is None:
            self.out = out.new_zeros((self.batch, *out.shape[1:]))
        if self.idx is None:
            self.out.copy_(out)
        else:
            self.out.index_copy_(0, self.idx, out)

    def keep(self, rows: torch.Tensor, live: list[str]) -> None:
        self.rows = rows.shape[0]
        self.env = {k: v.index_select(0, rows) for k, v in self.env.items() if k in live}
        self.states = {k: v.index_select(0, rows) for k, v in self.states.items()}
        self.idx = rows if self.idx is None else self.idx.index_select(0, rows)


def _rows_of(idx: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """The original rows of positions `rows` among the rows of row map `idx` (None: all)."""
    if rows is None:
        return idx
    return rows if idx is None else idx.index_select(0, rows)


# ------------------------------------------------------------------ the steps


def _segment(p: _Pass, s: dict) -> None:
    outs = p.call(s["unit"], *[p.env[r] for r in s["reads"]])
    for k, v in zip(s["outputs"], outs, strict=True):
        p.env[k] = v


def _stays(p: _Pass, s: dict, z: torch.Tensor) -> torch.Tensor:
    """Which rows go on past a (not last) exit: the criterion of constructs/exit_criteria.py."""
    kind, t = s["criterion"], s["temperature"]
    if kind == "max_prob":
        zt = z if t == 1.0 else z / t
        score = (zt - zt.amax(dim=1, keepdim=True)).exp().sum(dim=1).reciprocal()
        return score < s["threshold"]
    if kind == "entropy":
        q = torch.softmax(z if t == 1.0 else z / t, dim=1)
        return -(q * torch.log(q.clamp_min(1e-12))).sum(dim=1) > s["threshold"]
    pred = z.argmax(dim=1)  # patience (PABEE)
    prev, count = p.states.get("exit/pred"), p.states.get("exit/count")
    count = torch.zeros_like(pred) if prev is None else torch.where(pred == prev, count + 1, 0)
    p.states["exit/pred"], p.states["exit/count"] = pred, count
    return count < s["patience"]


def _exit(p: _Pass, s: dict) -> None:
    z = p.call(s["head"], p.env[s["reads"][0]])
    stay = z.new_zeros(0, dtype=torch.long) if s["last"] else torch.where(_stays(p, s, z))[0]
    if stay.shape[0] == p.rows:  # nobody leaves here
        return
    p.leave(z, s["index"])  # (rows that stay are written again where they leave)
    if stay.shape[0]:
        p.keep(stay, s["live_after"])
    else:
        p.rows = 0


def _gate(p: _Pass, s: dict) -> None:
    x = p.env[s["reads"][0]]
    if s["style"] == "ff":
        prob = p.call(s["policy"], x)
    elif s["style"] == "recurrent":
        h = p.states.get(s["key"])
        if h is None:
            h = x.new_zeros((x.shape[0], *s["state_shape"]))
        prob, p.states[s["key"]] = p.call(s["policy"], x, h)
    else:  # one-shot: the policy runs once, at its first gate
        if s["column"] == 0:
            p.states[s["key"]] = p.call(s["policy"], p.env[s["reads"][1]])
        prob = p.states[s["key"]][:, s["column"]]
    on = prob >= s["threshold"]
    p.record("gates", s["index"], on)
    run = torch.where(on)[0]
    if run.shape[0] == x.shape[0]:
        y = p.call(s["body"], x)
    elif run.shape[0] == 0:
        y = x
    else:
        y = x.clone().index_copy_(0, run, p.call(s["body"], x.index_select(0, run), rows=run))
    p.env[s["writes"]] = y


def _halting(p: _Pass, s: dict) -> None:
    """A step applied until each row halts (constructs/halting.py's infer loop): ACT's
    halting sum, PonderNet's probability of having halted, or L2S's stop policy; halted rows
    leave the loop, their output (ACT: the halting-weighted mean of the states) written once."""
    x = p.env[s["reads"][0]]
    n, rule, last = x.shape[0], s["rule"], s["max_steps"] - 1
    init = s["init"]
    h = p.call(init, x) if init is not None else x.new_zeros((n, *s["state_shape"]))
    out, steps = torch.empty_like(h), torch.empty(n, dtype=torch.long)
    carry = x.new_ones(n) if rule == "pondernet" else x.new_zeros(n)
    acc = torch.zeros_like(h) if rule == "act" else None
    pos, xa = None, x  # the rows still in the loop (positions among the pass's rows)
    for t in range(s["max_steps"]):
        unit = s["steps"][t if len(s["steps"]) > 1 else 0]
        flag = [xa.new_full((xa.shape[0], 1), 1.0 if t == 0 else 0.0)] if s["flag"] else []
        prev, h = h, p.call(unit, h, xa, *flag, rows=pos)
        if rule == "act":
            q = p.call(s["unit"], h, rows=pos)
            new_carry = carry + q
            halt = new_carry >= 1 - s["epsilon"]
        elif rule == "l2s":
            onehot = xa.new_zeros((xa.shape[0], s["max_steps"]))
            onehot[:, t] = 1.0
            q = p.call(s["unit"], xa, h, prev, onehot, rows=pos)
            halt, new_carry = q >= s["threshold"], carry
        else:  # pondernet
            q = p.call(s["unit"], h, rows=pos)
            new_carry = carry * (1 - q)
            halt = 1 - new_carry >= s["threshold"]
        if t == last:
            halt = torch.ones_like(halt)
        if acc is not None:
            w = torch.where(halt, 1 - carry, q)
            acc = torch.addcmul(acc, w.view(-1, *([1] * (h.dim() - 1))), h)
        res = acc if acc is not None else h
        going = torch.where(halt)[0]
        if going.shape[0]:
            rows = going if pos is None else pos.index_select(0, going)
            out.index_copy_(0, rows, res.index_select(0, going))
            steps.index_fill_(0, rows, t + 1)
            stay = torch.where(~halt)[0]
            if stay.shape[0] == 0:
                break
            pos = stay if pos is None else pos.index_select(0, stay)
            h, xa, new_carry = h[stay], xa[stay], new_carry[stay]
            acc = None if acc is None else acc[stay]
        carry = new_carry
    p.record("steps", s["index"], steps)
    p.env[s["writes"]] = out


STEPS = {"segment": _segment, "exit": _exit, "gate": _gate, "halting": _halting}


# ------------------------------------------------------------------ the model


class Exported:
    """An exported model: `model(x)` runs it (module doc); `set_threshold` as dyngraph's."""

    def __init__(self, root: Path, manifest: dict, units: list[Any]):
        self.root, self.manifest, self.units = root, manifest, units
        self.out_column = manifest["out_column"]
        self.unit_macs = torch.tensor(manifest["unit_macs"], dtype=torch.long)
        self.macs_by_length = manifest.get("unit_macs_by_length")
        inp = manifest["input"]
        self.ids = inp["dtype"] == "int64"
        self.sequence, self.pad_id = inp["sequence"], inp.get("pad_id")

    def set_threshold(self, value: float | list[float], kind: str = "exit") -> None:
        """Set the thresholds of the exits (or `kind="gate"`): one value, or one per node
        that has one."""
        nodes = [s for s in self.manifest["steps"] if s["kind"] == kind and s.get("threshold")
                 is not None and not s.get("last")]  # fmt: skip
        values = value if isinstance(value, list | tuple) else [value] * len(nodes)
        if len(values) != len(nodes):
            raise ValueError(f"{len(values)} thresholds for {len(nodes)} {kind} nodes")
        for s, v in zip(nodes, values, strict=True):
            s["threshold"] = float(v)

    def single(self):
        """The batch-1 one-graph program (decisions in torch.cond): `program(x)` returns
        (logits, decisions); an ExportError says why the export has none."""
        info = self.manifest.get("single_graph", {})
        if "file" not in info:
            raise ExportError(f"{self.root}: no one-graph program: {info.get('why', 'not made')}")
        return torch.export.load(str(self.root / info["file"])).module()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Output:
        x = self._checked(x)
        if not self.sequence:
            return self._pass(x, self.unit_macs)
        lengths = self._lengths(x)
        full = x.shape[1]
        parts, order = [], []
        for n in sorted(set(lengths.tolist())):
            rows = torch.where(lengths == n)[0]
            macs = torch.tensor(self.macs_by_length[n], dtype=torch.long)
            parts.append(self._pass(x.index_select(0, rows)[:, :n], macs))
            order.append(rows)
        back = torch.argsort(torch.cat(order))
        logits = [o.logits for o in parts]
        if logits[0].dim() >= 3:  # per-token outputs: padded positions hold zeros
            pad = [0, 0] * (logits[0].dim() - 2)
            logits = [torch.nn.functional.pad(z, [*pad, 0, full - z.shape[1]]) for z in logits]

        def build():
            cols = {k: torch.cat([o.columns[k] for o in parts])[back] for k in parts[0].columns}
            counts = torch.cat([o.unit_counts for o in parts])[back]
            return cols, counts, torch.cat([o.macs for o in parts])[back]

        return Output(torch.cat(logits).index_select(0, back), build, lengths)

    def _pass(self, x: torch.Tensor, macs: torch.Tensor) -> Output:
        p = _Pass(self, x)
        for s in self.manifest["steps"]:
            if not p.rows:
                break
            STEPS[s["kind"]](p, s)
        out = p.out if p.out is not None else p.env[self.manifest["output_id"]]
        return Output(out, lambda: p.trace(macs))

    def _checked(self, x: Any) -> torch.Tensor:
        shape = tuple(self.manifest["input"]["shape"])
        if not torch.is_tensor(x):
            raise TypeError(
                f"expected a tensor [B, {', '.join(map(str, shape))}], got {type(x).__name__}"
            )
        if tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"expected input [B, {', '.join(map(str, shape))}], got {list(x.shape)}"
            )
        if self.ids:
            if x.is_floating_point():
                raise TypeError(f"expected token ids (an integer tensor), got {x.dtype}")
            return x.long()
        return x.float() if x.dtype != torch.float32 else x

    def _lengths(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_id is None:
            return torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        real = x != self.pad_id
        n = real.sum(1)
        inside = (real & (torch.arange(x.shape[1]) >= n[:, None])).any(1)
        if bool(inside.any()) or bool((n == 0).any()):
            raise ValueError(f"pad with id {self.pad_id} at the end only; every row needs a token")
        return n


def load(path: str | Path) -> Exported:
    """The export in folder `path` (one-line `ExportError` where it is damaged)."""
    root = Path(path)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{root}: no manifest.json (not a dyngraph export)") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{root}/manifest.json is damaged: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(
            f"{root}: format {manifest.get('format')!r}; this runner reads {FORMAT!r}"
        )
    unknown = {s["kind"] for s in manifest["steps"]} - set(STEPS)
    if unknown:
        raise ExportError(f"{root}: steps of kind {sorted(unknown)} are not known to this runner")
    units = []
    for u in manifest["units"]:
        f = root / u["file"]
        if not f.exists():
            raise ExportError(f"{root}: unit {u['index']} ({u['name']}) is missing: {u['file']}")
        try:
            ep = torch.export.load(str(f))
        except Exception as e:  # a damaged program: any of torch's load errors
            raise ExportError(f"{f}: cannot load the program ({type(e).__name__})") from None
        _check_shapes(ep, u, root)
        units.append(_runnable(ep, u, root))
    return Exported(root, manifest, units)


def _runnable(ep, u: dict, root: Path):
    """The unit as a callable: its AOTInductor package where the export has one (`--aot`),
    else the program's module's forward (no input guards or hooks: the runner checks the
    model's input, and every unit gets what the compiled model gave it)."""
    if u.get("aoti") is None:  # (its forward: the module's call hooks cost 2x the ops here)
        return ep.module(check_guards=False).forward
    f = root / u["aoti"]
    if not f.exists():
        raise ExportError(f"{root}: unit {u['index']} ({u['name']}) is missing: {u['aoti']}")
    try:
        return torch._inductor.aoti_load_package(str(f))
    except Exception as e:  # a damaged package, or one built for another machine
        raise ExportError(f"{f}: cannot load the compiled package ({type(e).__name__})") from None


def _check_shapes(ep, u: dict, root: Path) -> None:
    """The program takes the inputs the manifest says (its static dimensions after the
    batch; a sequence's length is dynamic)."""
    names = set(ep.graph_signature.user_inputs)
    got = [list(n.meta["val"].shape[1:]) for n in ep.graph.nodes
           if n.op == "placeholder" and n.name in names]  # fmt: skip
    shown = [[a if isinstance(a, int) else "L" for a in g] for g in got]  # (L: dynamic)
    want = u["in_shapes"]
    if len(got) != len(want) or any(
        len(g) != len(w) or any(a not in ("L", b) for a, b in zip(g, w, strict=True))
        for g, w in zip(shown, want, strict=True)
    ):
        msg = f"unit {u['index']} ({u['name']}) takes inputs {shown}; the manifest says {want}"
        raise ExportError(f"{root}: {msg}")
