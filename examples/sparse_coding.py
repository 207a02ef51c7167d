"""Task-driven dictionary learning: sparse codes differentiated implicitly, against a two-stage baseline.

The third experiment of Blondel et al. (NeurIPS 2022, §4; Mairal, Bach & Ponce 2012) on
a small synthetic problem. Each signal x_i ∈ R^d is coded on a dictionary D (d × k, atoms
of norm ≤ 1) by the elastic net,

    z*(x_i, D) = argmin_z ½‖x_i − D z‖² + λ₁ (‖z‖₁ + (λ₂/2) ‖z‖²),

solved for all signals at once by ``mdsens.optim.ProximalGradient`` with
``prox_elastic_net`` (fixed step 1/k: ‖D‖₂² ≤ ‖D‖_F² ≤ k for atoms in the unit ball). A
logistic regression (w, b) on the codes predicts a binary label. Two ways to learn D:

* **two-stage** (the baseline): D minimizes the reconstruction error ½‖X − Z* Dᵀ‖²
  (alternating sparse coding and a least-squares dictionary update), then (w, b) are fit
  on the codes;
* **task-driven**: starting from the two-stage model, (D, w, b) minimize the training
  logistic loss of the codes directly, by projected gradient descent with backtracking;
  dL/dD goes through z*(D) by implicit differentiation of the proximal-gradient fixed
  point (paper §2.3).

The data are built so that the two disagree: signals mix a few high-energy "nuisance"
atoms, unrelated to the label, with one of two low-energy "label" atoms. A
reconstruction-driven dictionary of k atoms spends them on the nuisance; the task-driven
one finds the label directions.

Checks: the implicit dL/dD against central finite differences of the training loss along
a random direction and against unrolled differentiation of the same proximal-gradient
iterations (``implicit_diff=False``); the unrolled/implicit time ratio of one outer
gradient. Reports the test logistic loss and accuracy of both models. Writes
``sparse_coding.png``: training loss along the task-driven descent against the two-stage
baseline (left), and how much of each true label atom lies in the span of each learned
dictionary (right).

Run: ``python examples/sparse_coding.py --out out/`` (25 s to 1 min on 2 shared cores,
mostly compilation).
"""

from __future__ import annotations

import _common

_common.headless()


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import mdsens  # noqa: E402,F401  (float64)
from mdsens import optim  # noqa: E402

#: Inner solver tolerance (gradient mapping of the elastic-net problem).
INNER_TOL = 1e-9
#: Finite-difference step along a unit direction in dictionary space.
FD_STEP = 1e-4
#: Ridge on the classifier weights (keeps the outer problem bounded on separable codes).
CLASSIFIER_RIDGE = 1e-3


