"""Benchmark of the optimization catalog on the paper's bilevel problems: implicit vs unrolled vs JAXopt.

Two experiments of Blondel et al. (NeurIPS 2022, §4), the same problems as
``examples/svm_hyperparameters.py`` and ``examples/dataset_distillation.py``:

1. **Multiclass SVM hyperparameter (the paper's Figure 3).** The dual of the
   Crammer–Singer SVM over a product of simplices, β*(λ) = argmin_{β ∈ (Δ_k)^m}
   (1/2λ)‖Xᵀ(Y − β)‖² + ⟨β, Y⟩ (mdsens solves λ times it: same minimizer, λ-free
   curvature), m samples, k classes, p features (swept). Quantity: dL/dθ of the
   validation loss L = (1/2m_val)‖X_val W* − Y_val‖², W* = Xᵀ(Y − β*)/λ, θ = log λ.
   Inner solvers: mirror descent (exponentiated
   gradient), proximal gradient (FISTA, projection onto each simplex), block coordinate
   descent (one row per block), all to tol 1e-8 (at most 10,000 iterations: mirror
   descent reaches the cap at some sizes, marked "(cap)"; see the example's docstring).
2. **Dataset distillation, one outer step.** dL/dΘ (10 × 64) of the training
   cross-entropy of ℓ2-regularized multinomial logistic regression trained on ten
   distilled 8×8 digits Θ (the bundled ``digits.npz``), inner gradient descent (Nesterov,
   fixed step) to ‖∇‖ ≤ 1e-8. Reverse mode only: 640 parameters, one scalar loss.

Methods, each timed with the inner solve included (a hypergradient is never free of it):

* **mdsens implicit**: the solver's ``run`` differentiated through its own optimality
  condition (default: GMRES at 1e-10 for fixed points, CG for stationarity), in reverse
  (``jax.grad``) and forward (``jax.jacfwd``) mode;
* **mdsens unrolled**: ``implicit_diff=False``, exactly as many iterations as the implicit
  run needed (so both reach the same point), autodiff in both modes;
* **jaxopt** (only if importable: the benchmark environment has it, mdsens never imports
  it): the same solver classes of JAXopt 0.8 with ``implicit_diff=True``, its default
  linear solve (normal-equation CG, tol 1e-5) and ``solve_gmres(tol=1e-10)`` (like for
  like). JAXopt's custom_root is a ``custom_vjp``: reverse mode only (forward is tried once
  and reported). Its BlockCoordinateDescent takes JAXopt's own composite-linear
  ``multiclass_linear_svm_dual`` (the unscaled dual, same minimizer), which updates one
  block in O(pk) where mdsens's generic BCD recomputes the full gradient, O(mpk): that
  row compares two BCD implementations, not only two differentiation methods.
* **inner solve alone** (mdsens), for reference.

Ratios are ``time / time of mdsens implicit in the same mode``. Accuracy: the SVM
hypergradients are compared with central finite differences of L (h = 1e-4 in θ, mdsens
proximal gradient at tol 1e-11); the distillation gradients with mdsens implicit. Timing:
``_common.time_jitted`` (separate compile, one warm-up call, median of repeats).

Usage::

    .venv-bench/bin/python benchmarks/catalog.py               # ~9 min on 2 loaded cores (compiles dominate)
    .venv-bench/bin/python benchmarks/catalog.py --json out/catalog.json
    .venv/bin/python benchmarks/catalog.py --quick             # p = 40, m = 20, 1 repeat: ~1 min smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mdsens as ms  # noqa: E402  (turns on float64 before any array exists)
from mdsens import optim  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import (  # noqa: E402
    describe_machine, dump_json, fmt_err, fmt_ms, format_machine, format_table, time_jitted,
)

try:  # a benchmark peer only; never a dependency of mdsens
    import jaxopt  # noqa: E402
    import jaxopt.linear_solve  # noqa: E402
    import jaxopt.objective  # noqa: E402
    import jaxopt.projection  # noqa: E402
    import jaxopt.prox  # noqa: E402
except ImportError:  # pragma: no cover - depends on the venv
    jaxopt = None

SOLVERS = ("mirror descent", "proximal gradient", "block coordinate descent")
INNER_TOL = 1e-8
MAXITER = 10_000
MIRROR_STEP_FACTOR = 2.0   # × 1/‖X‖₂², as in the example
LABEL_NOISE = 0.2
FD_STEP = 1e-4             # in θ = log λ (truncation ~h², truth solve error ~1e-11/h)
THETA = 2.0                # λ = e² ≈ 7.4, as in the example
DISTILL_L2REG = 0.1
PIXELS, CLASSES = 64, 10

IMPLICIT = "mdsens implicit"
UNROLLED = "mdsens unrolled"
SOLVE_ALONE = "inner solve alone (mdsens)"
JAXOPT_DEFAULT = "jaxopt implicit (default solve)"
JAXOPT_GMRES = "jaxopt implicit (solve_gmres 1e-10)"

TABLE_HEADERS = ["problem", "inner solver", "method", "mode", "median ms", "x implicit", "compile s", "iters",
                 "rel. diff", "reps", "note"]


# ----------------------------------------------------------------------------------
# Problem 1: multiclass SVM (the example's definitions, kept in step with it)
# ----------------------------------------------------------------------------------
def make_classification(m, p, k, seed=0):
    """A k-class Gaussian mixture (means of norm ≈ 1, unit noise), 20 % training label noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, p)) / np.sqrt(p)
    labels = rng.integers(0, k, 2 * m)
    X = means[labels] + rng.standard_normal((2 * m, p)) / np.sqrt(p)
    noisy = np.where(rng.random(m) < LABEL_NOISE, rng.integers(0, k, m), labels[:m])
    return X[:m], np.eye(k)[noisy], X[m:], np.eye(k)[labels[m:]]


