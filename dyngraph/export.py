"""`dg.export(model, DIR)`: a compiled model as a folder that deploys without dyngraph.

Each unit becomes a `torch.export` program (a dynamic batch dimension and, for a sequence's
values, a dynamic length) saved as `units/NNN.pt2`; `manifest.json` (format
`dyngraph.export/1`) holds the plan's steps with their decision settings (each step's
`export_step()`), the trace's columns and every unit's MACs (per length for sequences); the
standalone runner (runtime/standalone.py) is copied beside them as `dyngraph_runner.py`, which
imports only torch. `aot=True` (`dyngraph export --aot`) also compiles each unit with
AOTInductor into `units/NNN.aoti.pt2`, which the runner then runs. `dg.load_exported(DIR)`
loads an export through its copy of the runner.

Steps that export today: static segments, exits per sample and gates per sample. Any other
step (metalayers, halting, the per-token constructs) is a one-line `ExportError` naming it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .compiler.units import IdsShape
from .runtime import standalone
from .runtime.standalone import FORMAT, RUNNER, ExportError

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


def export(model, out: str | Path, aot: bool = False) -> Path:
    """Write `model` (in eval mode, its current decision settings) to the folder `out`;
    `aot`: also compile each unit with AOTInductor (seconds to minutes per unit), which the
    runner then runs instead of the program."""
    out = Path(out)
    steps = []
    for s in model._plan.steps:
        fn = getattr(s, "export_step", None)
        if fn is None:
            name = getattr(s, "name", type(s).__name__)
            raise ExportError(f"{model.name}: {name} ({type(s).__name__}) cannot be exported yet")
        steps.append(fn())
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
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(standalone.__file__, out / RUNNER)
    return out


def load_exported(path: str | Path):
    """The export in `path`, run by the runner copied into it (what a deployment imports)."""
    root = Path(path)
    runner = root / RUNNER
    if not runner.exists():
        raise ExportError(f"{root}: no {RUNNER} (not a dyngraph export)")
    name = f"dyngraph_runner_{abs(hash(str(root.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, runner)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    try:
        return module.load(root)
    except module.ExportError as e:  # (the copy's own class): dyngraph's, same line
        raise ExportError(str(e)) from None
