"""`dg.export(model, DIR)`: a compiled model as a folder that deploys without dyngraph.

Each unit becomes a `torch.export` program (a dynamic batch dimension and, for a sequence's
values, a dynamic length) saved as `units/NNN.pt2`; `manifest.json` (format
`dyngraph.export/1`) holds the plan's steps with their decision settings (each step's
`export_step()`), the trace's columns and every unit's MACs (per length for sequences); the
standalone runner (the package runtime/runner) is copied beside them as `dyngraph_runner/`,
which imports only torch. `aot=True` (`dyngraph export --aot`) also compiles each unit with
AOTInductor into `units/NNN.aoti.pt2`, which the runner then runs. `dg.load_exported(DIR)`
loads an export through its copy of the runner.

Steps that export today: static segments; exits, gates, halting (also through time) and
metalayers per sample; Mixture-of-Depths gates, per-token metalayers, per-token exits and
halting over depth per position (whose layers also export their partial queries,
`forward_rows`, as `units/NNN.rows.pt2`). A construct without an export step (a plugin's)
is a one-line `ExportError` naming it. Where the plan allows, `single.pt2` holds the whole
model at batch 1 as one program with its decisions in `torch.cond` (`SingleGraph`; the
manifest says why where it does not).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .blocks.sequence import QueryGrid, query_grid
from .compiler.units import IdsShape
from .runtime import kernels, runner
from .runtime.lengths import causal_units, frozen_macs
from .runtime.runner import FILES, FORMAT, RUNNER, ExportError, fused

__all__ = ["ExportError", "export", "load_exported"]


def _dynamic(shape: tuple, length: int | None) -> dict[int, Any]:
    """The dynamic dimensions of a unit's input of per-sample `shape`: the batch, and the
    sequence's length where the input is one (token ids, or [L, D] values)."""
    dims: dict[int, Any] = {0: torch.export.Dim.DYNAMIC}
    if length is not None and (
        isinstance(shape, IdsShape) or (len(shape) == 2 and shape[0] == length)
    ):
        dims[1] = torch.export.Dim.DYNAMIC
    return dims


