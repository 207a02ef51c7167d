"""Shared helpers for the scripts in ``benchmarks/``: timing, tables, machine, JSON.

Import it from a benchmark script run as ``python benchmarks/<name>.py`` (the script's
directory is then on ``sys.path``)::

    from _common import describe_machine, format_machine, time_jitted, format_table, dump_json

Timing protocol (:func:`time_jitted`), the same for every benchmark so numbers compare:

1. ``jax.jit(fun).lower(*args).compile()`` — timed and reported as ``compile_s``;
2. one untimed warm-up call of the compiled function (``first_run_s`` is still recorded);
3. up to ``repeats`` timed calls, each ended by ``jax.block_until_ready``; it stops early
   once ``min_repeats`` calls are done and their total exceeds ``max_seconds``.

Quote ``median_s``: the machine may be shared, and the median is robust to the odd slow
call. Everything here is pure Python + JAX; no benchmark peer (jaxopt, ...) is imported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import jax

__all__ = ["Timing", "time_jitted", "describe_machine", "format_machine", "format_table",
           "fmt_ms", "fmt_err", "dump_json"]


@dataclass
class Timing:
    """Result of :func:`time_jitted`; all times in seconds."""

    compile_s: float
    first_run_s: float
    times_s: list = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median_s, repeats=self.repeats)
        return d


def time_jitted(fun: Callable, *args, repeats: int = 5, min_repeats: int = 3,
                max_seconds: float = 10.0, static_argnums=()) -> tuple[Timing, Any]:
    """Compile ``jax.jit(fun)`` for ``args``, warm it up, and time it (see module doc).

    Returns ``(Timing, output of the last call)``. ``min_repeats`` is clipped to
    ``repeats``, so ``repeats=1`` times exactly one call.
    """
    jitted = jax.jit(fun, static_argnums=static_argnums)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    dyn_args = [a for i, a in enumerate(args) if i not in set(static_argnums)]

    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*dyn_args))
    first = time.perf_counter() - t0

    timing = Timing(compile_s, first)
    min_repeats = min(min_repeats, repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*dyn_args))
        timing.times_s.append(time.perf_counter() - t0)
        if i + 1 >= min_repeats and sum(timing.times_s) > max_seconds:
            break
    return timing, out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """CPU model, core counts, load, Python/jax/jaxlib versions, JAX backend and devices."""
    import jaxlib

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1_5_15": load,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.read("jax_enable_x64")),
        "platform": platform.platform(),
    }


def format_machine(m: Optional[dict] = None) -> str:
    """One-paragraph, human-readable :func:`describe_machine`."""
    m = describe_machine() if m is None else m
    load = m["load_average_1_5_15"]
    load_s = "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)
    return (f"machine: {m['cpu_model']}, {m['cpus_usable']} usable of {m['cpu_count']} CPUs, "
            f"load avg {load_s}\n"
            f"software: python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
            f"backend {m['backend']} ({', '.join(m['devices'])}), float64 {'on' if m['x64'] else 'off'}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 align: Optional[str] = None) -> str:
    """Plain-text table; ``align`` is one char per column, ``l`` or ``r`` (default: l then r)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt_ms(seconds: Optional[float]) -> str:
    """Seconds as milliseconds with ~3 significant digits."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_err(err: Optional[float]) -> str:
    return "-" if err is None else f"{err:.1e}"


def dump_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON (numpy/jax scalars converted), creating parent dirs."""

    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=default)
        f.write("\n")