def scaled_dual(beta, lam, X, Y):
    V = X.T @ (Y - beta)
    return 0.5 * jnp.vdot(V, V) + lam * jnp.vdot(beta, Y)


def exponentiated_gradient(beta, grad, stepsize, hyperparams_proj):
    """Entropic mirror step per row in product form (finite Jacobian at entries that underflow to 0)."""
    del hyperparams_proj
    scaled = -stepsize * grad
    shift = jnp.max(jnp.where(beta > 0, scaled, -jnp.inf), axis=-1, keepdims=True)
    weights = beta * jnp.exp(scaled - jax.lax.stop_gradient(shift))
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def validation_loss(beta, lam, X, Y, X_val, Y_val):
    W = X.T @ (Y - beta) / lam
    return 0.5 * jnp.mean(jnp.sum((X_val @ W - Y_val) ** 2, axis=-1))


def mdsens_svm_solver(name, X, *, implicit_diff=True, maxiter=MAXITER, tol=INNER_TOL):
    X = np.asarray(X)
    lipschitz = float(np.linalg.norm(X, 2) ** 2)
    options = dict(maxiter=maxiter, tol=tol, implicit_diff=implicit_diff)
    simplices = optim.make_prox_from_projection(optim.projection_simplex)
    if name == "mirror descent":
        return optim.MirrorDescent(scaled_dual, projection_grad=exponentiated_gradient,
                                   stepsize=MIRROR_STEP_FACTOR / lipschitz, **options)
    if name == "proximal gradient":
        return optim.ProximalGradient(scaled_dual, prox=simplices, stepsize=1.0 / lipschitz, **options)
    return optim.BlockCoordinateDescent(scaled_dual, block_prox=simplices, stepsize=1.0 / np.sum(X ** 2, axis=1),
                                        **options)


