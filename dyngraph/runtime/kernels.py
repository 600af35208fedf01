"""The fused decision kernels (kernels.cpp, attention.cpp): built once per machine, used where
they apply.

A decision point of the infer runtime (an exit's criterion, then the positions of the rows that
go on, then gathering those rows of every live value) is 5 to 10 ATen ops from Python, 2–5 µs
each on a CPU: at batch 64 or 1 as much as the unit it decides about. `kernels.cpp` does each
step in one call with plain loops, in a Python module of plain functions (pybind11: 1 µs a
call, where a `torch.ops` call parses its arguments against the op's schema for 2–4 µs). It
is compiled by `torch.utils.cpp_extension` the first time a process asks for it (about 25 s
here; cached under `TORCH_EXTENSIONS_DIR`, by default
`~/.cache/torch_extensions`, and rebuilt when the source changes), i.e. at the first
`dyngraph.compile` on a machine.

They apply to CPU tensors of float32/float64 in infer mode; everything else (CUDA, other
dtypes, dense and train mode, which need autograd) runs the same rules as ATen ops, and so does
everything when they cannot be built (no C++ compiler: a warning says why) or when the
environment sets `DYNGRAPH_KERNELS=0`.

attention.cpp's `rows_attention` (the running tokens' attention after a per-token exit) is
also an op, `torch.ops.dyngraph.rows_attention` (~2 us more a call than pybind11, once per
layer), so that FlopCounterMode and the profiler see it (cost.py counts the pairs it computes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(f) for f in ("kernels.cpp", "attention.cpp")]
# rules of rows_where, as in kernels.cpp (TRUE, NEVER: token_exit only; a bool per row, none)
MAX_PROB_BELOW, ENTROPY_ABOVE, DRAW_AT_LEAST, DRAW_BELOW, AT_LEAST, TRUE, NEVER = range(7)
# rules of choose
ARGMAX, DRAW_BUCKET = range(2)

FLOATS = (torch.float32, torch.float64)


class Ops:
    """The kernels (a module built from kernels.cpp), with the names the runtime calls."""

    def __init__(self, module):
        self.rows_where = module.rows_where
        self.confidence = module.confidence
        self.gather_rows = module.gather_rows
        self.choose = module.choose
        self.copy_rows_ = module.copy_rows_
        self.query_grid = module.query_grid
        self.token_exit = module.token_exit
        self.top_tokens = module.top_tokens
        self.id_range = module.id_range
        self.pad_lengths = module.pad_lengths
        # (None where torch exports no BLAS: the query grid and SDPA then)
        self.query_rows = module.query_rows if module.blas() else None
        self.rows_attention = module.rows_attention if module.blas() else None
        self.file = getattr(module, "__file__", None)  # (an export copies it: runner/fused.py)


_state: dict = {"tried": False, "ops": None, "enabled": True, "per_sample": True}
# at::parallel_for (rows_attention) splits its work over torch's intra-op threads where the
# kernels build with OpenMP (Linux, GCC: torch's own libgomp at run time); serial elsewhere
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def load() -> bool:
    """Build (first time on this machine) and load the kernels; False if they cannot be."""
    if _state["tried"]:
        return _state["ops"] is not None
    _state["tried"] = True
    if os.environ.get("DYNGRAPH_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load as build

        with _ninja_on_path():
            module = build(
                name="dyngraph_kernels",
                sources=[str(p) for p in SOURCES],
                build_directory=str(_build_directory()),
                # -ffp-contract=off: bit-equal to ATen's draws
                extra_cflags=["-O3", "-ffp-contract=off", *_OPENMP],
                extra_ldflags=_OPENMP,
                is_python_module=True,
                verbose=False,
            )
        _state["ops"] = Ops(module)
        _define_ops()
    except Exception as e:  # no compiler, no ninja, a read-only cache: the ATen path still works
        first = (str(e).strip().splitlines() or [""])[0]
        warnings.warn(
            f"dyngraph: the fused decision kernels could not be built ({type(e).__name__}: "
            f"{first}); decisions run as ATen ops, slower at small batches. "
            "Set DYNGRAPH_KERNELS=0 to skip the attempt.",
            stacklevel=2,
        )
    return _state["ops"] is not None


def _define_ops() -> None:
    """`torch.ops.dyngraph.rows_attention`, calling the built kernel (once per process)."""
    if _state["ops"].rows_attention is None or hasattr(torch.ops.dyngraph, "rows_attention"):
        return
    lib = torch.library.Library("dyngraph", "FRAGMENT")
    lib.define(
        "rows_attention(Tensor q, Tensor kv, Tensor pos, Tensor offsets, int heads, int block, "
        "bool causal) -> Tensor"
    )
    lib.impl("rows_attention", _state["ops"].rows_attention, "CPU")
    _state["lib"] = lib  # (the registration lasts as long as the Library object)


@contextlib.contextmanager
def _ninja_on_path():
    """torch's builder runs `ninja` from PATH: add the `ninja` package's, which a virtual
    environment that is not activated leaves out."""
    path = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:  # a system ninja may still be on PATH
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build_directory() -> Path:
    """Where the kernels are built: one folder per torch and Python version, under
    TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). A lock that a killed build left
    behind would make every later build wait for ever: one older than 10 minutes is removed."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"dyngraph_kernels-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    path = Path(root) / tag.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > 600:
            lock.unlink()
    return path


def built_file() -> str | None:
    """The built kernels' file (None where they cannot be built), for an export to copy."""
    return _state["ops"].file if load() else None


def for_device(device: torch.device) -> Ops | None:
    """The kernels for a pass on `device` (built, enabled and a CPU), else None."""
    return _state["ops"] if _state["enabled"] and device.type == "cpu" else None


def ops(t: torch.Tensor) -> Ops | None:
    """The kernels when their float ops apply to `t` (a CPU float32/float64 tensor outside
    autograd), else None."""
    o = for_device(t.device)
    if o is None or t.dtype not in FLOATS or (t.requires_grad and torch.is_grad_enabled()):
        return None
    return o


def applies(t: torch.Tensor) -> bool:
    """Whether the float kernels read `t` as it is (float32/float64, contiguous)."""
    return t.dtype in FLOATS and t.is_contiguous()


def draw_rows(k: Ops, x: torch.Tensor, rule: int, p: float, scale: float) -> torch.Tensor | None:
    """Positions of the rows whose forced draw (`pseudo_uniform` with multiplier `scale`) meets
    `rule` against `p`; None where the kernel does not read `x`."""
    return k.rows_where(x, rule, p, scale) if applies(x) else None


def per_sample(k: Ops | None) -> bool:
    """Whether the running tokens' attention runs per sample (attention.cpp) with kernels `k`."""
    return k is not None and k.query_rows is not None and _state["per_sample"]


@contextlib.contextmanager
def padded_attention():
    """Run the running tokens' attention on the padded query grid (SDPA) for a while, every
    other kernel as it is (tests compare the decision kernels with ATen bit for bit)."""
    before = _state["per_sample"]
    _state["per_sample"] = False
    try:
        yield
    finally:
        _state["per_sample"] = before


@contextlib.contextmanager
def disabled():
    """Run the ATen path for a while (tests compare the two)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before
