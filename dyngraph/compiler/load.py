"""Loading a spec: parse and validate it (spec/load.py), then build it once on the meta device
for the semantic, shape and memory checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.yaml_loader import LocDict
from ..spec.load import parse_spec, resolve_data_files
from .build import build_plan


class LoadedSpec:
    """A spec that passed every check, with what is needed to report later problems in place."""

    def __init__(self, spec: Any, raw: LocDict | dict, file: str, trust_imports: bool):
        self.spec, self.raw, self.file, self.trust_imports = spec, raw, file, trust_imports

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"LoadedSpec({self.file!r}, name={self.spec.name!r})"


def load_spec(source: str | Path | dict | LoadedSpec, trust_imports: bool = False) -> LoadedSpec:
    """Load and check a spec: a file path, YAML text, or a dict.

    Every problem is collected — schema, references, graph, shapes — and raised together as
    one SpecError whose lines read `FILE:LINE:COL: PATH: message`.
    """
    if isinstance(source, LoadedSpec):
        return source
    spec, raw, file = parse_spec(source)
    resolve_data_files(spec, file)
    # semantic and shape checks on the meta device (no weights allocated); the plan is dropped
    build_plan(spec, raw, file, trust_imports, meta=True)
    return LoadedSpec(spec, raw, file, trust_imports)
