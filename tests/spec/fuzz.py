"""Seeded mutations of every spec and fixture, run through `dyngraph validate` in-process.

Each mutation must end in exit 0 or exit 2 whose every message names a line >= 1, within a time
and memory bound, and a spec that validates must compile and run one batch. The default test
tier runs a few hundred; `python -m tests.spec.fuzz --n 1200` runs more and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "specs").glob("*.yaml")) + sorted(
    (ROOT / "tests" / "fixtures").rglob("*.yaml")
)
#: A model built by a mutation may take this much memory (the compiler refuses larger ones).
MODEL_BYTES = 256 << 20

HUGE = [10**6, 10**9, 10**12, 10**30, 10**5000, -1, 0, 1e308, float("inf"), float("nan")]
WRONG = [True, False, None, "x", "", [], {}, [1, 2], {"a": 1}, 3.5, -7, "1e-3"]


def _paths(node, prefix=()):
    """Every (path, value) inside a document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _parent(doc, path):
    node = doc
    for p in path[:-1]:
        node = node[p]
    return node


def _structural(doc: dict, rng: random.Random) -> tuple[str, dict]:
    """One mutation of the parsed document."""
    doc = copy.deepcopy(doc)
    paths = [p for p, _ in _paths(doc) if p]
    path = rng.choice(paths)
    parent, last = _parent(doc, path), path[-1]
    kind = rng.choice(
        [
            "delete",
            "wrong_type",
            "huge",
            "unknown_type",
            "unknown_ref",
            "duplicate_id",
            "cycle",
            "deep",
            "repeat",
            "custom",
            "size",
        ]
    )
    if kind == "delete":
        del parent[last]
    elif kind == "wrong_type":
        parent[last] = rng.choice(WRONG)
    elif kind == "huge":
        nums = [
            p
            for p, v in _paths(doc)
            if isinstance(v, int | float) and not isinstance(v, bool) and p
        ]
        if nums:
            p = rng.choice(nums)
            _parent(doc, p)[p[-1]] = rng.choice(HUGE)
    elif kind == "unknown_type":
        types = [p for p, v in _paths(doc) if p and p[-1] == "type"]
        if types:
            p = rng.choice(types)
            _parent(doc, p)[p[-1]] = rng.choice(["blok", "linaer", "x" * 300, "custom", "exit"])
    elif kind == "unknown_ref":
        refs = [p for p, v in _paths(doc) if isinstance(v, str) and p and p[0] == "graph"]
        if refs:
            p = rng.choice(refs)
            _parent(doc, p)[p[-1]] = rng.choice(["nope", "stem_", "input", "graph"])
    elif kind in ("duplicate_id", "cycle"):
        nodes = [n for n in doc.get("graph", []) if isinstance(n, dict)]
        if len(nodes) >= 2:
            a, b = rng.sample(nodes, 2)
            a["id"] = "a1"
            if kind == "duplicate_id":
                b["id"] = "a1"
            else:
                b["id"] = "b1"
                a["inputs"] = ["b1"]
    elif kind == "deep":
        v = parent[last]
        for _ in range(rng.choice([10, 70, 200, 1000])):
            v = [v]
        parent[last] = v
    elif kind == "repeat":
        reps = [p for p, v in _paths(doc) if p and p[-1] == "repeat"]
        target = rng.choice(reps) if reps else None
        n = rng.choice([0, 2, 50, 400, 10_000, 10**12])
        if target:
            _parent(doc, target)["repeat"] = n
        elif isinstance(doc.get("graph"), list) and len(doc["graph"]) > 1:
            doc["graph"][1] = {"repeat": n, "nodes": [doc["graph"][1]]}
    elif kind == "custom":
        nodes = doc.get("graph", [])
        if isinstance(nodes, list) and nodes:
            nodes.insert(
                rng.randrange(len(nodes)),
                {
                    "type": "custom",
                    "target": rng.choice(["os.system", "tests.helpers.SelfAttention", "nope.Nope"]),
                },
            )
    elif kind == "size":
        sizes = [
            p
            for p, v in _paths(doc)
            if p and p[-1] in ("hidden", "out", "dim", "shape", "classes", "m", "n")
        ]
        if sizes:
            p = rng.choice(sizes)
            v = rng.choice([10**9, 10**12, 0, -3, 100_000])
            _parent(doc, p)[p[-1]] = [v] if p[-1] == "shape" else v
    return f"struct:{kind}", doc


