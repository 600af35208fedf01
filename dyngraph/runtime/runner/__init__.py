"""dyngraph's standalone runner: runs an exported model (`dyngraph export`) with torch alone.

An export is a folder: `manifest.json` (format `dyngraph.export/1`: the plan's steps, the
decision settings, the trace's columns, each unit's MACs) and one `torch.export` program per
unit (`units/*.pt2`, a dynamic batch dimension and, for sequences, a dynamic length), with
`--aot` also its AOTInductor package (`units/*.aoti.pt2`), which the runner then runs. This
package (`__init__`, `state`, `steps`, `tokens` and `fused`) is copied into the folder as
`dyngraph_runner/` and imports nothing but torch, so a deployment needs neither dyngraph nor
its dependencies (with it, the fused decision kernels as the exporting machine built them,
which fused.py loads where the machine, Python and torch match, as `--aot` packages are
machine code):

    import sys; sys.path.insert(0, "DIR"); import dyngraph_runner
    model = dyngraph_runner.load("DIR")
    out = model(x)          # out.logits, out.columns, out.unit_counts, out.macs

It runs the plan as dyngraph's infer mode does: rows that leave at an exit are compacted away,
a gated body runs on the rows whose gate is on, each length of a batch of sequences runs as its
own group. Steps it runs (steps.py): static segments, exits per sample (max_prob, entropy,
patience), gates per sample (feed-forward, recurrent and one-shot policies), halting per
sample (ACT, PonderNet, Learning to Stop; also through time), metalayers (Composer, per
sample or per token; `set_gamma`) and Mixture-of-Depths gates (per token, by capacity,
threshold or, decoding, the causal predictor: `set_decode`); and in tokens.py per-token exits
(CALM: max_prob, entropy, a learned stop unit) and halting over depth per position (Universal
Transformer). A damaged or mismatched export (version, missing unit, wrong shapes) is a
one-line `ExportError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import fused
from .state import Pass
from .steps import STEPS as _STEPS
from .tokens import TOKEN_STEPS

FORMAT = "dyngraph.export/1"
RUNNER = "dyngraph_runner"  # (the package's folder in an export)
FILES = ("__init__.py", "state.py", "steps.py", "tokens.py", "fused.py")  # (what an export copies)
STEPS = {**_STEPS, **TOKEN_STEPS}


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


class Exported:
    """An exported model: `model(x)` runs it (module doc); `set_threshold` as dyngraph's."""

    def __init__(self, root: Path, manifest: dict, units: list[Any], rows: dict | None = None):
        self.root, self.manifest, self.units = root, manifest, units
        self.rows = rows or {}  # {unit: its partial-queries program} (runner/tokens.py)
        self.token_shares: dict[tuple[int, int], tuple] = {}  # (unit, length): steps.py
        self.kernels = fused.load(root, manifest.get("kernels"))  # (None: ATen ops)
        self.out_column = manifest["out_column"]
        self.unit_macs = torch.tensor(manifest["unit_macs"], dtype=torch.long)
        self.macs_by_length = manifest.get("unit_macs_by_length")
        inp = manifest["input"]
        self.ids = inp["dtype"] == "int64"
        self.sequence, self.pad_id = inp["sequence"], inp.get("pad_id")

    def set_threshold(self, value: float | list[float], kind: str = "exit") -> None:
        """Set the thresholds of the exits (or `kind="gate"`): one value, or one per node
        that has one."""
        kinds = (kind, f"token_{kind}")  # (per sample, per token)
        nodes = [s for s in self.manifest["steps"] if s["kind"] in kinds and s.get("threshold")
                 is not None and not s.get("last")]  # fmt: skip
        values = value if isinstance(value, list | tuple) else [value] * len(nodes)
        if len(values) != len(nodes):
            raise ValueError(f"{len(values)} thresholds for {len(nodes)} {kind} nodes")
        for s, v in zip(nodes, values, strict=True):
            s["threshold"] = float(v)

    def set_gamma(self, value: float, preference: str | None = None) -> None:
        """Set the test-time preference value gamma of the metalayers' controllers (every
        preference, or the one named), as dyngraph's `model.set_gamma`."""
        steps = [s for s in self.manifest["steps"] if s["kind"] == "metalayer"]
        names = self.manifest.get("preferences", {})
        found = False
        for s in steps:
            for i, name in enumerate(names.get(s["controller"], [])):
                if preference is None or name == preference:
                    s["gamma"][i] = float(value)
                    found = True
        if not found:
            raise ValueError(f"no preference {preference!r} on this export's metalayers")

    def set_decode(self, on: bool = True) -> None:
        """Mixture-of-Depths gates route by their causal predictors (decoding) or by the
        top-k, as dyngraph's `model.set_decode`."""
        steps = [s for s in self.manifest["steps"] if s["kind"] == "token_gate" and
                 s.get("predictor") is not None]  # fmt: skip
        if not steps:
            raise ValueError("set_decode: no per-token gate of this export has a predictor")
        for s in steps:
            s["decode"] = bool(on)

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
        p = Pass(self, x)
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
    units, rows = [], {}
    for u in manifest["units"]:
        ep = _load_program(root, u, u["file"])
        _check_shapes(ep, u, root)
        units.append(_runnable(ep, root, u, u.get("aoti")))
        if u.get("rows") is not None:  # its partial queries (runner/tokens.py)
            ep = _load_program(root, u, u["rows"])
            rows[u["index"]] = _runnable(ep, root, u, u.get("rows_aoti"))
    return Exported(root, manifest, units, rows)