def export(model, out: str | Path, aot: bool = False, single: bool = True) -> Path:
    """Write `model` (in eval mode, its current decision settings) to the folder `out`;
    `aot`: also compile each unit with AOTInductor (seconds to minutes per unit), which the
    runner then runs instead of the program; `single`: also the batch-1 one-graph program
    where the plan has one (`single_graph`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is not a folder (the export writes one)")
    steps = []
    for s in model._plan.steps:
        fn = getattr(s, "export_step", None)
        step = None if fn is None else fn()  # (None: this kind of node does not export yet)
        if step is None:
            name = getattr(s, "name", type(s).__name__)
            raise ExportError(f"{model.name}: {name} ({type(s).__name__}) cannot be exported yet")
        steps.append(step)
    inp = model.spec.input
    length = inp.shape[0] if inp.is_sequence else None
    (out / "units").mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    units = []
    try:
        for u in model.units:
            args = u.example_inputs(2)
            dyn = tuple(_dynamic(s, length) for s in u.in_shapes)
            with torch.no_grad():
                ep = torch.export.export(u.module, args, dynamic_shapes=dyn, strict=False)
            file = f"units/{u.index:03d}.pt2"
            torch.export.save(ep, str(out / file))
            aoti = None
            if aot:
                aoti = f"units/{u.index:03d}.aoti.pt2"
                torch._inductor.aoti_compile_and_package(ep, package_path=str(out / aoti))
            units.append({"index": u.index, "name": u.name, "file": file, "aoti": aoti,
                          "in_shapes": [list(s) for s in u.in_shapes]})  # fmt: skip
            if u.rows is not None:  # its partial queries (after a per-token exit or halting)
                ep = _rows_program(u.rows, length)
                units[-1]["rows"] = f"units/{u.index:03d}.rows.pt2"
                torch.export.save(ep, str(out / units[-1]["rows"]))
                if aot:
                    units[-1]["rows_aoti"] = f"units/{u.index:03d}.rows.aoti.pt2"
                    torch._inductor.aoti_compile_and_package(
                        ep, package_path=str(out / units[-1]["rows_aoti"])
                    )
    finally:
        model.train(was)
    plan = model._plan
    manifest = {
        "format": FORMAT,
        "name": model.name,
        "input": {
            "shape": list(inp.shape),
            "dtype": inp.dtype,
            "sequence": inp.is_sequence,
            "pad_id": inp.pad_id,
        },  # fmt: skip
        "out_column": plan.out_column,
        "output_id": plan.output_id,
        # each metalayer controller's preferences, in the order its gamma values are fed
        "preferences": {m.ctl_name: list(m.ctl.preferences) for m in model.metalayers},
        "columns": [
            {"name": g.name, "width": g.width, "empty": g.empty} for g in model.paths.groups
        ],  # fmt: skip
        "unit_macs": model.unit_macs().tolist(),
        "steps": steps,
        "units": units,
    }
    if length is not None:  # a sequence's cost at its own length (index 0: nothing)
        manifest["unit_macs_by_length"] = [[0] * len(model.units)] + [
            model.unit_macs("fvcore", n).tolist() for n in range(1, length + 1)
        ]
        causal = causal_units(model)  # (a token's cost with partial queries: runtime/lengths.py)
        manifest["token_costs"] = {
            str(u.index): {"frozen": frozen_macs(u, "fvcore"), "causal": causal[u.index]}
            for u in model.units
            if u.rows is not None
        }
    program, why = single_graph(model) if single else (None, "not made (single=False)")
    if program is not None:
        torch.export.save(program, str(out / "single.pt2"))
    manifest["single_graph"] = {"file": "single.pt2"} if program is not None else {"why": why}
    pkg = Path(runner.__file__).parent
    (out / RUNNER).mkdir(exist_ok=True)
    for f in FILES:
        shutil.copyfile(pkg / f, out / RUNNER / f)
    built = kernels.built_file()
    if built is not None:  # the fused decision kernels, as built here (runner/fused.py)
        shutil.copyfile(built, out / fused.FILE)
        manifest["kernels"] = fused.built_for()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


class _RowsProgram(torch.nn.Module):
    """A block's partial queries (`forward_rows`) over plain tensors: every token's states
    x [b, L, D] and the running tokens' query grid (rows, slots, mask: `query_grid`)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, rows, slots, mask):
        return self.block.forward_rows(x, QueryGrid(rows, slots, mask.shape[2], mask))


def _rows_program(block: torch.nn.Module, length: int):
    """`block`'s partial queries as a program, every size dynamic (sequences, length, running
    tokens, grid width), exported on two sequences of 3 and 1 running tokens."""
    active = torch.zeros(2, length, dtype=torch.bool)
    active[0, : min(3, length)] = True
    active[1, length - 1] = True
    g = query_grid(active)
    w = next(block.parameters())
    x = torch.randn(2, length, block.dim, dtype=w.dtype)
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn}, {0: dyn}, {0: dyn, 2: dyn, 3: dyn})
    with torch.no_grad():
        return torch.export.export(_RowsProgram(block).eval(), (x, g.rows, g.slots, g.mask),
                                   dynamic_shapes=shapes, strict=False)  # fmt: skip


