"""Batched relaxation: ``ms.relax_batch`` on 1, 2, 4 devices vs a Python loop of ``ms.relax``.

    python benchmarks/batch.py                      # B = 8, 32 packings of N = 128, devices 1, 2, 4
    python benchmarks/batch.py --batch 8 --devices 1 4 --json out.json

System: the paper's 2D binary soft-sphere packing (Blondel et al. 2022, §4, after
jax-md's bubble raft): N = 128, half of diameter D = 0.6 and half of diameter 1,
σ_AB = (1 + D)/2, ε = 1, α = 2, packing fraction 0.98; B random initial conditions
(seeds 0..B−1), relaxed to ``fmax = 1e-8`` with the default minimizer (L-BFGS).

Contenders, each timed as the median of ``--repeats`` calls after one warm-up call
(compilation reported apart as "first call"):

* **loop**: ``for s in systems: ms.relax(s, pot, neighbor_list=False)``, the simple API
  one structure at a time (its compiled program is reused from the second structure on);
* **relax_batch, k devices**: ``ms.relax_batch(systems, pot)`` in a process started
  with ``XLA_FLAGS=--xla_force_host_platform_device_count=k``, so the batch axis is
  sharded over k CPU "devices" with ``jax.sharding``. On a CPU these devices share the
  same cores: the scaling shows the sharding works and what it costs, not what k
  accelerators give. On a GPU host, run with ``--platform gpu``; the devices are then
  real.

The batch's vmapped while-loop runs in lockstep (as many steps as the slowest member),
so its step count is the maximum over the batch, reported beside the loop's total.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def paper_packing(n=128, diameter=0.6, fraction=0.98, seed=0):
    import numpy as np

    import mdsens as ms

    L = float(np.sqrt(n * np.pi * (1 + diameter**2) / 8 / fraction))
    species = np.array([0] * (n // 2) + [1] * (n - n // 2))
    rng = np.random.default_rng(seed)
    system = ms.System(rng.uniform(0, L, (n, 2)), cell=np.eye(2) * L, species=species, symbols=("A", "B"),
                       pbc=True)
    sigma = np.array([[diameter, (1 + diameter) / 2], [(1 + diameter) / 2, 1.0]])
    return system, ms.potentials.SoftSphere(sigma=sigma, epsilon=1.0, alpha=2.0, symbols=("A", "B"))


def _median_time(fun, repeats):
    import statistics

    first_start = time.perf_counter()
    out = fun()
    first = time.perf_counter() - first_start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fun()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def measure(batch, devices, repeats, fmax, loop):
    """Run inside a process whose device count is already set; returns a dict."""
    import jax
    import numpy as np

    import mdsens as ms

    systems, pot = [], None
    for seed in range(batch):
        s, pot = paper_packing(seed=seed)
        systems.append(s)
    row = {"batch": batch, "devices": len(jax.devices()), "platform": jax.devices()[0].platform}
    first, median, out = _median_time(lambda: ms.relax_batch(systems, pot, fmax=fmax, max_steps=50_000),
                                      repeats)
    jax.block_until_ready(out.positions)
    row.update(batch_first_s=first, batch_s=median, batch_steps_max=int(np.max(out.steps)),
               batch_converged=int(np.sum(out.converged)), batch_energy=np.asarray(out.energy).tolist())
    if loop:
        def run_loop():
            return [ms.relax(s, pot, fmax=fmax, max_steps=50_000, neighbor_list=False, progress=False)
                    for s in systems]

        first, median, results = _median_time(run_loop, repeats)
        row.update(loop_first_s=first, loop_s=median, loop_steps_total=sum(r.steps for r in results),
                   loop_energy=[float(r.energy) for r in results])
    return row


def _child(args, devices):
    env = dict(os.environ)
    if args.platform == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--devices", str(devices), "--repeats",
           str(args.repeats), "--fmax", str(args.fmax), "--batch", *map(str, args.batch)]
    if devices == args.devices[0]:
        cmd.append("--loop")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child with {devices} devices failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32], help="batch sizes B")
    ap.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4], help="device counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fmax", type=float, default=1e-8)
    ap.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--json", help="also write the results as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        rows = [measure(b, args.devices[0], args.repeats, args.fmax, args.loop) for b in args.batch]
        print(json.dumps(rows))
        return rows

    sys.path.insert(0, HERE)
    from _common import describe_machine, dump_json, format_machine, format_table

    import mdsens  # noqa: F401  (float64, as in the measuring processes)

    machine = describe_machine()
    print(format_machine(machine))
    print(f"paper packing N = 128 (D = 0.6, φ = 0.98), fmax = {args.fmax:g}; median of {args.repeats}\n",
          flush=True)
    rows = []
    for k in args.devices:
        print(f"{k} device(s) ...", flush=True)
        rows += _child(args, k)

    loop = {r["batch"]: r for r in rows if "loop_s" in r}
    one = {r["batch"]: r["batch_s"] for r in rows if r["devices"] == args.devices[0]}
    table = []
    for r in rows:
        lp = loop.get(r["batch"], {})
        energy_gap = (max(abs(a - b) for a, b in zip(r["batch_energy"], lp["loop_energy"]))
                      if lp else None)
        table.append([r["batch"], r["devices"], f"{r['batch_first_s']:.2f}", f"{r['batch_s']:.3f}",
                      r["batch_steps_max"], f"{r['batch_converged']}/{r['batch']}",
                      f"{lp['loop_s']:.3f}" if lp else "-", lp.get("loop_steps_total", "-"),
                      f"{lp['loop_s'] / r['batch_s']:.2f}" if lp else "-",
                      f"{one[r['batch']] / r['batch_s']:.2f}",
                      "-" if energy_gap is None else f"{energy_gap:.1e}"])
    print()
    print(format_table(["B", "devices", "batch 1st [s]", "batch [s]", "steps (max)", "converged",
                        "loop [s]", "steps (sum)", "loop / batch", f"speed-up vs {args.devices[0]} dev.",
                        "max |ΔE*| [ε]"], table))
    print("\nΔE*: batch vs loop energies of the same seeds; different minima (a packing has many) show as "
          "large values, equal minima as round-off.")
    if args.json:
        dump_json(args.json, {"machine": machine, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
