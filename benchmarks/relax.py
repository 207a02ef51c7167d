"""Relaxation time: mdsens (L-BFGS, FIRE) vs ASE (FIRE, BFGS) with ASE's own LJ calculator vs plain jax-md FIRE.

    python benchmarks/relax.py                 # N = 107, 255, 499, 863 (a few minutes)
    python benchmarks/relax.py --large         # adds N = 2047, 3999, 10975
    python benchmarks/relax.py --sizes 3 4 --json out.json

System: fcc argon (a = 5.26 Å) of n×n×n conventional cells with one atom removed
(N = 4n³ − 1), every atom displaced by a Gaussian of σ = 0.05 Å (seed 0).
Potential: Lennard-Jones σ = 3.4 Å, ε = 0.0104 eV with ASE's smooth cutoff r_c = 7.5 Å,
r_o = 6.0 Å (small enough for the 3×3×3 box's minimum image), identical in all codes.
Criterion: max atomic |F| < fmax (default 1e-5 eV/Å) everywhere.

Contenders:

* **mdsens** ``make_relax(pot, system)`` (the default L-BFGS, automatic neighbor lists
  from N = 500, final confirmation with a fresh list): *compile+run* is the first call,
  *run* the median of later calls of the same compiled function; the same with
  ``minimizer="fire"`` for the FIRE column.
* **jax-md** plain ``minimize.fire_descent`` with jax-md's defaults (dt_start 0.1,
  dt_max 0.4, unit mass) and its ``lennard_jones_pair``/``lennard_jones_neighbor_list``
  on ``space.periodic`` — what a jax-md user writes — inside one jitted
  ``lax.while_loop`` with the same criterion; timed by ``_common.time_jitted``
  (compile apart, warm-up, median). Neighbor-list overflow is checked afterwards.
* **ASE** ``FIRE`` and ``BFGS`` with ``ase.calculators.lj.LennardJones(smooth=True)``:
  no compile; median of the runs; numpy BLAS single-threaded (set at import; faster
  than threaded BLAS on a shared 2-core machine). BFGS is O(N³) per step (dense Hessian
  diagonalization) and is skipped above ``--bfgs-max-n``; ASE runs are capped at
  ``--ase-max-steps`` and skipped above ``--ase-max-n`` (a note says so).

The table reports median wall times in seconds, steps to the same fmax, the final
energies' spread across codes (same minimum?), and time ratios against mdsens *run*.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# ASE's BFGS diagonalizes a 3N×3N matrix every step; multi-threaded OpenBLAS thrashes on a
# small shared machine (measured 30x slower under load), so give ASE single-threaded BLAS,
# its best case here. Must be set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import describe_machine, dump_json, format_machine, format_table, time_jitted  # noqa: E402

import mdsens  # noqa: E402,F401  (float64)
from mdsens.md.potentials import LennardJones  # noqa: E402
from mdsens import make_relax  # noqa: E402
from mdsens.md.system import System  # noqa: E402

SIGMA, EPS, RC, RO, A = 3.4, 0.0104, 7.5, 6.0, 5.26


def make_atoms(n, seed=0, rattle=0.05):
    from ase.build import bulk

    atoms = bulk("Ar", "fcc", a=A, cubic=True).repeat(n)
    del atoms[0]
    atoms.positions += np.random.default_rng(seed).normal(scale=rattle, size=atoms.positions.shape)
    return atoms


def ase_calc():
    from ase.calculators.lj import LennardJones as AseLJ

    return AseLJ(sigma=SIGMA, epsilon=EPS, rc=RC, ro=RO, smooth=True)


def fmax_of(forces):
    return float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1).max()))


# ---------------------------------------------------------------------------- mdsens
def bench_mdsens(atoms, fmax, repeats, minimizer="lbfgs"):
    system = System.from_ase(atoms)
    pot = LennardJones(sigma=SIGMA, epsilon=EPS, r_cutoff=RC, r_onset=RO)
    t0 = time.perf_counter()
    fn = make_relax(pot, system, minimizer=minimizer)
    res = fn(system, fmax=fmax, max_steps=100_000, progress=False)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn(system, fmax=fmax, max_steps=100_000, progress=False)
        times.append(time.perf_counter() - t0)
    return dict(compile_run_s=first, run_s=float(np.median(times)), steps=res.steps,
                energy=float(res.energy), fmax=res.fmax, converged=res.converged)


# ---------------------------------------------------------------------- plain jax-md
def bench_jaxmd(atoms, fmax, max_steps, use_nl):
    from jax_md import energy, minimize, space

    L = float(atoms.cell[0, 0])
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731  (jax-md downcasts weak floats)
    displacement, shift = space.periodic(f64(L))
    R0 = jnp.asarray(atoms.positions % L)
    kw = dict(sigma=f64(SIGMA), epsilon=f64(EPS), r_onset=f64(RO / SIGMA), r_cutoff=f64(RC / SIGMA))
    if use_nl:
        neighbor_fn, energy_fn = energy.lennard_jones_neighbor_list(displacement, f64(L), **kw)
        nbrs0 = neighbor_fn.allocate(R0)
    else:
        energy_fn = energy.lennard_jones_pair(displacement, **kw)
        nbrs0 = None
    init, apply = minimize.fire_descent(energy_fn, shift)  # jax-md defaults

    def relax(R, nbrs):
        kwargs = {} if nbrs is None else {"neighbor": nbrs}
        state = init(R, **kwargs)

        def fm(s):
            return jnp.sqrt(jnp.max(jnp.sum(s.force**2, axis=1)))

        def cond(c):
            s, nb, i = c
            return (i < max_steps) & (fm(s) >= fmax)

        def body(c):
            s, nb, i = c
            if nb is None:
                return apply(s), nb, i + 1
            nb = nb.update(s.position)
            return apply(s, neighbor=nb), nb, i + 1

        s, nb, i = jax.lax.while_loop(cond, body, (state, nbrs, jnp.zeros((), jnp.int32)))
        e = energy_fn(s.position) if nb is None else energy_fn(s.position, neighbor=nb)
        overflow = jnp.zeros((), bool) if nb is None else nb.did_buffer_overflow
        return e, fm(s), i, overflow

    timing, (e, fm, steps, overflow) = time_jitted(relax, R0, nbrs0, repeats=3, min_repeats=1, max_seconds=30)
    if bool(overflow):
        return dict(note="jax-md neighbor list overflowed (result invalid)")
    return dict(compile_run_s=timing.compile_s + timing.first_run_s, run_s=timing.median_s, steps=int(steps),
                energy=float(e), fmax=float(fm), converged=bool(float(fm) < fmax))


# ------------------------------------------------------------------------------- ASE
def bench_ase(atoms, optimizer, fmax, max_steps, repeats):
    from ase.optimize import BFGS, FIRE

    cls = {"FIRE": FIRE, "BFGS": BFGS}[optimizer]
    times, out = [], None
    for _ in range(repeats):
        a = atoms.copy()
        a.calc = ase_calc()
        t0 = time.perf_counter()
        opt = cls(a, logfile=None)
        converged = bool(opt.run(fmax=fmax, steps=max_steps))
        times.append(time.perf_counter() - t0)
        out = dict(steps=opt.nsteps, energy=float(a.get_potential_energy()), fmax=fmax_of(a.get_forces()),
                   converged=converged)
    out.update(run_s=float(np.median(times)), compile_run_s=None)
    return out


# ------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", help="n for n×n×n cells (N = 4n³ − 1)")
    ap.add_argument("--large", action="store_true", help="add n = 8, 10, 14 (N = 2047, 3999, 10975)")
    ap.add_argument("--fmax", type=float, default=1e-5, help="force criterion, eV/Å (default 1e-5)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats for mdsens / small ASE runs")
    ap.add_argument("--ase-max-steps", type=int, default=5000)
    ap.add_argument("--ase-max-n", type=int, default=4000, help="skip ASE above this N")
    ap.add_argument("--bfgs-max-n", type=int, default=600, help="skip ASE BFGS above this N (O(N³) steps)")
    ap.add_argument("--json", help="also write the results as JSON")
    args = ap.parse_args(argv)

    sizes = args.sizes or [3, 4, 5, 6]
    if args.large and not args.sizes:
        sizes = sizes + [8, 10, 14]
    machine = describe_machine()
    print(format_machine(machine))
    print(f"fcc Ar + vacancy, rattle 0.05 Å; LJ σ={SIGMA} Å ε={EPS} eV, smooth cutoff rc={RC} Å ro={RO} Å; "
          f"criterion max|F| < {args.fmax:g} eV/Å\n", flush=True)

    results, notes = [], []
    for n in sizes:
        atoms = make_atoms(n)
        N = len(atoms)
        row = {"N": N, "n": n}
        print(f"N={N}: mdsens ...", end="", flush=True)
        row["mdsens"] = bench_mdsens(atoms, args.fmax, args.repeats)
        print(" mdsens FIRE ...", end="", flush=True)
        row["mdsens_fire"] = bench_mdsens(atoms, args.fmax, args.repeats, minimizer="fire")
        print(" jax-md ...", end="", flush=True)
        row["jaxmd"] = bench_jaxmd(atoms, args.fmax, 100_000, use_nl=N >= 500)
        ase_repeats = args.repeats if N <= 300 else 1
        if N <= args.ase_max_n:
            print(" ASE FIRE ...", end="", flush=True)
            row["ase_fire"] = bench_ase(atoms, "FIRE", args.fmax, args.ase_max_steps, ase_repeats)
        else:
            notes.append(f"N={N}: ASE skipped (N > --ase-max-n={args.ase_max_n}; pure-Python LJ calculator).")
        if N <= min(args.bfgs_max_n, args.ase_max_n):
            print(" ASE BFGS ...", end="", flush=True)
            row["ase_bfgs"] = bench_ase(atoms, "BFGS", args.fmax, args.ase_max_steps, ase_repeats)
        else:
            notes.append(f"N={N}: ASE BFGS skipped (N > --bfgs-max-n={args.bfgs_max_n}; dense 3N×3N "
                         "Hessian eigendecomposition every step).")
        print(" done", flush=True)
        results.append(row)

    print()
    print(format_table(*_table(results)))
    print()
    print(format_table(*_ratio_table(results)))
    notes += _convergence_notes(results, args.fmax)
    if notes:
        print()
        for note in notes:
            print("note:", note)
    if args.json:
        dump_json(args.json, {"machine": machine, "fmax": args.fmax, "results": results, "notes": notes})
    return results


def _fmt(x, digits=3):
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if x < 100 else f"{x:.0f}"


def _table(results):
    headers = ["N", "mdsens c+r [s]", "mdsens run [s]", "steps", "mdsens FIRE run [s]", "steps",
               "jax-md c+r [s]", "jax-md run [s]", "steps",
               "ASE FIRE [s]", "steps", "ASE BFGS [s]", "steps", "ΔE max [eV]"]
    rows = []
    for r in results:
        m, mf, j = r["mdsens"], r["mdsens_fire"], r["jaxmd"]
        af, ab = r.get("ase_fire", {}), r.get("ase_bfgs", {})
        energies = [d["energy"] for d in (m, mf, j, af, ab) if d.get("converged")]
        spread = max(energies) - min(energies) if len(energies) > 1 else None
        rows.append([r["N"], _fmt(m["compile_run_s"]), _fmt(m["run_s"]), m["steps"], _fmt(mf["run_s"]), mf["steps"],
                     _fmt(j.get("compile_run_s")), _fmt(j.get("run_s")), j.get("steps", "-"),
                     _fmt(af.get("run_s")), af.get("steps", "-"), _fmt(ab.get("run_s")), ab.get("steps", "-"),
                     "-" if spread is None else f"{spread:.1e}"])
    return headers, rows


def _ratio_table(results):
    headers = ["N", "mdsens FIRE / mdsens run", "jax-md run / mdsens run", "ASE FIRE / mdsens run",
               "ASE BFGS / mdsens run", "ASE FIRE / mdsens c+r"]
    rows = []
    for r in results:
        base = r["mdsens"]["run_s"]
        c_r = r["mdsens"]["compile_run_s"]
        j = r["jaxmd"].get("run_s")
        af = r.get("ase_fire", {}).get("run_s")
        ab = r.get("ase_bfgs", {}).get("run_s")
        rows.append([r["N"], _fmt(r["mdsens_fire"]["run_s"] / base), _fmt(j / base if j else None),
                     _fmt(af / base if af else None), _fmt(ab / base if ab else None),
                     _fmt(af / c_r if af else None)])
    return headers, rows


def _convergence_notes(results, fmax):
    notes = []
    for r in results:
        for key, name in (("mdsens", "mdsens"), ("mdsens_fire", "mdsens FIRE"), ("jaxmd", "jax-md"),
                          ("ase_fire", "ASE FIRE"), ("ase_bfgs", "ASE BFGS")):
            d = r.get(key)
            if d and "note" in d:
                notes.append(f"N={r['N']}: {name}: {d['note']}")
            elif d and not d.get("converged"):
                notes.append(f"N={r['N']}: {name} did NOT reach fmax < {fmax:g} (fmax {d['fmax']:.2e} after "
                             f"{d['steps']} steps); its time is for the capped run.")
    return notes


if __name__ == "__main__":
    main()
