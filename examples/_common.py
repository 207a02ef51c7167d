"""Shared bits of the example scripts (argument parsing, output folder, timing)."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=pathlib.Path, default=REPO / "out",
                   help="folder for the figure (default: out/ in the repository)")
    return p


def out_dir(path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Timer:
    """Prints how long each stage took (wall clock, compile included)."""

    def __init__(self):
        self.t0 = self.t = time.perf_counter()

    def __call__(self, what: str) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        print(f"  [{dt:6.2f} s] {what}", flush=True)
        return dt

    def total(self) -> float:
        return time.perf_counter() - self.t0


def headless():
    """Non-interactive matplotlib (the examples only write files)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.stdout.reconfigure(line_buffering=True)


def save_figure(fig, out: pathlib.Path, name: str, timer: "Timer", dpi: int = 110) -> pathlib.Path:
    """Write ``fig`` as ``out/name``, report it and the script's total wall time."""
    path = out / name
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
    print(f"total {timer.total():.1f} s")
    return path


def median_seconds(fun, *args, repeats=3):
    """Median wall time of ``fun(*args)`` (compiled and warmed up beforehand by the caller)."""
    import jax
    import numpy as np

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fun(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