def mdsens_svm_loss(solver, k):
    """``L(θ, X, Y, X_val, Y_val) -> (loss, iterations)``."""

    def loss(theta, X, Y, X_val, Y_val):
        lam = jnp.exp(theta)
        result = solver.run(jnp.full((X.shape[0], k), 1.0 / k), None, lam, X, Y)
        return validation_loss(result.params, lam, X, Y, X_val, Y_val), result.state.iter_num

    return loss


def jaxopt_svm_loss(name, X, k, solve):
    """The same L with JAXopt's solver of the same name (``None`` if jaxopt is missing)."""
    X = np.asarray(X)
    lipschitz = float(np.linalg.norm(X, 2) ** 2)
    options = dict(maxiter=MAXITER, tol=INNER_TOL, implicit_diff=True, implicit_diff_solve=solve)
    rows = lambda x, hyperparams=None: jax.vmap(jaxopt.projection.projection_simplex)(x)  # noqa: E731
    if name == "mirror descent":
        solver = jaxopt.MirrorDescent(fun=scaled_dual, projection_grad=exponentiated_gradient,
                                      stepsize=MIRROR_STEP_FACTOR / lipschitz, **options)
        run = lambda beta0, lam, X, Y: solver.run(beta0, None, lam, X, Y)  # noqa: E731
    elif name == "proximal gradient":
        solver = jaxopt.ProximalGradient(fun=scaled_dual, prox=jaxopt.prox.make_prox_from_projection(rows),
                                         stepsize=1.0 / lipschitz, **options)
        run = lambda beta0, lam, X, Y: solver.run(beta0, None, lam, X, Y)  # noqa: E731
    else:
        block_prox = jaxopt.prox.make_prox_from_projection(jaxopt.projection.projection_simplex)
        solver = jaxopt.BlockCoordinateDescent(fun=jaxopt.objective.multiclass_linear_svm_dual,
                                               block_prox=block_prox, **options)
        run = lambda beta0, lam, X, Y: solver.run(beta0, None, l2reg=lam, data=(X, Y))  # noqa: E731

    def loss(theta, X, Y, X_val, Y_val):
        lam = jnp.exp(theta)
        result = run(jnp.full((X.shape[0], k), 1.0 / k), lam, X, Y)
        return validation_loss(result.params, lam, X, Y, X_val, Y_val), result.state.iter_num

    return loss


# ----------------------------------------------------------------------------------
# Problem 2: dataset distillation (the example's definitions)
# ----------------------------------------------------------------------------------
def cross_entropy(W, X, labels):
    logits = X @ W
    correct = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - correct)


def distill_inner(W, distilled, l2reg):
    return cross_entropy(W, distilled, jnp.arange(CLASSES)) + 0.5 * l2reg * jnp.vdot(W, W)


def distill_loss(run):
    """``L(Θ, X, y) -> (training cross-entropy of W*(Θ), iterations)`` for ``run(W0, Θ, ε)``."""

    def loss(distilled, X, labels):
        result = run(jnp.zeros((PIXELS, CLASSES)), distilled, DISTILL_L2REG)
        return cross_entropy(result.params, X, labels), result.state.iter_num

    return loss


def distill_solver(maxiter=MAXITER, implicit_diff=True):
    """mdsens's inner solver (step 1/L, L = ½·64 + ε, as in the example)."""
    return optim.GradientDescent(distill_inner, stepsize=1.0 / (0.5 * PIXELS + DISTILL_L2REG), maxiter=maxiter,
                                 tol=INNER_TOL, implicit_diff=implicit_diff)


def jaxopt_distill_runs():
    """``{method: run}`` of JAXopt's GradientDescent on the same problem (empty without jaxopt)."""
    if jaxopt is None:
        return {}
    return {method: jaxopt.GradientDescent(fun=distill_inner, stepsize=1.0 / (0.5 * PIXELS + DISTILL_L2REG),
                                           maxiter=MAXITER, tol=INNER_TOL, acceleration=True, implicit_diff=True,
                                           implicit_diff_solve=solve).run
            for method, solve in jaxopt_solves().items()}


