"""The command line: `dyngraph validate | inspect | schema | blocks`.

Spec problems are printed as FILE:LINE:COL: PATH: message and exit with status 2, with no
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .spec.errors import SpecError


def _validate(args: argparse.Namespace) -> int:
    from .spec.load import load_spec

    status = 0
    for path in args.specs:
        try:
            load_spec(path, trust_imports=args.trust_imports)
            print(f"{path}: ok")
        except SpecError as e:
            print(str(e), file=sys.stderr)
            status = 2
    return status


def _inspect(args: argparse.Namespace) -> int:
    from .compiler.compile import compile
    from .inspect import inspect_text

    model = compile(args.spec, backend="none", trust_imports=args.trust_imports)
    print(inspect_text(model, args.counter))
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .spec.schema import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _blocks(args: argparse.Namespace) -> int:
    from .blocks import BLOCKS

    for role in sorted({b.role for b in BLOCKS.values()}):
        print(f"{role}:")
        for name, bd in sorted(BLOCKS.items()):
            if bd.role == role:
                fields = ", ".join(
                    (f.alias or k) + ("" if f.is_required() else f"={f.default!r}")
                    for k, f in bd.params.model_fields.items()
                )
                print(f"  {name:<18} {bd.doc}")
                if fields:
                    print(f"  {'':<18}   params: {fields}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dyngraph", description="compile and profile dynamic neural networks"
    )
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check specs; exit 2 with FILE:LINE:COL messages")
    v.add_argument("specs", nargs="+")
    v.add_argument("--trust-imports", action="store_true", help="allow specs that import user code")
    v.set_defaults(fn=_validate)
    i = sub.add_parser("inspect", help="segments, decision points, paths and static MACs")
    i.add_argument("spec")
    i.add_argument("--counter", choices=("fvcore", "torch"), default="fvcore")
    i.add_argument("--trust-imports", action="store_true")
    i.set_defaults(fn=_inspect)
    s = sub.add_parser("schema", help="print the JSON Schema of the spec format")
    s.set_defaults(fn=_schema)
    b = sub.add_parser("blocks", help="list the registered blocks")
    b.set_defaults(fn=_blocks)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
