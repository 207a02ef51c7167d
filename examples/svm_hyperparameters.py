"""Hyperparameter optimization of a multiclass SVM: implicit vs unrolled hypergradients.

The first experiment of Blondel et al. (NeurIPS 2022, §4, Figure 3) at CPU-friendly
sizes. The inner problem is the dual of the Crammer–Singer multiclass SVM with ℓ2
regularization λ: one probability vector β_i per training sample, so β lives in a
product of m simplices (Δ_k)^m,

    β*(λ) = argmin_{β ∈ (Δ_k)^m} (1/2λ) ‖Xᵀ(Y − β)‖² + ⟨β, Y⟩,    W*(λ) = Xᵀ(Y − β*)/λ,

with X (m × p) the training features, Y (m × k) their one-hot labels and W* the
primal weights. The solvers minimize λ times this objective: the same minimizer, with a
curvature ‖X‖₂² that no longer depends on λ, so one step size serves every λ. The outer
problem is the validation loss of the primal weights, as a function of θ = log λ:

    L(θ) = (1/2m_val) ‖X_val W*(e^θ) − Y_val‖².

Three solvers of ``mdsens.optim`` produce β* (each to tol = 1e-8, at most 10,000 iterations):

* ``MirrorDescent``: exponentiated gradient, the KL geometry of each simplex;
* ``ProximalGradient``: FISTA with the Euclidean projection onto each simplex;
* ``BlockCoordinateDescent``: one sample (a row of β) per block, step 1/‖x_i‖².

Each is differentiated implicitly (its own fixed point, paper §2.3, one linear solve)
and by unrolling (``implicit_diff=False``, as many iterations as the solver needed).
For a range of feature counts p the script times the reverse-mode hypergradient dL/dθ of
both kinds and prints the unrolled/implicit time ratios (the paper's Figure 3); at the
first p it checks every hypergradient against central finite differences of L (β* from
proximal gradient at tol 1e-11: no derivative of any solver involved) and implicit
against unrolled; then it runs a few steps of hypergradient descent on θ. Mirror
descent converges slowly here (entries of β that are tiny on the support, or zero with a
tiny optimality gap, converge at a rate proportional to that entry or gap) and often
stops at the iteration cap, printed "(cap)": both of its differentiations then see the
same unconverged iterate, and its implicit linear system is as ill-conditioned as the
iteration is slow. Forward mode is exercised by the tests and timed by
``benchmarks/catalog.py``. Data: a synthetic Gaussian mixture (k classes, class means of norm ≈ 1,
unit noise, p ≥ 2m so that XXᵀ is well conditioned) with 20 % of the training labels
redrawn at random, so that the validation loss has an interior minimum in λ.

Writes ``svm_hyperparameters.png``: hypergradient time against p (left) and the
validation loss against λ with the descent path (right).

Run: ``python examples/svm_hyperparameters.py --out out/`` (1-3 min on 2 shared cores, most
of it compilation; ``--features 40 80 --samples 20`` for a quick look).
"""

from __future__ import annotations

import _common

_common.headless()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import mdsens  # noqa: E402,F401  (float64)
from mdsens import optim  # noqa: E402

SOLVERS = ("mirror descent", "proximal gradient", "block coordinate descent")
#: Stopping tolerance of every inner solver (each measures its own fixed-point residual).
INNER_TOL = 1e-8
#: Iteration cap of every inner solver (mirror descent reaches it at some sizes: see above).
MAXITER = 10_000
#: Tolerance of the proximal-gradient solve behind the finite-difference truth.
TRUTH_TOL = 1e-11
#: Mirror descent steps at twice the guaranteed 1/‖X‖₂²: stable here, half the iterations.
MIRROR_STEP_FACTOR = 2.0
#: Central finite-difference step in θ = log λ: truncation ~h², solve error ~TRUTH_TOL/h.
FD_STEP = 1e-4
#: Share of training labels redrawn at random (label noise makes λ matter).
LABEL_NOISE = 0.2


