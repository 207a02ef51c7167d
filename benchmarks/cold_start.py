"""Cold start: what a fresh process pays before its first sensitivity.

The workload of issue "speed", as a new user runs it: ``import mdsens``, then
``ms.relax`` (fmax 1e-10) and ``ms.sensitivity`` (all 10 parameters, stability check
included) of Stillinger–Weber diamond Si with a vacancy (N = 215, rattled 0.02 Å), then
both calls again. Each row is a fresh Python process:

* ``no cache``: JAX's persistent compilation cache off;
* ``cache cold``: the cache on, in an empty folder (it is filled by this run);
* ``cache warm``: the same folder again, as a second ``mdsens demo`` would find it.

Reported per row: the import, the first relax and first sensitivity (compilation
included), the second calls, the wall total, the CPU time, and how many programs were
compiled (``jax_log_compiles``). Medians over ``--repeats`` processes.

Run: ``python benchmarks/cold_start.py [--repeats 3]`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from _common import describe_machine, format_machine, format_table

WORKLOAD = r"""
import os, sys, time
t0 = time.perf_counter()
import jax
if os.environ.get("COLD_START_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["COLD_START_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_log_compiles", True)
import numpy as np
import mdsens as ms
from ase.build import bulk
t1 = time.perf_counter()
atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((3, 3, 3))
del atoms[0]
atoms.positions += np.random.default_rng(0).normal(scale=0.02, size=atoms.positions.shape)
system, pot = ms.System.from_ase(atoms), ms.potentials.StillingerWeber()
t2 = time.perf_counter(); r = ms.relax(system, pot, fmax=1e-10)
t3 = time.perf_counter(); s = ms.sensitivity(r, pot)
t4 = time.perf_counter(); r = ms.relax(system, pot, fmax=1e-10)
t5 = time.perf_counter(); s = ms.sensitivity(r, pot)
t6 = time.perf_counter()
print("TIMES", t1 - t0, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0, time.process_time(), flush=True)
"""

COLUMNS = ("import", "relax 1st", "sensitivity 1st", "relax 2nd", "sensitivity 2nd", "total", "CPU")


def run_once(cache_dir):
    env = dict(os.environ)
    env.pop("COLD_START_CACHE", None)
    if cache_dir is not None:
        env["COLD_START_CACHE"] = cache_dir
    out = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True, env=env, timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("TIMES")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"the workload failed:\n{out.stderr[-3000:]}")
    compiles = len(re.findall(r"Compiling ", out.stderr))
    return [float(v) for v in line.split()[1:]], compiles


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (median)")
    args = parser.parse_args(argv)
    print(format_machine(describe_machine()))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label, folder, repeats in (("no cache", None, args.repeats), ("cache cold", cache, 1),
                                       ("cache warm", cache, args.repeats)):
            runs = [run_once(folder) for _ in range(repeats)]
            times = [statistics.median(r[0][i] for r in runs) for i in range(len(COLUMNS))]
            rows.append([label, *(f"{t:.2f}" for t in times), str(runs[0][1])])
    print(format_table(["process", *(f"{c} (s)" for c in COLUMNS), "programs compiled"], rows))


if __name__ == "__main__":
    main()
