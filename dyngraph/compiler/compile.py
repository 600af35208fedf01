"""From a spec to a DynamicModel: build the plan, then compile each unit."""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime import kernels
from ..runtime.model import DynamicModel
from .build import build_plan
from .load import LoadedSpec, load_spec

BACKENDS = ("inductor", "aot_eager", "eager", "none")


def compile_units(model: DynamicModel, backend: str, dynamic: bool = True) -> None:
    """Compile every unit with `torch.compile` (one compile per distinct module), or run eager."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "none":
        # dynamo counts compilations per code object, and segments of the same layers share
        # their generated code: in a process that compiles many models (a test session, a
        # sweep), or one model meeting many sequence lengths, the default limit of 8 is met
        # long before anything recompiles in a loop (fullgraph=True then fails)
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    cache: dict[int, object] = {}
    for u in model.units:
        if backend == "none":
            u.fn = None
            continue
        key = id(u.module)
        if key not in cache:
            # fullgraph: a graph break inside a segment is an error, not a silent slowdown
            cache[key] = torch.compile(u.module, backend=backend, dynamic=dynamic, fullgraph=True)
        u.fn = cache[key]
    model.backend = backend


def compile(  # noqa: A001 - the public name in DESIGN §6
    spec: str | Path | dict | LoadedSpec,
    backend: str | None = None,
    trust_imports: bool = False,
) -> DynamicModel:
    """Compile a spec (a path, YAML text, a dict or a loaded spec) into a DynamicModel.

    Args:
        spec: the spec.
        backend: overrides the spec's `compile: {backend: ...}`; `none` runs eagerly.
        trust_imports: allow `type: custom` blocks that import user code.
    """
    loaded = (
        load_spec(spec, trust_imports=trust_imports) if not isinstance(spec, LoadedSpec) else spec
    )
    plan = build_plan(loaded.spec, loaded.raw, loaded.file, trust_imports or loaded.trust_imports)
    model = DynamicModel(plan, backend or loaded.spec.compile.backend)
    compile_units(model, model.backend, loaded.spec.compile.dynamic)
    kernels.load()  # the fused decision kernels: built the first time on a machine (~25 s)
    return model