def make_classification(m, p, k, seed=0):
    """``(X, Y, X_val, Y_val)``: a k-class Gaussian mixture, m samples per split, p features.

    Class means of norm ≈ 1, isotropic noise of norm ≈ 1 (entries of variance 1/p); the
    training labels carry ``LABEL_NOISE`` of random relabelling, the validation ones none.
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, p)) / np.sqrt(p)
    labels = rng.integers(0, k, 2 * m)
    X = means[labels] + rng.standard_normal((2 * m, p)) / np.sqrt(p)
    noisy = np.where(rng.random(m) < LABEL_NOISE, rng.integers(0, k, m), labels[:m])
    return X[:m], np.eye(k)[noisy], X[m:], np.eye(k)[labels[m:]]


def scaled_dual(beta, lam, X, Y):
    """λ × the SVM dual: ½‖Xᵀ(Y − β)‖² + λ⟨β, Y⟩ (same minimizer, λ-free curvature)."""
    V = X.T @ (Y - beta)
    return 0.5 * jnp.vdot(V, V) + lam * jnp.vdot(beta, Y)


def primal_weights(beta, lam, X, Y):
    """``W = Xᵀ(Y − β)/λ`` (p × k), the primal SVM weights of a dual point."""
    return X.T @ (Y - beta) / lam


def validation_loss(W, X_val, Y_val):
    """``(1/2m_val) ‖X_val W − Y_val‖²``."""
    return 0.5 * jnp.mean(jnp.sum((X_val @ W - Y_val) ** 2, axis=-1))


def exponentiated_gradient(beta, grad, stepsize, hyperparams_proj):
    """Mirror-descent step of the entropy on each row: ``β ⊙ e^{−ηg} / ⟨β, e^{−ηg}⟩``.

    The same map as ``softmax(log β − ηg)`` (MirrorDescent's default), written as a
    product: entries that underflow to exactly 0 during the run keep a finite Jacobian,
    where ``log 0`` would make the implicit derivative NaN.
    """
    del hyperparams_proj
    scaled = -stepsize * grad
    # Shift by the largest exponent on the support, so that the weights cannot all underflow.
    shift = jnp.max(jnp.where(beta > 0, scaled, -jnp.inf), axis=-1, keepdims=True)
    weights = beta * jnp.exp(scaled - jax.lax.stop_gradient(shift))
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def make_solver(name, X, *, implicit_diff=True, maxiter=MAXITER, tol=INNER_TOL):
    """One of ``SOLVERS`` for the scaled dual on the training features ``X``."""
    X = np.asarray(X)
    lipschitz = float(np.linalg.norm(X, 2) ** 2)
    options = dict(maxiter=maxiter, tol=tol, implicit_diff=implicit_diff)
    if name == "mirror descent":
        return optim.MirrorDescent(scaled_dual, projection_grad=exponentiated_gradient,
                                   stepsize=MIRROR_STEP_FACTOR / lipschitz, **options)
    simplices = optim.make_prox_from_projection(optim.projection_simplex)  # row by row
    if name == "proximal gradient":
        return optim.ProximalGradient(scaled_dual, prox=simplices, stepsize=1.0 / lipschitz, **options)
    if name == "block coordinate descent":
        # Each block's curvature is ‖x_i‖²: 1/‖x_i‖² is the exact coordinate minimizer step.
        return optim.BlockCoordinateDescent(scaled_dual, block_prox=simplices,
                                            stepsize=1.0 / np.sum(X ** 2, axis=1), **options)
    raise ValueError(f"unknown solver {name!r}; choose from {SOLVERS}")


def outer_loss(solver, k):
    """``L(θ, X, Y, X_val, Y_val) -> (loss, solver iterations)``: the validation loss of the
    SVM trained with λ = e^θ, and how many iterations the inner solver took (as aux)."""

    def loss(theta, X, Y, X_val, Y_val):
        lam = jnp.exp(theta)
        beta0 = jnp.full((X.shape[0], k), 1.0 / k)  # the simplices' centres: inside MD's domain
        result = solver.run(beta0, None, lam, X, Y)
        return validation_loss(primal_weights(result.params, lam, X, Y), X_val, Y_val), result.state.iter_num

    return loss


def reverse_mode(solver, k):
    """Compiled ``(θ, data) -> ((L, iterations), dL/dθ)``, reverse mode."""
    return jax.jit(jax.value_and_grad(outer_loss(solver, k), has_aux=True))



def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def compare_at_one_size(data, theta, k, repeats):
    """For each solver: implicit and unrolled dL/dθ (reverse mode), iterations and median times.

    Returns ``{solver: dict(reverse, unrolled, iterations, t_implicit, t_unrolled, implicit_fn)}``.
    """
    rows = {}
    for name in SOLVERS:
        implicit_fn = reverse_mode(make_solver(name, data[0]), k)
        (_, iterations), reverse = implicit_fn(theta, *data)
        iterations = int(iterations)
        unrolled_fn = reverse_mode(make_solver(name, data[0], implicit_diff=False, maxiter=iterations), k)
        _, unrolled = unrolled_fn(theta, *data)
        rows[name] = dict(reverse=float(reverse), unrolled=float(unrolled), iterations=iterations,
                          implicit_fn=implicit_fn,
                          t_implicit=_common.median_seconds(implicit_fn, theta, *data, repeats=repeats),
                          t_unrolled=_common.median_seconds(unrolled_fn, theta, *data, repeats=repeats))
    return rows


def finite_difference(data, theta, k):
    """Central difference of L in θ, with β* from proximal gradient at ``TRUTH_TOL``: an
    independent truth (no derivative of any solver), accurate to ~1e-7 relative."""
    loss = outer_loss(make_solver("proximal gradient", data[0], tol=TRUTH_TOL, maxiter=100_000), k)
    value = jax.jit(lambda t, *d: loss(t, *d)[0])
    return float(value(theta + FD_STEP, *data) - value(theta - FD_STEP, *data)) / (2 * FD_STEP)


def check_hypergradients(rows, truth, theta):
    """Print implicit and unrolled dL/dθ against finite differences.

    Returns ``(largest error vs FD, largest implicit-vs-unrolled difference)``.
    """
    print(f"hypergradient dL/dθ at θ = log λ = {theta:g}: central finite difference {truth:.10f} "
          f"(h = {FD_STEP:g}, proximal gradient to {TRUTH_TOL:g})")
    worst_fd = worst_unrolled = 0.0
    for name, row in rows.items():
        fd_error = relative(row["reverse"], truth)
        unrolled_diff = relative(row["unrolled"], row["reverse"])
        worst_fd, worst_unrolled = max(worst_fd, fd_error), max(worst_unrolled, unrolled_diff)
        capped = " (cap: not converged)" if row["iterations"] >= MAXITER else ""
        print(f"  {name:25s} implicit {row['reverse']:.10f} (vs FD {fd_error:.1e}), unrolled vs implicit "
              f"{unrolled_diff:.1e}, {row['iterations']} iterations{capped}")
    print(f"largest relative error (implicit vs finite differences): {worst_fd:.2e}")
    print(f"largest relative difference (implicit vs unrolled): {worst_unrolled:.2e}")
    return worst_fd, worst_unrolled


def hypergradient_descent(value_and_grad, data, theta0, steps):
    """Gradient descent on θ = log λ with implicit hypergradients ``value_and_grad``.

    Backtracking on L (halve the step until L decreases); returns the path ``[(θ, L)]``.
    """
    theta, step = theta0, 10.0
    (value, _), grad = value_and_grad(theta, *data)
    path = [(theta, float(value))]
    for _ in range(steps):
        while step > 1e-6:
            trial = theta - step * float(grad)
            (trial_value, _), trial_grad = value_and_grad(trial, *data)
            if trial_value < value:
                break
            step /= 2
        else:
            break
        theta, value, grad = trial, trial_value, trial_grad
        path.append((theta, float(value)))
        step *= 2  # try a longer step next time
    return path


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=30, help="training (and validation) samples m")
    p.add_argument("--classes", type=int, default=5, help="classes k")
    p.add_argument("--features", type=int, nargs="+", default=[60, 120, 240],
                   help="feature counts p of the timing sweep (the first also for the checks)")
    p.add_argument("--theta", type=float, default=2.0, help="θ = log λ of the checks and timings")
    p.add_argument("--theta0", type=float, default=3.0, help="θ where the hypergradient descent starts")
    p.add_argument("--descent-steps", type=int, default=8, help="hypergradient-descent steps")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()
    m, k = args.samples, args.classes

    sweep, datasets = {}, {}
    for p_features in args.features:
        arrays = make_classification(m, p_features, k, seed=p_features)
        datasets[p_features] = tuple(jnp.asarray(a) for a in arrays)
        sweep[p_features] = compare_at_one_size(datasets[p_features], args.theta, k, args.repeats)
        timer(f"p = {p_features}: " + ", ".join(
            f"{name} {row['iterations']}{'' if row['iterations'] < MAXITER else ' (cap)'} it. "
            f"{1e3 * row['t_implicit']:.1f} / {1e3 * row['t_unrolled']:.1f} ms"
            for name, row in sweep[p_features].items()) + " (implicit / unrolled, reverse mode)")

    p0, data = args.features[0], datasets[args.features[0]]
    fd_error, unrolled_diff = check_hypergradients(sweep[p0], finite_difference(data, args.theta, k), args.theta)
    timer(f"checks at m = {m}, p = {p0}, k = {k}")

    # Hyperparameter optimization proper, reusing the compiled proximal-gradient hypergradient.
    value_and_grad = sweep[p0]["proximal gradient"]["implicit_fn"]
    path = hypergradient_descent(value_and_grad, data, args.theta0, args.descent_steps)
    print(f"hypergradient descent on θ: L {path[0][1]:.4f} at λ = {np.exp(path[0][0]):.3g} → "
          f"L {path[-1][1]:.4f} at λ = {np.exp(path[-1][0]):.3g} in {len(path) - 1} steps")
    grid = np.linspace(min(args.theta, path[-1][0]) - 2.5, max(args.theta0, args.theta) + 0.5, 25)
    grid_loss = [float(value_and_grad(t, *data)[0][0]) for t in grid]
    timer("hypergradient descent and the validation curve")

    for name in SOLVERS:
        ratios = ", ".join(f"p={q} {sweep[q][name]['t_unrolled'] / sweep[q][name]['t_implicit']:.2f}"
                           for q in args.features)
        print(f"time ratio unrolled/implicit ({name}): {ratios}")
    last = args.features[-1]
    largest = {name: sweep[last][name]["t_unrolled"] / sweep[last][name]["t_implicit"] for name in SOLVERS}
    print(f"implicit vs unrolled at p = {last} (unrolled time / implicit time): "
          + ", ".join(f"{name} {r:.2f}" for name, r in largest.items()))

    fig = Figure(figsize=(10.5, 4.0), layout="constrained")
    ax_time, ax_loss = fig.subplots(1, 2)
    for name, color in zip(SOLVERS, ("C0", "C1", "C2")):
        implicit = [1e3 * sweep[q][name]["t_implicit"] for q in args.features]
        unrolled = [1e3 * sweep[q][name]["t_unrolled"] for q in args.features]
        ax_time.loglog(args.features, implicit, "o-", color=color, label=f"{name}, implicit")
        ax_time.loglog(args.features, unrolled, "s--", color=color, label=f"{name}, unrolled")
        for q, t in zip(args.features, unrolled):
            if sweep[q][name]["iterations"] >= MAXITER:
                ax_time.annotate("cap", (q, t), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax_time.set_xticks(args.features, [str(q) for q in args.features])
    ax_time.minorticks_off()
    ax_time.set_xlabel("number of features p (\"cap\": iteration cap reached)")
    ax_time.set_ylabel("hypergradient time, reverse mode (ms, median)")
    ax_time.set_title(f"m = {m} samples, k = {k} classes, λ = {np.exp(args.theta):.3g} (CPU)")
    ax_time.legend(fontsize=7)
    ax_loss.semilogx(np.exp(grid), grid_loss, color="0.3", label="validation loss L(λ)")
    path_arr = np.array(path)
    ax_loss.semilogx(np.exp(path_arr[:, 0]), path_arr[:, 1], "o-", color="C3",
                     label="hypergradient descent (implicit, proximal gradient)")
    ax_loss.set_xlabel("ℓ2 regularization λ")
    ax_loss.set_ylabel(r"validation loss $\frac{1}{2m}\|X_\mathrm{val}W^*(\lambda) - Y_\mathrm{val}\|^2$")
    ax_loss.set_title(f"p = {p0} features")
    ax_loss.legend(fontsize=7)
    fig.suptitle("Multiclass SVM hyperparameter: implicit vs unrolled differentiation (Blondel et al. §4)")
    _common.save_figure(fig, out, "svm_hyperparameters.png", timer, dpi=110)
    return fd_error, unrolled_diff, largest


if __name__ == "__main__":
    main()