def load_exported(path: str | Path):
    """The export in `path`, run by the runner copied into it (what a deployment imports)."""
    root = Path(path)
    pkg, name = root / RUNNER, f"dyngraph_runner_{abs(hash(str(root.resolve())))}"
    if (pkg / "__init__.py").exists():
        spec = importlib.util.spec_from_file_location(
            name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
    elif (root / "dyngraph_runner.py").exists():  # an export written before the package
        spec = importlib.util.spec_from_file_location(name, root / "dyngraph_runner.py")
    else:
        raise ExportError(f"{root}: no {RUNNER}/ (not a dyngraph export)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    try:
        return module.load(root)
    except module.ExportError as e:  # (the copy's own class): dyngraph's, same line
        raise ExportError(str(e)) from None


# ---------------------------------------------------------------- one graph at batch 1


class SingleGraph(torch.nn.Module):
    """Batch 1, the whole plan as one graph: exits as nested `torch.cond`s (the rest of the
    model, or this exit's logits), gates as a `torch.cond` between the body and the identity.
    `torch.cond` takes one predicate, so one graph routes one sample: a batch cannot take
    several paths in it (which is why the runner exists). Returns (logits [1, ...], the
    decisions [D]: the exit taken, or each gate's 1 / 0)."""

    def __init__(self, model, steps: list[dict]):
        super().__init__()
        self.units = torch.nn.ModuleList([u.module for u in model.units])
        self.steps, self.output_id = steps, model._plan.output_id

    def forward(self, x: torch.Tensor):
        return self._run(0, {"input": x}, [])

    def _run(self, k: int, env: dict, decided: list):
        for k in range(k, len(self.steps)):  # noqa: B020  (resumes at k)
            s = self.steps[k]
            if s["kind"] == "segment":
                outs = self.units[s["unit"]](*[env[r] for r in s["reads"]])
                env.update(zip(s["outputs"], outs, strict=True))
            elif s["kind"] == "gate":
                env[s["writes"]] = self._gate(s, env, decided)
            else:
                return self._exit(k, s, env)
        if not decided:  # a static plan: no decision
            return env[self.output_id], torch.zeros(0, dtype=torch.long)
        return env[self.output_id], torch.cat(decided)

    def _gate(self, s: dict, env: dict, decided: list) -> torch.Tensor:
        x = env[s["reads"][0]]
        on = self.units[s["policy"]](x)[0] >= s["threshold"]
        decided.append(on.long().view(1))
        body = self.units[s["body"]]
        return torch.cond(on, lambda v: body(v), lambda v: v.clone(), (x,))

    def _exit(self, k: int, s: dict, env: dict):
        z = self.units[s["head"]](env[s["reads"][0]])
        here = torch.full((1,), s["index"], dtype=torch.long)
        if s["last"]:
            return z, here
        t = s["temperature"]
        if s["criterion"] == "max_prob":
            zt = z / t
            stay = (zt - zt.amax(1, keepdim=True)).exp().sum(1).reciprocal()[0] < s["threshold"]
        else:  # entropy
            q = torch.softmax(z / t, 1)
            stay = -(q * torch.log(q.clamp_min(1e-12))).sum(1)[0] > s["threshold"]
        names = sorted(n for n in env if n in s["live_after"])
        index = s["index"]

        def go(z, *vals):
            return self._run(k + 1, dict(zip(names, vals, strict=True)), [])

        def leave(z, *vals):
            return z.clone(), torch.full((1,), index, dtype=torch.long)

        return torch.cond(stay, go, leave, (z, *[env[n] for n in names]))


def single_graph(model) -> tuple[Any, str | None]:
    """The batch-1 one-graph program of `model` (torch.export with torch.cond), or (None, why
    not): exits (max_prob, entropy) and gates (feed-forward) are expressible; others are not
    here (see docs/export.md)."""
    steps = [s.export_step() if hasattr(s, "export_step") else {"kind": type(s).__name__}
             for s in model._plan.steps]  # fmt: skip
    kinds = {s["kind"] for s in steps}
    for s in steps:
        if s["kind"] not in ("segment", "exit", "gate"):
            return None, f"{s['kind']} has no torch.cond form here"
        if s["kind"] == "exit" and s["criterion"] == "patience":
            return None, "patience counts across exits (a carried state): not expressed here"
        if s["kind"] == "gate" and s["style"] != "ff":
            return None, f"{s['style']} gate policies are not expressed here"
    if {"exit", "gate"} <= kinds:
        return None, "exits and gates in one plan are not expressed here"
    module = SingleGraph(model, steps).eval()
    inp = model.spec.input
    ids = inp.dtype == "int64"
    x = torch.ones((1, *inp.shape), dtype=torch.long) if ids else torch.randn(1, *inp.shape)
    # a sequence's length is dynamic: a padded sequence runs without its padding
    dyn = ({1: torch.export.Dim.DYNAMIC},) if inp.is_sequence else None
    with torch.no_grad():
        return torch.export.export(module, (x,), dynamic_shapes=dyn, strict=False), None