def make_signals(n, d, nuisance_atoms, seed=0):
    """``(X (2n, d), y (2n,), label_atoms (d, 2))``: train and test halves of synthetic signals.

    A random dictionary of ``nuisance_atoms + 2`` unit atoms; each signal is a sum of two
    nuisance atoms with N(0, 1) amplitudes, plus label atom 0 (y = 1) or atom 1 (y = 0)
    with amplitude 0.6, plus N(0, 0.05²) noise per entry.
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((d, nuisance_atoms + 2))
    atoms /= np.linalg.norm(atoms, axis=0)
    nuisance, label_atoms = atoms[:, :nuisance_atoms], atoms[:, nuisance_atoms:]
    X = np.zeros((2 * n, d))
    y = rng.integers(0, 2, 2 * n)
    for i in range(2 * n):
        chosen = rng.choice(nuisance_atoms, 2, replace=False)
        X[i] = nuisance[:, chosen] @ rng.standard_normal(2) + 0.6 * label_atoms[:, 1 - y[i]]
    X += 0.05 * rng.standard_normal(X.shape)
    return X, y.astype(np.float64), label_atoms


def reconstruction(Z, D, X):
    """½‖X − Z Dᵀ‖², the smooth part of sparse coding (codes Z: n × k)."""
    return 0.5 * jnp.sum((X - Z @ D.T) ** 2)


def make_coder(k, l1reg, l2reg, *, implicit_diff=True, maxiter=5000):
    """``codes(D, X) -> (Z*, iterations)``: elastic-net sparse coding of every row of X on D."""
    solver = optim.ProximalGradient(reconstruction, prox=optim.prox_elastic_net, stepsize=1.0 / k,
                                    maxiter=maxiter, tol=INNER_TOL, implicit_diff=implicit_diff)

    def codes(D, X):
        result = solver.run(jnp.zeros((X.shape[0], k)), (l1reg, l2reg), D, X)
        return result.params, result.state.iter_num

    return codes


def logistic_loss(scores, y):
    """Mean binary logistic loss of real scores against labels in {0, 1}."""
    return jnp.mean(jax.nn.softplus(scores) - y * scores)


def task_loss(model, X, y, codes):
    """``(training logistic loss of the codes + ridge on w, inner iterations)``; model = (D, w, b)."""
    D, w, b = model
    Z, iterations = codes(D, X)
    return logistic_loss(Z @ w + b, y) + 0.5 * CLASSIFIER_RIDGE * jnp.vdot(w, w), iterations


def project_atoms(D):
    """Each atom (column) onto the unit ℓ2 ball: the convex set the step size 1/k is valid on."""
    return jax.vmap(optim.projection_l2_ball, in_axes=1, out_axes=1)(D)


def fit_classifier(Z, y, steps=2000):
    """Logistic regression (w, b) on fixed codes (convex: gradient descent to convergence)."""
    def objective(wb):
        w, b = wb[:-1], wb[-1]
        return logistic_loss(Z @ w + b, y) + 0.5 * CLASSIFIER_RIDGE * jnp.vdot(w, w)

    wb = optim.GradientDescent(objective, maxiter=steps, tol=1e-10).run(jnp.zeros(Z.shape[1] + 1)).params
    return wb[:-1], wb[-1]


def two_stage(X, y, D0, codes, iterations):
    """Reconstruction-driven dictionary (alternating sparse coding and least squares), then (w, b)."""
    D = D0
    for _ in range(iterations):
        Z, _ = codes(D, X)
        # Least-squares dictionary for these codes (MOD), then atoms back into the unit ball;
        # the small ridge keeps unused atoms (all-zero codes) where they were.
        gram = Z.T @ Z + 1e-6 * jnp.eye(Z.shape[1])
        D = project_atoms(jnp.linalg.solve(gram, Z.T @ X + 1e-6 * D.T).T)
    Z, _ = codes(D, X)
    w, b = fit_classifier(Z, y)
    return D, w, b


def evaluate(model, X, y, codes):
    D, w, b = model
    Z, _ = codes(D, X)
    scores = Z @ w + b
    return float(logistic_loss(scores, y)), float(jnp.mean((scores > 0) == (y > 0.5)))


def label_alignment(D, label_atoms):
    """For each true label atom a, the norm of its projection onto span(D) (1: a ∈ span(D)).

    The codes can only carry what the span of the dictionary sees of the label atoms.
    """
    basis = np.linalg.svd(np.asarray(D), full_matrices=False)[0]
    return np.linalg.norm(basis.T @ label_atoms, axis=0)



def check_outer_gradient(model, train, implicit_step, make_unrolled_step, repeats):
    """Implicit dL/dD vs finite differences and vs unrolling, and their times.

    Returns ``(relative FD error, implicit-vs-unrolled difference, unrolled/implicit time)``.
    """
    (_, iterations), grads = implicit_step(model, *train)
    iterations = int(iterations)
    D, w, b = model
    direction = np.random.default_rng(3).standard_normal(D.shape)
    direction = jnp.asarray(direction / np.linalg.norm(direction))
    (up, _), _ = implicit_step((D + FD_STEP * direction, w, b), *train)
    (down, _), _ = implicit_step((D - FD_STEP * direction, w, b), *train)
    finite_difference = float(up - down) / (2 * FD_STEP)
    directional = float(jnp.vdot(grads[0], direction))
    fd_error = abs(directional - finite_difference) / abs(finite_difference)
    print(f"dL/dD along a random unit direction: implicit {directional:.10f}, central finite difference "
          f"{finite_difference:.10f} (h = {FD_STEP:g})")
    print(f"relative error (implicit vs finite differences): {fd_error:.2e}")

    unrolled_step = make_unrolled_step(iterations)
    _, unrolled = unrolled_step(model, *train)
    difference = float(jnp.linalg.norm(unrolled[0] - grads[0]) / jnp.linalg.norm(grads[0]))
    print(f"relative difference of dL/dD (implicit vs unrolled, {iterations} proximal-gradient "
          f"iterations): {difference:.2e}")
    t_implicit = _common.median_seconds(implicit_step, model, *train, repeats=repeats)
    t_unrolled = _common.median_seconds(unrolled_step, model, *train, repeats=repeats)
    ratio = t_unrolled / t_implicit
    print(f"one outer gradient (reverse mode, sparse coding included): implicit {1e3 * t_implicit:.1f} ms, "
          f"unrolled {1e3 * t_unrolled:.1f} ms; time ratio unrolled/implicit: {ratio:.2f}")
    return fd_error, difference, ratio


def task_driven_descent(step, model, train, steps, learning_rate):
    """Projected gradient descent on (D, w, b) with backtracking: a step is taken only if it
    lowers the training loss (halving the step until it does), then the step grows by half.

    The loss is only piecewise smooth in D (the codes' supports change), so a fixed step
    that is safe everywhere would be tiny. Returns the final model and the loss history.
    """
    (value, _), grads = step(model, *train)
    history = [float(value)]
    for _ in range(steps):
        while learning_rate > 1e-8:
            D, w, b = (param - learning_rate * grad for param, grad in zip(model, grads))
            trial = (project_atoms(D), w, b)
            (trial_value, _), trial_grads = step(trial, *train)
            if trial_value < value:
                break
            learning_rate /= 2
        else:
            break
        model, value, grads = trial, trial_value, trial_grads
        history.append(float(value))
        learning_rate *= 1.5
    return model, history


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200, help="training (and test) signals n")
    p.add_argument("--dim", type=int, default=20, help="signal dimension d")
    p.add_argument("--atoms", type=int, default=4, help="atoms k of the learned dictionaries")
    p.add_argument("--nuisance", type=int, default=6, help="high-energy atoms that carry no label")
    p.add_argument("--l1reg", type=float, default=0.1, help="sparse coding λ₁")
    p.add_argument("--l2reg", type=float, default=0.1, help="sparse coding λ₂ (elastic net, relative)")
    p.add_argument("--baseline-iterations", type=int, default=20, help="two-stage dictionary updates")
    p.add_argument("--steps", type=int, default=100, help="task-driven projected-gradient steps")
    p.add_argument("--learning-rate", type=float, default=1.0, help="task-driven initial step size")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()
    n, k = args.samples, args.atoms

    X, y, label_atoms = make_signals(n, args.dim, args.nuisance)
    train = (jnp.asarray(X[:n]), jnp.asarray(y[:n]))
    test = (jnp.asarray(X[n:]), jnp.asarray(y[n:]))
    codes = jax.jit(make_coder(k, args.l1reg, args.l2reg))

    # Stage 1 starts from the top-k right singular vectors (the usual initialization).
    D0 = jnp.asarray(np.linalg.svd(X[:n], full_matrices=False)[2][:k].T)
    baseline = two_stage(*train, D0, codes, args.baseline_iterations)
    base_loss, base_acc = evaluate(baseline, *test, codes)
    timer(f"two-stage baseline: {args.baseline_iterations} dictionary updates, then logistic regression")

    def step_for(coder):
        return jax.jit(jax.value_and_grad(lambda model, X, y: task_loss(model, X, y, coder), has_aux=True))

    implicit_step = step_for(make_coder(k, args.l1reg, args.l2reg))

    def make_unrolled_step(iterations):
        return step_for(make_coder(k, args.l1reg, args.l2reg, implicit_diff=False, maxiter=iterations))

    fd_error, unrolled_difference, ratio = check_outer_gradient(baseline, train, implicit_step,
                                                                make_unrolled_step, args.repeats)
    timer("checks of the outer gradient at the two-stage model")

    model, history = task_driven_descent(implicit_step, baseline, train, args.steps, args.learning_rate)
    task_loss_test, task_acc = evaluate(model, *test, codes)
    timer(f"task-driven: {len(history) - 1} projected-gradient steps, training loss {history[0]:.4f} → "
          f"{history[-1]:.4f}")

    print(f"test logistic loss: two-stage {base_loss:.4f}, task-driven {task_loss_test:.4f}")
    print(f"test accuracy: two-stage {base_acc:.3f}, task-driven {task_acc:.3f} ({n} test signals)")
    align_base, align_task = label_alignment(baseline[0], label_atoms), label_alignment(model[0], label_atoms)
    print("part of each true label atom inside span(D), ‖P_D a‖: two-stage "
          + ", ".join(f"{a:.2f}" for a in align_base) + "; task-driven "
          + ", ".join(f"{a:.2f}" for a in align_task))

    fig = Figure(figsize=(9.5, 3.8), layout="constrained")
    ax_loss, ax_align = fig.subplots(1, 2)
    ax_loss.plot(history, color="C3", label="task-driven (implicit dL/dD)")
    ax_loss.axhline(history[0], color="C0", linestyle="--", label="two-stage baseline")
    ax_loss.set_xlabel("projected-gradient step")
    ax_loss.set_ylabel("training logistic loss")
    ax_loss.set_title(f"test accuracy: two-stage {base_acc:.2f}, task-driven {task_acc:.2f}")
    ax_loss.legend()
    positions = np.arange(len(align_base))
    ax_align.bar(positions - 0.2, align_base, width=0.4, color="C0", label="two-stage")
    ax_align.bar(positions + 0.2, align_task, width=0.4, color="C3", label="task-driven")
    ax_align.set_xticks(positions, [f"label atom {i}" for i in positions])
    ax_align.set_ylim(0, 1.05)
    ax_align.set_ylabel(r"$\|P_{\mathrm{span}(D)}\, a\|$ for a unit label atom $a$")
    ax_align.set_title(f"k = {k} atoms, d = {args.dim}, n = {n}")
    ax_align.legend()
    fig.suptitle("Task-driven dictionary learning vs two-stage (sparse codes differentiated implicitly)")
    _common.save_figure(fig, out, "sparse_coding.png", timer, dpi=110)
    return fd_error, unrolled_difference, ratio, (base_acc, task_acc)


if __name__ == "__main__":
    main()