def _textual(text: str, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of the file's bytes."""
    data = text.encode()
    kind = rng.choice(
        [
            "bad_utf8",
            "utf16",
            "latin1",
            "control",
            "nul",
            "tab",
            "alias_bomb",
            "python_tag",
            "truncate",
            "dup_line",
            "huge_int",
            "many_keys",
            "anchor_loop",
        ]
    )
    pos = rng.randrange(len(data) + 1)
    lines = text.splitlines(keepends=True)
    li = rng.randrange(len(lines))
    if kind == "bad_utf8":
        data = data[:pos] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0xFE])]) + data[pos:]
    elif kind == "utf16":
        data = text.encode(rng.choice(["utf-16", "utf-32"]))
    elif kind == "latin1":
        data = (text[: pos // 2] + "é" + text[pos // 2 :]).encode("latin-1")
    elif kind in ("control", "nul"):
        ch = b"\x00" if kind == "nul" else bytes([rng.choice([1, 7, 8, 0x1B, 0x7F])])
        data = data[:pos] + ch + data[pos:]
    elif kind == "tab":
        lines[li] = "\t" + lines[li]
        data = "".join(lines).encode()
    elif kind == "alias_bomb":
        bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join(["*" + chr(97 + i)] * 9) + "]\n"
            for i in range(8)
        )
        data = (bomb + text).encode()
    elif kind == "python_tag":
        lines.insert(li, "evil: !!python/object/apply:os.system ['true']\n")
        data = "".join(lines).encode()
    elif kind == "truncate":
        data = data[:pos]
    elif kind == "dup_line":
        lines.insert(li, lines[li])
        data = "".join(lines).encode()
    elif kind == "huge_int":
        data = re.sub(rb"\b\d+\b", lambda m: b"9" * rng.choice([19, 400, 5000]), data, count=1)
    elif kind == "many_keys":
        data += b"train:\n" + b"".join(
            b"  k%d: 1\n" % i for i in range(rng.choice([2_000, 200_000]))
        )
    elif kind == "anchor_loop":
        data = b"x: &x [*x]\n" + data
    return f"text:{kind}", data


def mutations(n: int, seed: int = 0):
    """`n` seeded (source, kind, bytes) mutations, spread over every spec and fixture."""
    rng = random.Random(seed)
    for i in range(n):
        src = SOURCES[i % len(SOURCES)]
        text = src.read_text()
        if rng.random() < 0.55:
            from dyngraph.core.errors import SpecError
            from dyngraph.core.yaml_loader import load_yaml

            try:
                load_yaml(text)  # bounded: a source that is itself a bomb is mutated as text
                doc = yaml.safe_load(text)
            except (yaml.YAMLError, SpecError):
                doc = None
            if isinstance(doc, dict):
                kind, mutated = _structural(doc, rng)
                try:
                    yield src, kind, yaml.safe_dump(mutated, sort_keys=False).encode()
                except (yaml.YAMLError, RecursionError, ValueError):
                    yield src, kind, text.encode()
                continue
        kind, data = _textual(text, rng)
        yield src, kind, data


@dataclass
class Outcome:
    kind: str
    status: str  # "ok" (validated, compiled, ran a batch), "error" (exit 2, positions), "FAIL ..."
    seconds: float
    rss_mb: float  # the process's peak resident memory after this run
    grew_mb: float  # how much this run raised that peak
    source: str = ""


POSITION = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): ")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(path: Path, kind: str, trust: bool = False) -> Outcome:
    """Validate `path` as the CLI does; if it validates, compile it and run one batch."""
    import dyngraph as dg
    from dyngraph.cli import main

    t0, peak0 = time.perf_counter(), _peak_mb()
    err = io.StringIO()
    status = "ok"
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["validate", str(path)] + (["--trust-imports"] if trust else []))
        if rc == 2:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            bad = [
                ln
                for ln in lines
                if not ln.startswith("... and ")
                and not ((m := POSITION.match(ln)) and int(m["line"]) >= 1)
            ]
            status = "error" if lines and not bad else f"FAIL no position: {bad[:1] or 'empty'}"
        elif rc == 0:
            model = dg.compile(str(path), backend="none", trust_imports=trust).eval()
            inp = model.spec.input
            x = (
                torch.full((3, *inp.shape), 1 if inp.pad_id != 1 else 0)
                if inp.dtype == "int64"
                else torch.randn(3, *inp.shape)
            )
            out = model(x)
            assert out.logits.shape[0] == 3
            status = "ok"
        else:
            status = f"FAIL exit {rc}"
    except BaseException as e:  # noqa: BLE001 - a traceback is what the fuzz looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        status = f"FAIL {type(e).__name__}: {str(e)[:200]} | {traceback.format_exc().splitlines()[-3][:200]}"
    peak = _peak_mb()
    return Outcome(kind, status, time.perf_counter() - t0, peak, peak - peak0)


