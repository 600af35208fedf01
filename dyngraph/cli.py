"""The command line: `dyngraph validate | inspect | train | calibrate | eval | profile | export
| blocks | schema`. A user's mistake never ends in a traceback: spec problems are printed as
FILE:LINE:COL: PATH: message, and a bad checkpoint, data file, `--out`, option value or
unexportable step as one line; each exits with status 2, and a refused request writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_args import Parser, UsageError, check_rows, check_writable, fraction, positive
from .cli_report import print_eval, print_profile, quality_text
from .core.errors import SpecError


# ---------------------------------------------------------------------------------- commands
def _validate(args: argparse.Namespace) -> int:
    from .compiler.load import load_spec

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


def _loaded_model(args: argparse.Namespace):
    """The spec's model, with the checkpoint's weights and settings when one is given."""
    from .compiler.compile import compile
    from .training.checkpoint import load_into

    model = compile(
        args.spec, backend=getattr(args, "backend", None), trust_imports=args.trust_imports
    )
    if getattr(args, "checkpoint", None):
        load_into(model, args.checkpoint)
    return model.eval()


def _data(model, split: str, file: str | None):
    """A split of the spec's data, or the data file given on the command line."""
    from .data import load_file, load_split

    if file is not None:
        data = load_file(file)
        data.origin = f"{file} (--data, {len(data):,} samples)"
        return data
    if model.spec.train is None:
        raise UsageError(f"{model.name}: the spec names no data (train.data); pass --data FILE")
    return load_split(model.spec.train.data, split)


def _hold_heap(args: argparse.Namespace) -> None:
    """A timing command's process keeps freed memory for its next pass (runtime/heap.py)
    unless `--glibc-heap`: otherwise each pass may fault its temporaries' pages in again."""
    if not args.glibc_heap:
        from .runtime.heap import hold_heap

        hold_heap()


def _profile(args: argparse.Namespace) -> int:
    import torch

    from .profiler import profile

    if args.out:
        check_writable(args.out, folder=True)  # before any work
    check_rows(args.max_rows, args.batch_size)
    _hold_heap(args)
    torch.manual_seed(args.seed)
    model = _loaded_model(args).to(args.device)
    out = check_writable(args.out or Path("profiles") / model.name, folder=True)
    from .data.sets import is_file_name

    data, origin = args.data, None
    if (data is None and model.spec.train is not None) or is_file_name(data):
        data = _data(model, "test", data)  # the spec's test split, or the file given
        origin = data.origin
    if data is None or data == "random":
        print(
            f"{model.name}: no data named (spec `train.data` or --data): profiling {args.n} random inputs, no labels"
        )
        data = torch.randn(args.n, *model.spec.input.shape)
        origin = "random inputs"
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
        stream=not args.per_batch,
        max_rows=args.max_rows,
    )
    print_profile(model, origin or data, prof, prof.save(out))
    return 0


