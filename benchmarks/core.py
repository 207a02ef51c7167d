"""Benchmark of the implicit-differentiation core on ridge regression.

Problem (p features, n samples, scalar ridge λ)::

    x*(λ) = argmin_x ½‖X x − y‖² + ½ λ ‖x‖²,   F(x, λ) = Xᵀ(X x − y) + λ x = 0
    dx*/dλ = −(XᵀX + λI)⁻¹ x*          (closed form, the ground truth)

``n = min(2p, 1000)`` (override with ``--n``): over-determined up to p = 500, square at
p = 1000 and under-determined (where ridge is needed) at p = 10,000, with X capped at
80 MB so one matvec costs at most ~2·10⁷ flops and the default run fits in ~5 minutes
on 2 cores. ``X`` has i.i.d. N(0, 1/n) entries, ``y = X x_true + 0.1 ε``, λ = 1, so
``XᵀX + λI`` has condition number ≲ 20 at every size.

Two inner solvers produce x*, both to ``‖F(x)‖ ≤ 1e-12 ‖F(0)‖``, with ``X`` and ``y``
passed as arguments (not closed over), as a user would:

* **CG** on the normal equations ``(XᵀX + λI) x = Xᵀy`` (mdsens's CG): ≈ 10-30 iterations;
* **GD**, gradient descent with step 1/L: ≈ 60-110 iterations, the regime of a
  relaxation (many cheap steps). Default up to p = 1000 (``--gd-max-p``).

Methods timed for each inner solver:

* **mdsens**: ``mdsens.custom_root(F, solve=cg(tol=1e-10), symmetric=True)``;
  ``jax.jacfwd`` (dx*/dλ, one solve), ``jax.jacrev`` (dx*/dλ, p solves) and
  ``jax.grad`` of the scalar loss ``L = ½‖x*(λ) − x_true‖²`` (one solve). Also the same
  with ``on_failure="ignore"``, which drops the convergence check (a
  ``jax.debug.callback``) to show what it costs.
* **unrolled**: the same inner iterations written with ``lax.fori_loop`` for exactly the
  number of iterations the inner solver needed (so it reaches the same residual),
  differentiated by JAX autodiff in the same three ways.
* **jaxopt** (only if importable; the benchmark venv has it, mdsens never imports it):
  ``jaxopt.implicit_diff.custom_root`` with its default linear solve (normal-equation CG,
  jax's default tol 1e-5) and with ``jaxopt.linear_solve.solve_cg(tol=1e-10)``.
  jaxopt's custom_root is a ``custom_vjp``: reverse mode only; its ``jacfwd`` is tried
  once and reported as unsupported.

Every timed function is jitted and includes the inner solve (a derivative of x* is never
free of computing x*); the "inner ... alone" row gives that part alone. Times are medians of
repeated calls after a separate compile (``lower().compile()``, reported) and one
warm-up call; see ``_common.time_jitted``. Ratios are ``time / time of the mdsens row
(same inner solver) computing the same quantity`` (jacfwd for dx*/dλ, grad for dL/dλ). Errors are relative
(2-norm) against the closed form computed in NumPy (dense solve of the p×p or, for
n < p, the n×n push-through system).

Usage::

    .venv-bench/bin/python benchmarks/core.py                 # default, ~3-5 min on 2 cores
    .venv-bench/bin/python benchmarks/core.py --json out/core.json
    .venv-bench/bin/python benchmarks/core.py --full          # 10 repeats, p = 30,000, GD to 10,000
    python benchmarks/core.py --smoke                          # p = 10, 1 repeat (CI)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mdsens as ms  # noqa: E402  (turns on float64 before any array exists)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from _common import (  # noqa: E402
    describe_machine, dump_json, fmt_err, fmt_ms, format_machine, format_table, time_jitted,
)

try:  # a benchmark peer only; never a dependency of mdsens
    import jaxopt  # noqa: E402
    import jaxopt.implicit_diff  # noqa: E402
    import jaxopt.linear_solve  # noqa: E402
except ImportError:  # pragma: no cover - depends on the venv
    jaxopt = None

INNER_TOL = 1e-12   # inner CG (produces x*)
DIFF_TOL = 1e-10    # implicit-differentiation linear solve (mdsens and jaxopt solve_cg)

GD_MAXITER = 100_000

MDSENS = "mdsens custom_root(solve=cg)"
MDSENS_UNCHECKED = "  same, on_failure='ignore'"
UNROLLED = "unrolled inner solver (autodiff)"
JAXOPT_DEFAULT = "jaxopt custom_root (default solve)"
JAXOPT_CG = "jaxopt custom_root(solve=solve_cg)"

TABLE_HEADERS = ["inner", "quantity", "method", "mode", "median ms", "x mdsens", "compile s", "rel. error", "reps",
                 "note"]


# ----------------------------------------------------------------------------------
# Problem, closed form
# ----------------------------------------------------------------------------------


def make_problem(p, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) / np.sqrt(n)
    x_true = rng.standard_normal(p) / np.sqrt(p)
    y = X @ x_true + 0.1 * rng.standard_normal(n)
    return X, y, x_true


def closed_form(X, y, lam, x_true):
    """x*, dx*/dλ, dL/dλ and the Lipschitz constant L of F from dense float64 NumPy."""
    n, p = X.shape
    if n >= p:
        A = X.T @ X + lam * np.eye(p)
        inv = lambda v: np.linalg.solve(A, v)  # noqa: E731
        lipschitz = float(np.linalg.eigvalsh(A)[-1])
    else:  # (XᵀX + λI)⁻¹ v = (v − Xᵀ (XXᵀ + λI)⁻¹ X v) / λ, an n×n solve
        K = X @ X.T + lam * np.eye(n)
        inv = lambda v: (v - X.T @ np.linalg.solve(K, X @ v)) / lam  # noqa: E731
        lipschitz = float(np.linalg.eigvalsh(K)[-1])
    x = inv(X.T @ y)
    J = -inv(x)
    g = float((x - x_true) @ J)
    return x, J, g, lipschitz


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


# ----------------------------------------------------------------------------------
# Inner solvers: each stops at ‖F(x)‖ ≤ INNER_TOL ‖F(0)‖ (F(0) = −Xᵀy), and has an
# unrolled twin that runs a fixed number of the same iterations under autodiff.
# ----------------------------------------------------------------------------------


def F(x, lam, X, y):
    """Optimality condition of ridge regression: the gradient of the objective."""
    return X.T @ (X @ x - y) + lam * x


def _normal_matvec(lam, X):
    return lambda v: X.T @ (X @ v) + lam * v


def cg_solve(init, lam, X, y):
    """CG on the normal equations (mdsens's own CG); returns ``(x, iterations)``."""
    x, info = ms.linear_solve.cg(_normal_matvec(lam, X), X.T @ y, tol=INNER_TOL, x0=init)
    return x, info.iterations


def cg_unrolled(lam, X, y, iters):
    """Plain CG from zero for a fixed number of iterations, differentiable by autodiff."""
    b = X.T @ y
    matvec = _normal_matvec(lam, X)

    def body(_, state):
        x, r, d, rr = state
        Ad = matvec(d)
        alpha = rr / jnp.vdot(d, Ad)
        x = x + alpha * d
        r = r - alpha * Ad
        rr_new = jnp.vdot(r, r)
        d = r + (rr_new / rr) * d
        return x, r, d, rr_new

    x, *_ = lax.fori_loop(0, iters, body, (jnp.zeros_like(b), b, b, jnp.vdot(b, b)))
    return x


def make_gd(step):
    """Gradient descent ``x ← x − step·F(x)`` (step 1/L), the relax-like inner solver."""

    def solve(init, lam, X, y):
        threshold = INNER_TOL * jnp.linalg.norm(X.T @ y)

        def cond(s):
            return (jnp.linalg.norm(s[1]) > threshold) & (s[2] < GD_MAXITER)

        def body(s):
            x = s[0] - step * s[1]
            return x, F(x, lam, X, y), s[2] + 1

        x, _, k = lax.while_loop(cond, body, (init, F(init, lam, X, y), 0))
        return x, k

    def unrolled(lam, X, y, iters):
        body = lambda _, x: x - step * F(x, lam, X, y)  # noqa: E731
        return lax.fori_loop(0, iters, body, jnp.zeros(X.shape[1], X.dtype))

    return solve, unrolled


def loss_of(x, x_true):
    return 0.5 * jnp.sum((x - x_true) ** 2)


def _modes(sol):
    """jacfwd, jacrev and grad of ``sol(λ, X, y)`` as functions of ``(λ, X, y, x_true)``."""
    return {
        "solve": lambda lam, X, y, t: sol(lam, X, y),
        "jacfwd": lambda lam, X, y, t: jax.jacfwd(sol)(lam, X, y),
        "jacrev": lambda lam, X, y, t: jax.jacrev(sol)(lam, X, y),
        "grad": lambda lam, X, y, t: jax.grad(lambda l: loss_of(sol(l, X, y), t))(lam),
    }


def implicit_modes(decorator, solve):
    """Modes of ``decorator(inner)``, e.g. ``mdsens.custom_root(F, ...)``; x0 = 0."""
    solver = decorator(lambda init, lam, X, y: solve(init, lam, X, y)[0])
    return _modes(lambda lam, X, y: solver(jnp.zeros(X.shape[1], X.dtype), lam, X, y))


DECORATORS = {
    MDSENS: ms.custom_root(F, solve=functools.partial(ms.linear_solve.cg, tol=DIFF_TOL), symmetric=True),
    # The same without the convergence check (one jax.debug.callback per linear solve):
    # shows what the check costs.
    MDSENS_UNCHECKED: ms.custom_root(F, solve=functools.partial(ms.linear_solve.cg, tol=DIFF_TOL),
                                     symmetric=True, on_failure="ignore"),
}
if jaxopt is not None:
    DECORATORS[JAXOPT_DEFAULT] = jaxopt.implicit_diff.custom_root(F)
    DECORATORS[JAXOPT_CG] = jaxopt.implicit_diff.custom_root(
        F, solve=functools.partial(jaxopt.linear_solve.solve_cg, tol=DIFF_TOL))


# ----------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------


def plan(inner, p, args):
    """(method, mode) pairs to time for an inner solver at size p, or a skip reason."""
    rows = [(MDSENS, "jacfwd"), (MDSENS, "jacrev"), (MDSENS_UNCHECKED, "jacfwd"),
            (MDSENS_UNCHECKED, "jacrev"), (UNROLLED, "jacfwd"), (UNROLLED, "jacrev"),
            (JAXOPT_CG, "jacrev"), (JAXOPT_CG, "jacfwd"),
            (MDSENS, "grad"), (MDSENS_UNCHECKED, "grad"), (UNROLLED, "grad"),
            (JAXOPT_DEFAULT, "grad"), (JAXOPT_CG, "grad")]
    if inner == "GD":  # a smaller set: the point is the regime of many inner iterations
        rows = [(MDSENS, "jacfwd"), (UNROLLED, "jacfwd"), (UNROLLED, "jacrev"),
                (MDSENS, "grad"), (UNROLLED, "grad"), (JAXOPT_CG, "grad")]
    out = []
    for method, mode in rows:
        skip = None
        if method.startswith("jaxopt") and (jaxopt is None or args.no_jaxopt):
            continue
        if method == MDSENS_UNCHECKED and args.smoke:
            continue
        if method.startswith("jaxopt") and mode == "jacfwd" and p != min(args.sizes):
            continue  # shown once: it is unsupported
        if mode == "jacrev" and p > (args.jacrev_max_p if inner == "CG" else args.gd_jacrev_max_p):
            skip = "p solves, skipped at this p"
        elif mode == "jacrev" and method == MDSENS and p > args.checked_jacrev_max_p:
            # jax unrolls a vmapped jax.debug.callback once per batch element, so the
            # convergence check makes compile time grow with p (206 s at p = 1000 on 2 cores).
            skip = "compile time O(p), skipped at this p"
        out.append((method, mode, skip))
    return out


def bench_size(p, n, lam, args, log):
    """All methods at one size; returns a list of result records (dicts)."""
    Xn, yn, tn = make_problem(p, n)
    t0 = time.perf_counter()
    x_ref, J_ref, g_ref, lipschitz = closed_form(Xn, yn, lam, tn)
    log(f"  closed form: {time.perf_counter() - t0:.1f} s")
    refs = {"solve": x_ref, "jacfwd": J_ref, "jacrev": J_ref, "grad": np.asarray(g_ref)}
    quantity = {"solve": "x*", "jacfwd": "dx*/dλ", "jacrev": "dx*/dλ", "grad": "dL/dλ"}
    lam_j = jnp.asarray(lam, jnp.float64)
    X, y, t = jnp.asarray(Xn), jnp.asarray(yn), jnp.asarray(tn)
    targs = (lam_j, X, y, t)
    timing_kw = dict(repeats=args.repeats, min_repeats=args.min_repeats, max_seconds=args.max_seconds)

    inners = [("CG", cg_solve, cg_unrolled)]
    if p <= args.gd_max_p:
        inners.append(("GD", *make_gd(1.0 / lipschitz)))

    records = []
    for inner, solve, unrolled in inners:
        iters = int(jax.jit(solve)(jnp.zeros(p), lam_j, X, y)[1])
        log(f"  inner {inner}: {iters} iterations to {INNER_TOL:g}")
        base = dict(p=p, n=n, lam=lam, inner=inner, inner_iterations=iters)
        modes = {m: implicit_modes(DECORATORS[m], solve) for m in DECORATORS}
        modes[UNROLLED] = _modes(functools.partial(unrolled, iters=iters))
        todo = [(f"inner {inner} alone", "solve", None)] + plan(inner, p, args)
        for method, mode, skip in todo:
            rec = dict(base, quantity=quantity[mode], method=method, mode=mode)
            records.append(rec)
            if skip:
                rec["skipped"] = skip
                continue
            fun = (lambda lam, X, y, t: solve(jnp.zeros_like(t), lam, X, y)[0]) if mode == "solve" \
                else modes[method][mode]
            log(f"  {inner} {rec['quantity']:7s} {method:34s} {mode:7s} ...", end="")
            try:
                timing, out = time_jitted(fun, *targs, **timing_kw)
            except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
                log(f" FAILED {rec['error']}")
                continue
            rec.update(timing.as_dict(), rel_error=rel_err(out, refs[mode]))
            log(f" {fmt_ms(timing.median_s)} ms (compile {timing.compile_s:.2f} s, "
                f"err {fmt_err(rec['rel_error'])})")

    # ratios against the mdsens row computing the same quantity with the same inner solver
    ref_mode = {"dx*/dλ": "jacfwd", "dL/dλ": "grad"}
    for r in records:
        ref = next((q for q in records if q["inner"] == r["inner"] and q["quantity"] == r["quantity"]
                    and q["method"] == MDSENS and q["mode"] == ref_mode.get(r["quantity"])
                    and q.get("median_s")), None)
        if ref is not None and r.get("median_s"):
            r["ratio_vs_mdsens"] = r["median_s"] / ref["median_s"]
    return records


def size_table(records):
    rows = []
    for r in records:
        head = [r["inner"], r["quantity"], r["method"], r["mode"]]
        if "median_s" in r:
            ratio = r.get("ratio_vs_mdsens")
            rows.append(head + [fmt_ms(r["median_s"]), "-" if ratio is None else f"{ratio:.2f}",
                                f"{r['compile_s']:.2f}", fmt_err(r["rel_error"]), r["repeats"], ""])
        else:
            why = r.get("skipped") or r.get("error", "")
            if "jvp" in why.lower() or "custom_vjp" in why:
                why = "unsupported: jaxopt is reverse-only (custom_vjp)"
            rows.append(head + ["-"] * 5 + [why[:60]])
    return format_table(TABLE_HEADERS, rows, align="llllrrrrrl")


def summary_table(all_records, sizes):
    """Median ms (ratio to mdsens) per method/mode (rows) and p (columns)."""
    key = lambda r: (r["inner"], r["quantity"], r["method"], r["mode"])  # noqa: E731
    keys = list(dict.fromkeys(key(r) for r in all_records))
    rows = []
    for k in keys:
        row = list(k)
        for p in sizes:
            r = next((r for r in all_records if r["p"] == p and key(r) == k), None)
            if r is None or "median_s" not in r:
                row.append("-")
            else:
                ratio = r.get("ratio_vs_mdsens")
                row.append(fmt_ms(r["median_s"]) + ("" if ratio is None else f" ({ratio:.2f}x)"))
        rows.append(row)
    return format_table(["inner", "quantity", "method", "mode"] + [f"p={p}" for p in sizes], rows,
                        align="llll" + "r" * len(sizes))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="feature counts p (default 10 100 1000 10000; --full adds 30000)")
    ap.add_argument("--n", type=int, default=None, help="samples n (default min(2p, 1000))")
    ap.add_argument("--lam", type=float, default=1.0, help="ridge λ (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5)")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop repeating once min-repeats calls took this long (default 8 s)")
    ap.add_argument("--jacrev-max-p", type=int, default=1000,
                    help="full reverse-mode Jacobian only up to this p (it costs p solves)")
    ap.add_argument("--checked-jacrev-max-p", type=int, default=100,
                    help="jacrev of mdsens with its default convergence check only up to this p: "
                         "jax unrolls the check's debug callback over the p cotangents, so its "
                         "compile time grows with p (minutes at p=1000)")
    ap.add_argument("--gd-max-p", type=int, default=None,
                    help="also benchmark the gradient-descent inner solver up to this p "
                         "(default 1000; 10000 with --full)")
    ap.add_argument("--gd-jacrev-max-p", type=int, default=100,
                    help="full reverse-mode Jacobian of unrolled GD only up to this p")
    ap.add_argument("--no-jaxopt", action="store_true", help="skip jaxopt even if importable")
    ap.add_argument("--full", action="store_true", help="10 repeats, up to 30 s per method, adds p=30000")
    ap.add_argument("--smoke", action="store_true", help="p=10, 1 repeat: a seconds-long check")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress lines, only the tables")
    args = ap.parse_args(argv)
    if args.smoke:  # fewest compiles: CG inner solver only, no 'ignore' variant
        args.sizes = args.sizes or [10]
        args.repeats, args.min_repeats = args.repeats or 1, 1
        args.gd_max_p = 0 if args.gd_max_p is None else args.gd_max_p
    if args.full:
        args.sizes = args.sizes or [10, 100, 1000, 10000, 30000]
        args.repeats = args.repeats or 10
        args.max_seconds = args.max_seconds or 30.0
    args.sizes = sorted(args.sizes or [10, 100, 1000, 10000])
    args.repeats = args.repeats or 5
    if args.gd_max_p is None:
        args.gd_max_p = 10000 if args.full else 1000
    args.max_seconds = args.max_seconds or 8.0
    return args


