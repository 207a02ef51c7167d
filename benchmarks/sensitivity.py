"""Benchmark: sensitivities of relaxed structures, mdsens vs unrolling vs JAXopt vs FD.

Run (jaxopt lives only in the benchmark venv; its columns are skipped without it)::

    .venv-bench/bin/python benchmarks/sensitivity.py          # small sizes
    .venv-bench/bin/python benchmarks/sensitivity.py --full   # N up to 1e5 / 1e4

On the same relaxed structures (2D binary soft-sphere packings, φ = 0.9; diamond Si with
a vacancy under Stillinger-Weber, 0.02 Å random displacements relaxed back) it times, as medians of
steady-state calls (compile excluded, reported separately):

* one relaxation (mdsens FIRE, fmax 1e-10);
* mdsens forward: full dR*/dθ for one parameter (soft spheres: the small diameter;
  SW: λ) — one CG solve on the deflated Hessian ("fwd"), and the same with the default
  Hessian stability check first ("fwd+check": saddles, rattlers, λ_min);
* mdsens reverse: d/dθ of a scalar observable O = Σ w_i·R_i (one solve);
* the same gradient by reverse-mode through jax-md FIRE unrolled for the same number
  of steps (only while N·steps is small);
* JAXopt ``custom_root`` (no null-space handling) for the scalar gradient (``solve_cg``,
  tol 1e-10), and the full Jacobian via ``jacrev`` with its default solve (normal-equation
  CG) (small N only);
* central finite differences (two re-relaxations);

and every method's relative error against the dense pseudo-inverse (N·d ≤ 2048) or the
FD reference. Then elastic constants: mdsens vs jax-md ``athermal_moduli``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.md.elastic import make_elastic_constants  # noqa: E402
from mdsens.md.potentials import SoftSphere, StillingerWeber  # noqa: E402
from mdsens import make_relax  # noqa: E402
from mdsens.md.sensitivity import make_observable_gradient, make_sensitivity  # noqa: E402

try:
    from _common import format_machine, format_table
except ImportError:  # pragma: no cover
    format_machine = lambda: ""  # noqa: E731
    format_table = None

try:
    import jaxopt
except ImportError:
    jaxopt = None

FMAX = 1e-10
#: Iteration cap per JAXopt normal-CG solve in the full-Jacobian (jacrev) column.
JAXOPT_JACREV_MAXITER = 500


def _failure(exc) -> str:
    """One-line reason for a method that refused (e.g. an undeclared soft mode)."""
    text = str(exc)
    for marker in ("LinearSolveError", "SaddlePointError"):
        if marker in text:
            return marker
    return type(exc).__name__


def median_time(fun, repeats=3):
    fun()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fun())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def soft_packing(n, seed=0):
    rng = np.random.default_rng(seed)
    species = np.array([0] * (n // 2) + [1] * (n - n // 2))
    diam = np.array([1.0, 1.4])
    L = np.sqrt(np.sum(np.pi * (diam[species] / 2) ** 2) / 0.9)
    system = ms.System(rng.uniform(0, L, (n, 2)), cell=np.eye(2) * L, species=species,
                       symbols=("A", "B"), pbc=True)
    pot = SoftSphere(sigma={"A": 1.0, "B": 1.4})
    t = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    t["sigma"] = np.array([[1.0, 0.5], [0.5, 0.0]])
    return "soft-sphere 2D", system, pot, t, 1e-5


def si_crystal(n_rep, seed=0):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.431, cubic=True).repeat((n_rep,) * 3)
    # A vacancy: in the perfect crystal dR*/dλ vanishes by symmetry, so errors relative
    # to it would be meaningless.
    del atoms[0]
    atoms.positions += 0.02 * np.random.default_rng(seed).normal(size=atoms.positions.shape)
    pot = StillingerWeber()
    t = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    t["lam"] = np.asarray(1.0)
    # |dR*/dλ| is only ~6e-6 Å: a step of 1e-5 moves atoms by less than the relaxation's
    # own error (fmax / λ_min ~ 1e-10 Å) and the re-relaxation stops at step 0. At 0.05
    # (λ = 21) the signal is ~3e-7 Å and the O(h²) error ~(h/λ)² ~ 6e-6.
    return "SW Si + vacancy", ms.System.from_ase(atoms), pot, t, 0.05


def add(params, t, h):
    return {k: jnp.asarray(params[k] + h * np.asarray(t[k]), jnp.float64) for k in params}


def bench_one(label, system, pot, tangent, fd_step, *, unroll_max, jaxopt_max, jacrev_max):
    row = {"system": label, "N": system.n_atoms}
    relax_fn = make_relax(pot, system)
    t0 = time.perf_counter()
    res = relax_fn(system, fmax=FMAX, max_steps=200_000)
    row["relax_first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = relax_fn(system, fmax=FMAX, max_steps=200_000)
    row["relax_s"] = time.perf_counter() - t0
    row["steps"] = res.steps
    n, d = res.system.positions.shape
    w = jnp.asarray(np.random.default_rng(1).normal(size=(n, d)))
    w = w - w.mean(0)  # translation-invariant observable
    observable = lambda R, p, c: jnp.sum(w * R)  # noqa: E731
    params = pot.params

    # mdsens forward (one direction) and reverse (scalar observable)
    sens = make_sensitivity(pot, res.system, wrt={"theta": tangent}, stability=False)
    t0 = time.perf_counter()
    S = sens(res)
    row["fwd_first_s"] = time.perf_counter() - t0
    row["fwd_s"] = median_time(lambda: sens(res).dpositions)
    dR = S.dpositions[0]
    # The default ms.sensitivity path: the same solve after the Hessian stability check
    # (saddle refusal, rattlers by probing, λ_min for the error estimate).
    sens_checked = make_sensitivity(pot, res.system, wrt={"theta": tangent}, stability=True)
    try:
        sens_checked(res)
        row["fwd_checked_s"] = median_time(lambda: sens_checked(res).dpositions)
    except Exception as exc:
        row["fwd_checked_failed"] = _failure(exc)
    # Reverse mode with the stability check (soft modes such as rattlers must join the
    # null space, or an observable touching them makes CG break down): its time includes
    # the Hessian eigen-analysis (dense up to 2000 dof, LOBPCG above).
    grad_fn = make_observable_gradient(pot, res.system, observable, stability=True)
    try:
        g = grad_fn(res)
        row["rev_s"] = median_time(lambda: grad_fn(res)["sigma" if "sigma" in g else "lam"])
        rev = float(sum(np.sum(np.asarray(g[k]) * np.asarray(tangent[k])) for k in g))
    except Exception as exc:  # a refused solve is a result: record it, keep measuring
        row["rev_failed"] = _failure(exc)
        rev = float("nan")
    fwd_obs = float(np.sum(np.asarray(w) * dR))

    # reference: dense pinv when affordable, else central FD of re-relaxations
    E = pot.energy_fn(res.system)
    nb = pot.neighbor_list(res.system) if res.neighbor is not None else None  # as relax chose
    cell = res.system.cell
    if n * d <= 2048:
        H = jax.hessian(lambda x: E(x, params, cell, nb))(res.system.positions).reshape(n * d, n * d)
        gr = jax.grad(lambda x, p: E(x, p, cell, nb))
        tj = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tangent)
        b = jax.jvp(lambda p: gr(res.system.positions, p), (params,), (tj,))[1].ravel()
        ref = (-np.linalg.pinv(np.asarray(H), rcond=1e-10, hermitian=True) @ np.asarray(b)).reshape(n, d)
        row["ref"] = "pinv"
    else:
        ref = None
        row["ref"] = "FD"
    h = fd_step
    row["fd_step"] = h
    t0 = time.perf_counter()
    Rp = relax_fn(res.system, params=add(params, tangent, h), fmax=FMAX, max_steps=200_000).system.positions
    Rm = relax_fn(res.system, params=add(params, tangent, -h), fmax=FMAX, max_steps=200_000).system.positions
    row["fd_s"] = time.perf_counter() - t0
    D = np.asarray(Rp) - np.asarray(Rm)
    frac = np.linalg.solve(np.asarray(cell).T, D.T).T
    fd = ((frac - np.round(frac)) @ np.asarray(cell)) / (2 * h)
    fd = fd - fd.mean(0)
    if ref is None:
        ref = fd
    ref_obs = float(np.sum(np.asarray(w) * ref))
    nref = np.linalg.norm(ref)
    row["fwd_err"] = float(np.linalg.norm(dR - ref) / nref)
    row["rev_err"] = abs(rev - ref_obs) / abs(ref_obs) if np.isfinite(rev) else None
    row["fwd_rev_obs_diff"] = abs(rev - fwd_obs) / abs(ref_obs) if np.isfinite(rev) else None
    row["fd_err"] = float(np.linalg.norm(fd - ref) / nref) if row["ref"] == "pinv" else 0.0

    # Unrolled FIRE: reverse mode through plain jax-md FIRE (its default time steps), run
    # for as many steps as it needs to reach the same fmax from the same start, so that
    # it differentiates the same minimum.
    if n * res.steps <= unroll_max:
        from jax_md import minimize

        def fire_fns(p):
            U = lambda R, **kw: E(R, p, cell, nb)  # noqa: E731
            shift = lambda R, dR, **kw: R + dR  # noqa: E731
            return minimize.fire_descent(U, shift)

        init0, apply0 = fire_fns(params)
        cap = 20 * int(res.steps)

        @jax.jit
        def steps_to_converge(R0):
            def cond(c):
                st, k = c
                return (jnp.max(jnp.linalg.norm(st.force, axis=1)) >= FMAX) & (k < cap)

            return jax.lax.while_loop(cond, lambda c: (apply0(c[0]), c[1] + 1), (init0(R0), 0))[1]

        steps = int(steps_to_converge(system.positions))
        row["unroll_steps"] = steps

        def unrolled(theta):
            p = {k: jnp.asarray(params[k], jnp.float64) + theta * jnp.asarray(tangent[k], jnp.float64)
                 for k in params}
            init, apply = fire_fns(p)
            state = jax.lax.scan(lambda st, _: (apply(st), None), init(system.positions), None, length=steps)[0]
            return jnp.sum(w * state.position)

        ug = jax.jit(jax.grad(unrolled))
        row["unroll_s"] = median_time(lambda: ug(0.0), repeats=1)
        row["unroll_err"] = abs(float(ug(0.0)) - ref_obs) / abs(ref_obs)

    # JAXopt custom_root (no null-space handling; CG on the singular Hessian)
    if jaxopt is not None and n <= jaxopt_max:
        R_star = res.system.positions
        F = lambda x, theta: jax.grad(lambda y: E(y, add_theta(theta), cell, nb))(x)  # noqa: E731

        def add_theta(theta):
            return {k: jnp.asarray(params[k], jnp.float64) + theta * jnp.asarray(tangent[k], jnp.float64)
                    for k in params}

        @jaxopt.implicit_diff.custom_root(F, solve=functools.partial(jaxopt.linear_solve.solve_cg, tol=1e-10))
        def solver(init, theta):
            return R_star

        jo = jax.jit(jax.grad(lambda th: jnp.sum(w * solver(None, th))))
        row["jaxopt_s"] = median_time(lambda: jo(0.0))
        row["jaxopt_err"] = abs(float(jo(0.0)) - ref_obs) / abs(ref_obs)
        if n <= jacrev_max:
            # The full Jacobian as a JAXopt user would get it: jacrev through custom_root
            # with its default solve (CG on the normal equations). solve_cg here would run
            # every one of the N·d singular solves to maxiter.
            # Capped at JAXOPT_JACREV_MAXITER iterations per solve: with the default cap
            # (10·N·d) the singular solves never stop early and N = 128 took > 9 min.
            normal_cg = functools.partial(jaxopt.linear_solve.solve_normal_cg, maxiter=JAXOPT_JACREV_MAXITER)

            @jaxopt.implicit_diff.custom_root(F, solve=normal_cg)
            def solver_default(init, theta):
                return R_star

            jr = jax.jit(jax.jacrev(lambda th: solver_default(None, th)))
            row["jaxopt_jacrev_s"] = median_time(lambda: jr(0.0), repeats=1)
            J = np.asarray(jr(0.0))
            J = J - J.mean(0)
            row["jaxopt_jacrev_err"] = float(np.linalg.norm(J - ref) / nref)
    return row, res


def bench_elastic(system, pot):
    from jax_md import elasticity

    relax_fn = make_relax(pot, system)
    res = relax_fn(system, fmax=FMAX)
    elastic_fn = make_elastic_constants(pot, res.system, stability=False)
    t0 = time.perf_counter()
    C = elastic_fn(res)
    first = time.perf_counter() - t0
    t_ms = median_time(lambda: elastic_fn(res).relaxed, repeats=3)

    E = pot.energy_fn(res.system, neighbor_list=False)
    cell = jnp.asarray(res.system.cell)

    def energy_fn(s, perturbation=None, **kw):
        R = s @ cell
        if perturbation is None:
            return E(R, pot.params, cell)
        return E(R @ perturbation.T, pot.params, cell @ perturbation.T)

    s = jnp.asarray(np.asarray(res.system.fractional_positions))
    am = jax.jit(lambda s: elasticity.athermal_moduli(energy_fn, tether_strength=1e-12, cg_tol=1e-12)(s, cell.T))
    t0 = time.perf_counter()
    C4 = am(s).block_until_ready()
    am_first = time.perf_counter() - t0
    t_am = median_time(lambda: am(s), repeats=3)
    V = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    ref = np.array([[C4[a, b, c, d] for (c, d) in V] for (a, b) in V])
    return {"N": system.n_atoms, "mdsens_first_s": first, "mdsens_s": t_ms,
            "athermal_first_s": am_first, "athermal_s": t_am, "athermal/mdsens": t_am / t_ms,
            "max_rel_diff": float(np.abs(C.relaxed - ref).max() / np.abs(ref).max()),
            "C44_relaxed_GPa": float(C.to_gpa().relaxed[3, 3])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="N up to 1e5 (soft spheres) and 1e4 (SW)")
    ap.add_argument("--soft-sizes", type=int, nargs="*", help="soft-sphere N values (overrides the default)")
    ap.add_argument("--si-reps", type=int, nargs="*", help="SW diamond supercell repeats (8·r³ atoms)")
    ap.add_argument("--no-unroll", action="store_true", help="skip the unrolled-FIRE column")
    ap.add_argument("--no-jaxopt", action="store_true", help="skip the JAXopt columns")
    ap.add_argument("--no-elastic", action="store_true", help="skip the elastic-constants comparison")
    args = ap.parse_args()
    soft_sizes = [128, 512, 2048] + ([8192, 32768, 100_000] if args.full else [])
    si_reps = [2, 3] + ([5, 8, 14] if args.full else [])  # 64, 216 (, 1000, 4096, 21952)
    if args.soft_sizes is not None:
        soft_sizes = args.soft_sizes
    if args.si_reps is not None:
        si_reps = args.si_reps
    unroll_scale = 0 if args.no_unroll else 1
    if args.no_jaxopt:
        global jaxopt
        jaxopt = None
    print(format_machine())
    print(f"jaxopt: {'available' if jaxopt is not None else 'missing (columns skipped)'}; "
          f"jaxopt jacrev: default solve (normal-equation CG), maxiter {JAXOPT_JACREV_MAXITER} per solve")
    rows = []
    for n in soft_sizes:
        rows.append(bench_one(*soft_packing(n), unroll_max=1e6 * unroll_scale, jaxopt_max=2048, jacrev_max=128)[0])
        print(rows[-1], flush=True)
    for r in si_reps:
        rows.append(bench_one(*si_crystal(r), unroll_max=5e4 * unroll_scale, jaxopt_max=216, jacrev_max=64)[0])
        print(rows[-1], flush=True)

    def ms_(x):
        return "" if x is None else f"{1e3 * x:.4g}"

    def e_(x):
        return "" if x is None else f"{x:.1e}"

    headers = ["system", "N", "steps", "relax ms", "fwd ms", "fwd/relax", "fwd+check ms", "rev ms", "unroll ms",
               "jaxopt ms", "jaxopt jacrev ms", "FD ms", "ref", "fwd err", "rev err", "unroll err",
               "jaxopt err", "jacrev err", "FD err"]
    table = []
    for r in rows:
        table.append([r["system"], r["N"], r["steps"], ms_(r["relax_s"]), ms_(r["fwd_s"]),
                      f"{r['fwd_s'] / r['relax_s']:.2%}", (ms_(r.get("fwd_checked_s")) or r.get("fwd_checked_failed", "")),
                      (ms_(r.get("rev_s")) or r.get("rev_failed", "")), ms_(r.get("unroll_s")),
                      ms_(r.get("jaxopt_s")), ms_(r.get("jaxopt_jacrev_s")), ms_(r["fd_s"]), r["ref"],
                      e_(r["fwd_err"]), e_(r["rev_err"]), e_(r.get("unroll_err")), e_(r.get("jaxopt_err")),
                      e_(r.get("jaxopt_jacrev_err")), e_(r["fd_err"]) if r["ref"] == "pinv" else "(ref)"])
    print()
    if format_table:
        print(format_table(headers, table))
    else:
        print(headers)
        for t in table:
            print(t)
    if args.no_elastic:
        return
    print("\nelastic constants, SW Si (mdsens relaxed-ion vs jax-md athermal_moduli):")
    for rep in [2]:
        _, system, pot, _, _ = si_crystal(rep)
        print(bench_elastic(system, pot))


if __name__ == "__main__":
    main()