def jaxopt_solves():
    return {JAXOPT_DEFAULT: None,
            JAXOPT_GMRES: functools.partial(jaxopt.linear_solve.solve_gmres, tol=1e-10)}


# ----------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------
def reverse(loss):
    return lambda *args: jax.grad(lambda a0, *rest: loss(a0, *rest)[0])(*args)


def forward(loss):
    return lambda *args: jax.jacfwd(lambda a0, *rest: loss(a0, *rest)[0])(*args)


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def timed(rec, fun, args, timing_kw, log, reference=None):
    """Time ``fun(*args)`` into the record ``rec``; failures are reported, not raised."""
    log(f"  {rec['problem']:10s} {rec['solver']:25s} {rec['method']:36s} {rec['mode']:8s} ...", end="")
    try:
        timing, out = time_jitted(fun, *args, **timing_kw)
    except Exception as e:  # noqa: BLE001 - shown in the table
        message = str(e).splitlines()[0] if str(e) else ""
        rec["error"] = f"{type(e).__name__}: {message[:90]}"
        log(f" FAILED {rec['error']}")
        return None
    rec.update(timing.as_dict())
    if reference is not None:
        rec["rel_diff"] = rel_diff(out, reference)
    log(f" {fmt_ms(timing.median_s)} ms (compile {timing.compile_s:.1f} s"
        + (f", rel. diff {fmt_err(rec.get('rel_diff'))})" if reference is not None else ")"))
    return out


def bench_svm(p, args, log):
    m, k = args.samples, args.classes
    data = tuple(jnp.asarray(a) for a in make_classification(m, p, k, seed=p))
    theta = jnp.asarray(THETA)
    targs = (theta,) + data
    timing_kw = dict(repeats=args.repeats, min_repeats=args.min_repeats, max_seconds=args.max_seconds)
    problem = f"SVM p={p}"

    # Finite-difference truth: mdsens proximal gradient at a tighter tolerance.
    truth = mdsens_svm_loss(mdsens_svm_solver("proximal gradient", data[0], tol=1e-11, maxiter=100_000), k)
    truth_loss = jax.jit(lambda t, *d: truth(t, *d)[0])
    fd = float(truth_loss(THETA + FD_STEP, *data) - truth_loss(THETA - FD_STEP, *data)) / (2 * FD_STEP)
    log(f"  {problem}: dL/dθ by central finite differences {fd:.10f}")

    records = []
    for name in SOLVERS:
        base = dict(problem=problem, p=p, m=m, k=k, solver=name, quantity="dL/dθ")
        implicit_loss = mdsens_svm_loss(mdsens_svm_solver(name, data[0]), k)
        iterations = int(jax.jit(lambda *a: implicit_loss(*a)[1])(*targs))
        unrolled_solver = mdsens_svm_solver(name, data[0], implicit_diff=False, maxiter=iterations)
        unrolled_loss = mdsens_svm_loss(unrolled_solver, k)
        plan = [(SOLVE_ALONE, "solve", lambda *a: implicit_loss(*a)[0], None, iterations),
                (IMPLICIT, "reverse", reverse(implicit_loss), fd, iterations),
                (IMPLICIT, "forward", forward(implicit_loss), fd, iterations),
                (UNROLLED, "reverse", reverse(unrolled_loss), fd, iterations),
                (UNROLLED, "forward", forward(unrolled_loss), fd, iterations)]
        if jaxopt is not None and not args.no_jaxopt:
            for method, solve in jaxopt_solves().items():
                loss = jaxopt_svm_loss(name, data[0], k, solve)
                jaxopt_iterations = int(jax.jit(lambda *a, loss=loss: loss(*a)[1])(*targs))
                plan.append((method, "reverse", reverse(loss), fd, jaxopt_iterations))
                if p == min(args.sizes):  # shown once: JAXopt's custom_vjp has no forward mode
                    plan.append((method, "forward", forward(loss), fd, jaxopt_iterations))
        for method, mode, fun, reference, its in plan:
            rec = dict(base, method=method, mode=mode, iterations=its, capped=its >= MAXITER)
            records.append(rec)
            timed(rec, fun, targs, timing_kw, log, reference)
    return records