def main(argv=None):
    args = parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    machine = describe_machine()
    jaxopt_version = None
    if jaxopt is not None:
        from importlib.metadata import version
        jaxopt_version = version("jaxopt")

    print("mdsens core benchmark: ridge regression, derivative of x*(λ) w.r.t. the scalar λ")
    print(format_machine(machine))
    print(f"mdsens {ms.__version__}; jaxopt {jaxopt_version or 'not importable (column skipped)'}")
    print(f"config: sizes {args.sizes}, n = {args.n or 'min(2p, 1000)'}, λ = {args.lam}, "
          f"repeats <= {args.repeats} (>= {args.min_repeats}, stop after {args.max_seconds:g} s), "
          f"inner CG tol {INNER_TOL:g}, diff. solve tol {DIFF_TOL:g}")
    if machine["cpus_usable"] and machine["load_average_1_5_15"] and \
            machine["load_average_1_5_15"][0] > 0.5 * machine["cpus_usable"]:
        print("note: the machine is loaded (see load average); timings are noisy, compare ratios")
    print(flush=True)

    t_start = time.perf_counter()
    all_records, tables = [], []
    for p in args.sizes:
        n = args.n or min(2 * p, 1000)
        log(f"p = {p}, n = {n}:")
        records = bench_size(p, n, args.lam, args, log)
        all_records += records
        its = ", ".join(f"{r['inner']} {r['inner_iterations']}" for r in records if r["mode"] == "solve")
        tables.append(f"p = {p}, n = {n}, λ = {args.lam:g}; inner iterations (also run by the unrolled "
                      f"twin): {its}\n" + size_table(records))

    print()
    print("\n\n".join(tables))
    print()
    print("Summary: median ms (ratio to the mdsens row for the same quantity: jacfwd for dx*/dλ, "
          "grad for dL/dλ)")
    print(summary_table(all_records, args.sizes))
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.0f} s. Times include the inner solve; compile excluded "
          "(shown separately). Errors: relative 2-norm against the closed form.")
    if args.json:
        dump_json(args.json, dict(benchmark="core", machine=machine, jaxopt=jaxopt_version,
                                  mdsens=ms.__version__, config=vars(args), wall_s=total,
                                  results=all_records))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