def run(n: int, seed: int = 0, folder: Path | None = None) -> list[Outcome]:
    """Run `n` mutations in this process (models limited to MODEL_BYTES while it runs)."""
    from dyngraph.runtime import kernels

    kernels.load()  # built once per machine (~25 s): not a cost of any mutation
    folder = Path(folder or tempfile.mkdtemp(prefix="dyngraph-fuzz-"))
    saved = os.environ.get("DYNGRAPH_MAX_MODEL_BYTES")
    os.environ["DYNGRAPH_MAX_MODEL_BYTES"] = str(MODEL_BYTES)
    out = []
    try:
        for i, (src, kind, data) in enumerate(mutations(n, seed)):
            path = folder / f"m{i:05d}_{src.stem}.yaml"
            path.write_bytes(data)
            out.append(run_one(path, kind))
            out[-1].source = src.stem
            path.unlink()
    finally:
        if saved is None:
            os.environ.pop("DYNGRAPH_MAX_MODEL_BYTES", None)
        else:
            os.environ["DYNGRAPH_MAX_MODEL_BYTES"] = saved
    return out


def table(outcomes: list[Outcome]) -> str:
    """One row per kind of mutation: how each ended, the slowest run, the most memory one added."""
    by: dict[str, Counter] = defaultdict(Counter)
    slow: dict[str, float] = defaultdict(float)
    grew: dict[str, float] = defaultdict(float)
    for o in outcomes:
        by[o.kind]["fail" if o.status.startswith("FAIL") else o.status] += 1
        slow[o.kind] = max(slow[o.kind], o.seconds)
        grew[o.kind] = max(grew[o.kind], o.grew_mb)
    by["**all**"] = sum(by.values(), Counter())
    slow["**all**"], grew["**all**"] = max(slow.values()), max(grew.values())
    rows = [
        "| mutation | runs | exit 2 at a line | validated, compiled, ran a batch | failures "
        "| slowest (s) | most memory added (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in sorted(by, key=lambda k: (k == "**all**", k)):
        c = by[k]
        rows.append(
            f"| {k} | {sum(c.values())} | {c['error']} | {c['ok']} | {c['fail']} "
            f"| {slow[k]:.2f} | {grew[k]:.0f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the outcomes as JSON only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    outcomes = run(args.n, args.seed)
    if args.json:
        print(json.dumps([o.__dict__ for o in outcomes]))
        return 0
    print(table(outcomes))
    fails = [o for o in outcomes if o.status.startswith("FAIL")]
    for o in fails[:30]:
        print(f"{o.source} {o.kind}: {o.status}")
    print(
        f"{len(outcomes)} mutations in {time.perf_counter() - t0:.0f} s; slowest {max(o.seconds for o in outcomes):.2f} s; "
        f"peak RSS {max(o.rss_mb for o in outcomes):.0f} MB; {len(fails)} failures"
    )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