def bench_distillation(args, log):
    with np.load(ms.data.path("digits.npz")) as archive:
        images, labels = archive["images"] / 16.0, archive["labels"].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))[:args.distill_train]
    X, y = jnp.asarray(images[order]), jnp.asarray(labels[order])
    distilled = jnp.asarray(np.random.default_rng(1).uniform(0.45, 0.55, (CLASSES, PIXELS)))
    targs = (distilled, X, y)
    timing_kw = dict(repeats=args.repeats, min_repeats=args.min_repeats, max_seconds=args.max_seconds)
    implicit_loss = distill_loss(distill_solver().run)
    iterations = int(jax.jit(lambda *a: implicit_loss(*a)[1])(*targs))
    unrolled = distill_solver(maxiter=iterations, implicit_diff=False)
    base = dict(problem="distill", p=PIXELS, m=len(order), k=CLASSES, solver="gradient descent",
                quantity="dL/dΘ")
    plan = [(SOLVE_ALONE, "solve", lambda *a: implicit_loss(*a)[0], iterations),
            (IMPLICIT, "reverse", reverse(implicit_loss), iterations),
            (UNROLLED, "reverse", reverse(distill_loss(unrolled.run)), iterations)]
    for method, run in ({} if args.no_jaxopt else jaxopt_distill_runs()).items():
        loss = distill_loss(run)
        its = int(jax.jit(lambda *a, loss=loss: loss(*a)[1])(*targs))
        plan.append((method, "reverse", reverse(loss), its))
    records, reference = [], None
    for method, mode, fun, its in plan:
        rec = dict(base, method=method, mode=mode, iterations=its, capped=its >= MAXITER)
        records.append(rec)
        out = timed(rec, fun, targs, timing_kw, log, None if mode == "solve" or reference is None else reference)
        if method == IMPLICIT and out is not None:
            reference, rec["note"] = out, "reference of rel. diff"
    return records


def add_ratios(records):
    """``ratio``: time / time of mdsens implicit (same problem, solver, mode)."""
    for r in records:
        ref = next((q for q in records if q["problem"] == r["problem"] and q["solver"] == r["solver"]
                    and q["method"] == IMPLICIT and q["mode"] == (r["mode"] if r["mode"] != "solve" else "reverse")
                    and q.get("median_s")), None)
        if ref is not None and r.get("median_s"):
            r["ratio"] = r["median_s"] / ref["median_s"]


def row_of(r):
    head = [r["problem"], r["solver"], r["method"], r["mode"]]
    its = f"{r['iterations']}{' (cap)' if r.get('capped') else ''}"
    if "median_s" in r:
        ratio = r.get("ratio")
        return head + [fmt_ms(r["median_s"]), "-" if ratio is None else f"{ratio:.2f}", f"{r['compile_s']:.1f}",
                       its, fmt_err(r.get("rel_diff")), r["repeats"], r.get("note", "")]
    why = r.get("error", "")
    if "jvp" in why.lower() or "custom_vjp" in why:
        why = "unsupported: jaxopt is reverse-only (custom_vjp)"
    return head + ["-", "-", "-", its, "-", "-", why[:60]]


