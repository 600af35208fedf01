"""The machine a benchmark ran on, for its results' header: the same code gives other ratios
on another CPU (its vector unit, its caches), so each results file says which one it was."""

from __future__ import annotations

import platform
from pathlib import Path

#: what a results header says when the benchmark held the heap (`--steady-malloc`)
HEAP_HELD = (
    "glibc's heap held (dg.hold_heap: no pages given back and faulted in again between calls)"
)


def describe() -> str:
    """e.g. 'x86_64, AMD EPYC (family 25, model 17), AVX-512, L3 32 MiB'; on a system without
    /proc/cpuinfo, what `platform` knows."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in info.splitlines())}
    parts = [platform.machine()]
    name = fields.get("model name")
    if name:
        family, model = fields.get("cpu family"), fields.get("model")
        parts.append(f"{name} (family {family}, model {model})" if family else name)
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    parts += [vector] if vector else []
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    size = l3.read_text().strip() if l3.exists() else ""
    if size.endswith("K") and size[:-1].isdigit():  # (sysfs gives KiB: "32768K")
        kib = int(size[:-1])
        parts.append(f"L3 {kib // 1024} MiB" if kib % 1024 == 0 else f"L3 {kib} KiB")
    return ", ".join(parts)