def _load_program(root: Path, u: dict, file: str):
    f = root / file
    if not f.exists():
        raise ExportError(f"{root}: unit {u['index']} ({u['name']}) is missing: {file}")
    try:
        return torch.export.load(str(f))
    except Exception as e:  # a damaged program: any of torch's load errors
        raise ExportError(f"{f}: cannot load the program ({type(e).__name__})") from None


def _runnable(ep, root: Path, u: dict, aoti: str | None):
    """The program as a callable: its AOTInductor package where the export has one (`--aot`),
    else the program's module as a plain function (`_direct`; no input guards: the runner
    checks the model's input, and every unit gets what the compiled model gave it)."""
    if aoti is None:
        return _direct(ep)
    f = root / aoti
    if not f.exists():
        raise ExportError(f"{root}: unit {u['index']} ({u['name']}) is missing: {aoti}")
    try:
        fn = torch._inductor.aoti_load_package(str(f))
    except Exception as e:  # a damaged package, or one built for another machine
        raise ExportError(f"{f}: cannot load the compiled package ({type(e).__name__})") from None

    def run(*args: torch.Tensor):
        # the compiled code reads its inputs at the strides it was compiled for (contiguous)
        # and does not check them: a sequence's slice to its length would be read wrongly
        return fn(*[a.contiguous() for a in args])

    return run


def _direct(ep) -> Any:
    """The program's module as a plain function of its tensors. Its `forward`, not its call
    (the module's hooks cost about as much as its ops here), without the pytree packing
    around it (the runner passes and reads flat tensors) and with each ATen op called through
    torch's own binding of it (`torch.linear` for `aten.linear.default`: about 1 us less a
    call than the op overload, which resolves the same kernel); an op torch binds nowhere
    else stays as it is."""
    gm = ep.module(check_guards=False)
    try:
        args, kwargs = ep.call_spec.in_spec.children()
        out = ep.call_spec.out_spec
        single = out.is_leaf()  # one tensor out, not a tuple of them
        flat = _flat(args) and kwargs.num_children == 0 and (single or _flat(out))
        if flat:  # (nested inputs or outputs, an LSTM's (h, c): the pytree packing stays)
            gm.graph._codegen = torch.fx.graph.CodeGen()
        for node in gm.graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                fn = _binding(node.target)
                if fn is not None:
                    node.target = fn
        gm.recompile()
    except (AttributeError, TypeError, ValueError):  # another torch's internals: as it is
        return ep.module(check_guards=False).forward
    forward = gm.forward
    if flat and single:
        return lambda *a: forward(*a)[0]
    return forward


def _flat(spec) -> bool:
    """A tuple or list of tensors (no nesting)."""
    return spec.type in (tuple, list) and all(c.is_leaf() for c in spec.children())


def _binding(op) -> Any:
    """torch's Python binding of ATen op `op` (same schema, argument names and kernel), or
    None where torch has none outside the op namespace."""
    namespace, name = op._schema.name.split("::")
    if namespace != "aten":
        return None
    for module in (torch._C._VariableFunctions, torch._C._nn):
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    return None


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