def summary_table(records, sizes):
    """SVM: median ms (ratio to mdsens implicit, same mode) per solver/method/mode and p."""
    svm = [r for r in records if r["problem"].startswith("SVM")]
    key = lambda r: (r["solver"], r["method"], r["mode"])  # noqa: E731
    rows = []
    for k in dict.fromkeys(key(r) for r in svm):
        row = list(k)
        for p in sizes:
            r = next((r for r in svm if r["p"] == p and key(r) == k), None)
            if r is None or "median_s" not in r:
                row.append("-")
            else:
                ratio = r.get("ratio")
                row.append(fmt_ms(r["median_s"]) + ("" if ratio is None else f" ({ratio:.2f}x)"))
        rows.append(row)
    return format_table(["inner solver", "method", "mode"] + [f"p={p}" for p in sizes], rows,
                        align="lll" + "r" * len(sizes))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="feature counts p (default 60 120 240 480)")
    ap.add_argument("--samples", type=int, default=None, help="SVM training samples m (default 30)")
    ap.add_argument("--classes", type=int, default=5, help="SVM classes k")
    ap.add_argument("--distill-train", type=int, default=None,
                    help="digits in the distillation loss (default 1200)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5)")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=8.0,
                    help="stop repeating once min-repeats calls took this long")
    ap.add_argument("--no-jaxopt", action="store_true", help="skip jaxopt even if importable")
    ap.add_argument("--no-distill", action="store_true", help="skip the dataset-distillation step")
    ap.add_argument("--quick", action="store_true", help="p = 40, m = 20, 1 repeat: a smoke run")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress lines, only the tables")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [40]
        args.samples = args.samples or 20
        args.distill_train = args.distill_train or 300
        args.repeats, args.min_repeats = args.repeats or 1, 1
    args.sizes = sorted(args.sizes or [60, 120, 240, 480])
    args.samples = args.samples or 30
    args.distill_train = args.distill_train or 1200
    args.repeats = args.repeats or 5
    return args


def main(argv=None):
    args = parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    machine = describe_machine()
    jaxopt_version = None
    if jaxopt is not None:
        from importlib.metadata import version
        jaxopt_version = version("jaxopt")

    print("mdsens optimization-catalog benchmark: bilevel problems of Blondel et al. (2022) §4")
    print(format_machine(machine))
    print(f"mdsens {ms.__version__}; jaxopt {jaxopt_version or 'not importable (column skipped)'}")
    print(f"config: SVM m = {args.samples}, k = {args.classes}, p in {args.sizes}, θ = log λ = {THETA}; "
          f"distillation on {args.distill_train} digits; inner tol {INNER_TOL:g} (cap {MAXITER}); "
          f"repeats <= {args.repeats} (>= {args.min_repeats}, stop after {args.max_seconds:g} s)")
    if machine["cpus_usable"] and machine["load_average_1_5_15"] and \
            machine["load_average_1_5_15"][0] > 0.5 * machine["cpus_usable"]:
        print("note: the machine is loaded (see load average); timings are noisy, compare ratios")
    print(flush=True)

    t_start = time.perf_counter()
    records = []
    for p in args.sizes:
        log(f"SVM, p = {p}:")
        records += bench_svm(p, args, log)
    if not args.no_distill:
        log("dataset distillation, one outer gradient:")
        records += bench_distillation(args, log)
    add_ratios(records)

    print()
    print("All rows (x implicit: time / mdsens implicit, same problem, solver and mode; rel. diff: SVM vs "
          "central finite differences, distillation vs mdsens implicit; iters: inner iterations, unrolled = "
          "implicit's)")
    print(format_table(TABLE_HEADERS, [row_of(r) for r in records], align="llllrrrrrrl"))
    print()
    print("SVM summary: median ms of dL/dθ (ratio to mdsens implicit in the same mode) against p")
    print(summary_table(records, args.sizes))
    unrolled = [f"{r['problem']} {r['solver']} {r['mode']} {r['ratio']:.2f}" for r in records
                if r["method"] == UNROLLED and r.get("ratio")]
    print("\nunrolled / implicit time ratios: " + "; ".join(unrolled))
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.0f} s. Times include the inner solve; compile excluded (shown separately).")
    if args.json:
        dump_json(args.json, dict(benchmark="catalog", machine=machine, jaxopt=jaxopt_version,
                                  mdsens=ms.__version__, config=vars(args), wall_s=total, results=records))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
