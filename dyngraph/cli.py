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
    """Load weights (and calibrated decision settings) saved by `dyngraph train` or
    `dyngraph calibrate`, or a plain state dict; safely (weights_only)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    if isinstance(state, dict) and "settings" in state:
        model.load_decision_settings(state["settings"])


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
        print(
            f"{model.name}: no data set named (spec `train.data` or --data): profiling {args.n} random inputs, no labels"
        )
        data = torch.randn(args.n, *model.spec.input.shape)
    prof = profile(
        model,
        data,
        latency=not args.no_latency,
        batch_size=args.batch_size,
        counter=args.counter,
        threads=args.threads,
        max_paths=args.max_paths,
        measure_each=args.measure_each,
        n=args.n,
        progress=None if not args.no_progress else False,
    )
    out = prof.save(Path(args.out or Path("profiles") / model.name))
    s = prof.summary
    print(
        f"{model.name}: {s['inputs']:,} inputs, mean {s['mean_macs']:,.0f} MACs per input "
        f"({s['saving']:.1%} below the longest path, {s['full_macs']:,}), {s['paths_seen']} paths"
    )
    if "quality" in s:
        print(
            f"  {prof.metric}: {100 * s['quality']:.2f}%"
            if prof.metric == "accuracy"
            else f"  {prof.metric}: {s['quality']:.2f}"
        )
    if "dispatch_waste" in s:
        print(f"  executed/ideal MACs of the batched run: {s['dispatch_waste']:.4f}")
    for w in prof.warnings:
        print(f"  warning: {w}")
    print(f"  wrote {out}/profile.json, report.md and plots")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "LOCAL_RANK" not in __import__("os").environ:
        import subprocess

        cmd = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={args.nproc}",
                "-m",
                "dyngraph",
                "train",
                args.spec,
            ]
            + (["--out", args.out] if args.out else [])
            + (["--resume"] if args.resume else [])
            + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
        )
        return subprocess.call(cmd)
    from .training import train
    from .training.loop import TrainingError

    try:
        r = train(
            args.spec,
            out=args.out,
            resume=args.resume,
            max_steps=args.max_steps,
            progress=None if not args.no_progress else False,
        )
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if r["out"] is not None:
        print(f"wrote {r['out']}/final.pt, checkpoint.pt, metrics.csv")
    return 0


def _loaded_model(args):
    from .compiler.compile import compile

    model = compile(
        args.spec,
        backend=getattr(args, "backend", None),
        trust_imports=getattr(args, "trust_imports", False),
    )
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    return model.eval()


def _split(model, name: str):
    from .training.batches import Batches

    if model.spec.train is None:
        raise SystemExit(f"{model.name}: the spec names no data set (train.data)")
    return Batches(model.spec.train).split(name)


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from .training.calibrate import calibrate_budget, fit_temperatures
    from .training.checkpoint import save_atomic
    from .training.evaluate import evaluate

    model = _loaded_model(args)
    val = _split(model, "val")
    temps = fit_temperatures(model, val) if not args.no_temperature else []
    if temps:
        print("temperatures per exit: " + ", ".join(f"{t:.3g}" for t in temps))
    r = calibrate_budget(model, val, args.budget)
    test = evaluate(model, _split(model, "test"))
    print(
        f"{r['setting']} = {r['value']:.4g}: val mean MACs {r['mean_macs']:,.0f} (target {r['target']:,.0f}"
        f"{'' if r['met'] else ', not reachable'}); test: {test['macs_fraction']:.1%} of the longest path, "
        f"{_quality_text(model, test)}"
    )
    out = args.out or str(args.checkpoint).replace(".pt", "") + f".calibrated-{args.budget:g}.pt"
    state = (
        torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if args.checkpoint
        else {}
    )
    state = state if isinstance(state, dict) and "model" in state else {"model": model.state_dict()}
    state["settings"] = model.decision_settings()
    save_atomic(state, out)
    print(f"wrote {out}")
    return 0


def _quality_text(model, res) -> str:
    if "quality" not in res:
        return "no labels"
    q = res["quality"]
    return (
        f"accuracy {100 * q:.2f}%"
        if model.spec.task.type == "classification"
        else f"NMSE {q:.2f} dB"
    )


def _eval(args: argparse.Namespace) -> int:
    from .training.evaluate import evaluate

    model = _loaded_model(args)
    res = evaluate(model, _split(model, args.split))
    print(
        f"{model.name} on {args.split} ({res['inputs']:,} inputs): {_quality_text(model, res)}, "
        f"mean {res['mean_macs']:,.0f} MACs per input ({res['macs_fraction']:.1%} of the longest path, {res['full_macs']:,})"
    )
    if "exits" in res:
        print("  inputs per exit: " + ", ".join(f"exit {e}: {c}" for e, c in res["exits"].items()))
    for desc, c in list(res["paths"].items())[:10]:
        print(f"  {c:>6}  {desc}")
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
    t = sub.add_parser("train", help="train the spec's stages (train: section)")
    t.add_argument("spec")
    t.add_argument("--out", help="run folder (default runs/NAME)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the run folder's checkpoint"
    )
    t.add_argument("--max-steps", type=int, help="cap every stage at this many steps (quick runs)")
    t.add_argument(
        "--nproc", type=int, default=1, help="processes (DistributedDataParallel via torchrun)"
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_train)
    c = sub.add_parser(
        "calibrate", help="temperature scaling and the decision setting that meets a MAC budget"
    )
    c.add_argument("spec")
    c.add_argument("--checkpoint", required=True)
    c.add_argument(
        "--budget", type=float, required=True, help="fraction of the longest path's MACs, e.g. 0.5"
    )
    c.add_argument("--no-temperature", action="store_true")
    c.add_argument("--out")
    c.set_defaults(fn=_calibrate, backend="none")
    e = sub.add_parser("eval", help="accuracy, mean MACs per input and routing on a split")
    e.add_argument("spec")
    e.add_argument("--checkpoint")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.set_defaults(fn=_eval, backend="none")
    pr = sub.add_parser("profile", help="per-input MACs, per-path latency, report and plots")
    pr.add_argument("spec")
    pr.add_argument(
        "--checkpoint", help="weights (a checkpoint of `dyngraph train` or a state dict)"
    )
    pr.add_argument(
        "--data",
        help="a built-in data set, a .npz/.pt file, or 'random' (default: the spec's train.data)",
    )
    pr.add_argument("--n", type=int, default=2000, help="number of inputs (default 2000)")
    pr.add_argument("--out", help="output folder (default profiles/NAME)")
    pr.add_argument("--counter", choices=("fvcore", "torch"), default="fvcore")
    pr.add_argument("--backend", choices=("inductor", "aot_eager", "eager", "none"), default=None)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--max-paths", type=int, default=20, help="time at most this many paths")
    pr.add_argument(
        "--measure-each", type=int, default=0, metavar="K", help="also time K inputs one by one"
    )
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
