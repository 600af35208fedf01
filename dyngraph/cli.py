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


def load_checkpoint(model, path: str) -> None:
    """Load weights saved by `dyngraph train` (or a plain state dict), safely."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)


def _profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .compiler.compile import compile
    from .profiler import profile

    torch.manual_seed(args.seed)
    model = compile(args.spec, backend=args.backend, trust_imports=args.trust_imports)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model = model.to(args.device).eval()
    data = args.data
    if data is None:
        train = model.spec.train
        data = train.data.name if train is not None else "random"
    if data == "random":
        print(f"{model.name}: no data set named (spec `train.data` or --data): profiling {args.n} random inputs, no labels")
        data = torch.randn(args.n, *model.spec.input.shape)
    prof = profile(
        model, data, latency=not args.no_latency, batch_size=args.batch_size, counter=args.counter,
        threads=args.threads, max_paths=args.max_paths, measure_each=args.measure_each, n=args.n,
        progress=None if not args.no_progress else False,
    )
    out = prof.save(Path(args.out or Path("profiles") / model.name))
    s = prof.summary
    print(f"{model.name}: {s['inputs']:,} inputs, mean {s['mean_macs']:,.0f} MACs per input "
          f"({s['saving']:.1%} below the longest path, {s['full_macs']:,}), {s['paths_seen']} paths")
    if "quality" in s:
        print(f"  {prof.metric}: {100 * s['quality']:.2f}%" if prof.metric == "accuracy" else f"  {prof.metric}: {s['quality']:.2f}")
    if "dispatch_waste" in s:
        print(f"  executed/ideal MACs of the batched run: {s['dispatch_waste']:.4f}")
    for w in prof.warnings:
        print(f"  warning: {w}")
    print(f"  wrote {out}/profile.json, report.md and plots")
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
    pr = sub.add_parser("profile", help="per-input MACs, per-path latency, report and plots")
    pr.add_argument("spec")
    pr.add_argument("--checkpoint", help="weights (a checkpoint of `dyngraph train` or a state dict)")
    pr.add_argument("--data", help="a built-in data set, a .npz/.pt file, or 'random' (default: the spec's train.data)")
    pr.add_argument("--n", type=int, default=2000, help="number of inputs (default 2000)")
    pr.add_argument("--out", help="output folder (default profiles/NAME)")
    pr.add_argument("--counter", choices=("fvcore", "torch"), default="fvcore")
    pr.add_argument("--backend", choices=("inductor", "aot_eager", "eager", "none"), default=None)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--max-paths", type=int, default=20, help="time at most this many paths")
    pr.add_argument("--measure-each", type=int, default=0, metavar="K", help="also time K inputs one by one")
    pr.add_argument("--no-latency", action="store_true", help="MACs only")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--trust-imports", action="store_true")
    pr.set_defaults(fn=_profile)
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