def _train(args: argparse.Namespace) -> int:
    out = check_writable(args.out, folder=True) if args.out else None
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={args.nproc}", "-m", "dyngraph", "train", args.spec]
        cmd += ["--out", args.out] if args.out else []
        cmd += ["--resume"] if args.resume else []
        cmd += ["--trust-imports"] if args.trust_imports else []
        cmd += ["--no-progress"] if args.no_progress else []
        for flag, v in (("--max-steps", args.max_steps), ("--stage-steps", args.stage_steps)):
            cmd += [flag, str(v)] if v else []
        return subprocess.call(cmd)
    from .training import train
    from .training.loop import TrainingError

    try:
        r = train(
            args.spec,
            out=out,
            resume=args.resume,
            max_steps=args.max_steps,
            stage_steps=args.stage_steps,
            progress=None if not args.no_progress else False,
            trust_imports=args.trust_imports,
        )
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if r.out is not None:
        print(
            f"wrote {r.out}/final.pt, checkpoint.pt, metrics.csv"
            if r.finished
            else f"stopped after {args.max_steps} steps: {r.out}/checkpoint.pt (continue with --resume)"
        )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .training.calibrate import calibrate_budget, fit_temperatures
    from .training.checkpoint import model_state, save_atomic
    from .training.evaluate import evaluate

    out = args.out or str(Path(args.checkpoint).with_suffix("")) + f".calibrated-{args.budget:g}.pt"
    check_writable(out, folder=False)
    model = _loaded_model(args)
    val = _data(model, "val", args.data)
    test = _data(model, "test", args.test_data)
    temps = fit_temperatures(model, val) if not args.no_temperature else []
    if temps:
        print("temperatures per exit: " + ", ".join(f"{t:.4g}" for t in temps))
    r = calibrate_budget(model, val, args.budget)
    res = evaluate(model, test)
    print(f"calibrated on {val.origin}")
    print(
        f"{r['setting']} = {r['value']:.6g}: val mean MACs {r['mean_macs']:,.0f} (target {r['target']:,.0f}"
        f"{'' if r['met'] else ', not reachable'})"
    )
    print(
        f"tested on {test.origin}: {res['macs_fraction']:.1%} of the longest path's MACs, "
        f"{quality_text(model, res)}"
    )
    save_atomic(model_state(model), Path(out))
    print(f"wrote {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    check_writable(args.out, folder=True)
    out = export(_loaded_model(args), args.out, aot=args.aot)
    print(
        f"wrote {out} (run it with torch alone: import dyngraph_runner from {out}, or dg.load_exported)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .training.evaluate import evaluate

    check_rows(args.max_rows, 512)
    _hold_heap(args)
    model = _loaded_model(args)
    data = _data(model, args.split, args.data)
    res = evaluate(model, data, stream=not args.per_batch, max_rows=args.max_rows)
    print_eval(model, data, res)
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


# ---------------------------------------------------------------------------------- parser
PER_BATCH = "run the data in independent batches (default: a stream, every stage on full batches)"
MAX_ROWS = "the stream's bound on rows waiting in its queues (default 16 x the batch size)"
GLIBC_HEAP = "time under glibc's own malloc policy (default: the heap held, dg.hold_heap)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dyngraph", description="compile and profile dynamic neural networks")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn, help: str, trust: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        if trust:
            c.add_argument(
                "--trust-imports",
                action="store_true",
                help="allow `custom` blocks that import user code (the spec's folder is on the import path)",
            )
        c.set_defaults(fn=fn)
        return c

    v = command("validate", _validate, "check specs; exit 2 with FILE:LINE:COL messages")
    v.add_argument("specs", nargs="+")
    i = command("inspect", _inspect, "segments, decision points, paths and static MACs")
    i.add_argument("spec")
    i.add_argument("--counter", choices=("fvcore", "torch"), default="fvcore")
    t = command("train", _train, "train the spec's stages (train: section)")
    t.add_argument("spec")
    t.add_argument("--out", help="run folder (default runs/NAME)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the run folder's checkpoint"
    )
    t.add_argument(
        "--max-steps",
        type=positive,
        metavar="N",
        help="stop after N steps (a checkpoint is written; --resume goes on, schedules unchanged)",
    )
    t.add_argument(
        "--stage-steps",
        type=positive,
        metavar="N",
        help="a quick run: every stage shortened to at most N steps, schedules included",
    )
    t.add_argument(
        "--nproc",
        type=positive,
        default=1,
        help="processes (DistributedDataParallel via torchrun)",
    )
    t.add_argument("--no-progress", action="store_true")
    c = command(
        "calibrate",
        _calibrate,
        "temperature scaling and the decision setting that meets a MAC budget",
    )
    c.add_argument("spec")
    c.add_argument("--checkpoint", required=True)
    c.add_argument(
        "--budget",
        type=fraction,
        required=True,
        help="fraction of the longest path's MACs, in (0, 1]",
    )
    c.add_argument(
        "--data",
        metavar="FILE",
        help="calibrate on this .npz/.pt file (default: the spec's val split)",
    )
    c.add_argument(
        "--test-data", metavar="FILE", help="test on this file (default: the spec's test split)"
    )
    c.add_argument("--no-temperature", action="store_true")
    c.add_argument("--out", help="calibrated checkpoint (default CHECKPOINT.calibrated-BUDGET.pt)")
    c.set_defaults(backend="none")
    e = command("eval", _eval, "accuracy, mean MACs per input and routing on a split or a file")
    e.add_argument("spec")
    e.add_argument("--checkpoint")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument(
        "--data", metavar="FILE", help="evaluate on this .npz/.pt file instead of a split"
    )
    e.set_defaults(backend="none")
    for c in (
        e,
        pr := command("profile", _profile, "per-input MACs, per-path latency, report and plots"),
    ):
        c.add_argument("--per-batch", action="store_true", help=PER_BATCH)
        c.add_argument("--max-rows", type=positive, help=MAX_ROWS)
        c.add_argument("--glibc-heap", action="store_true", help=GLIBC_HEAP)
    pr.add_argument("spec")
    pr.add_argument(
        "--checkpoint", help="weights (a checkpoint of `dyngraph train` or a state dict)"
    )
    pr.add_argument(
        "--data",
        help="a built-in data set, a .npz/.pt file, or 'random' (default: the spec's test split)",
    )
    pr.add_argument("--n", type=positive, default=2000, help="number of inputs (default 2000)")
    pr.add_argument("--out", help="output folder (default profiles/NAME)")
    pr.add_argument("--counter", choices=("fvcore", "torch"), default="fvcore")
    pr.add_argument("--backend", choices=("inductor", "aot_eager", "eager", "none"), default=None)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--threads", type=positive, default=1)
    pr.add_argument("--batch-size", type=positive, default=256)
    pr.add_argument("--max-paths", type=positive, default=20, help="time at most this many paths")
    pr.add_argument(
        "--measure-each", type=int, default=0, metavar="K", help="also time K inputs one by one"
    )
    pr.add_argument("--no-latency", action="store_true", help="MACs only")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--seed", type=int, default=0)
    x = command("export", _export, "each unit as a torch.export program, a manifest, a runner")
    x.add_argument("spec")
    x.add_argument("--checkpoint", help="weights (a checkpoint of `dyngraph train`)")
    x.add_argument("--out", required=True, help="the export's folder")
    x.add_argument("--aot", action="store_true", help="also AOTInductor-compile each unit")
    x.set_defaults(backend="none")  # (the units are exported from their eager modules)
    command("schema", _schema, "print the JSON Schema of the spec format", trust=False)
    command("blocks", _blocks, "list the registered blocks", trust=False)
    return p


def _run(args: argparse.Namespace) -> int:
    from .data import DataError
    from .export import ExportError
    from .training.checkpoint import CheckpointError

    try:
        return args.fn(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (UsageError, CheckpointError, DataError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (printed in one line) or --help: its status
        return int(e.code or 0)
    try:
        status = _run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # the reader went away (`dyngraph blocks | head`): nothing more to say, and no
        # second error when Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
