"""Theorem 1 on ridge regression: the implicit Jacobian is as precise as the solution it uses.

Ridge regression on the diabetes data (Efron et al. 2004, bundled as ``ms.data.diabetes()``:
442 patients, 10 features; X and y standardized, so every quantity below is
dimensionless):

    w*(λ) = argmin_w (1/2n) ‖X w − y‖² + (λ/2) ‖w‖²,    F(w, λ) = Xᵀ(X w − y)/n + λ w.

Gradient descent, w_{k+1} = w_k − F(w_k, λ)/L from w_0 = 0, produces iterates w_k, and
``mdsens.jacobian_error.error_curve`` records at each one (spectral norms):

* the iterate error ‖w_k − w*‖;
* the implicit Jacobian error ‖J(w_k) − J*‖, J(w) = −(∂₁F)⁻¹ ∂₂F evaluated at w_k;
* the unrolled Jacobian error ‖∂w_k/∂λ − J*‖ (forward mode through k steps);
* Theorem 1's bound C ‖w_k − w*‖, C = β/α + γR/α², with the constants estimated by
  ``bound_constants`` (here exactly α = λ_min(XᵀX/n + λI), β = 1, γ = 0, R = ‖w*‖);
* the a-posteriori estimate C ‖F(w_k)‖/α, which needs no w*.

The reference w* and J* come from 10× more gradient steps; the script checks them against
the closed form w* = (XᵀX/n + λI)⁻¹Xᵀy/n, J* = −(XᵀX/n + λI)⁻¹ w*. With ``--per-feature``
θ is one λ per feature (J* is 10 × 10). It writes ``jacobian_precision.png`` (log–log
Jacobian error vs iterate error) and ``jacobian_precision.csv`` (the curves), and prints the
fitted slope of log(implicit error) vs log(iterate error): Theorem 1 says 1.

Run: ``python examples/jacobian_precision.py --out out/`` (about 20 s on 2 cores, most of it
``import mdsens`` and compilation).
"""

from __future__ import annotations

import _common

_common.headless()

import csv  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens import jacobian_error  # noqa: E402
from mdsens.plot import error_curve as plot_error_curve  # noqa: E402

#: Iterates closer to w* than this (relative to ‖w*‖) are left out of the slope fit: there
#: the reference's own rounding error (~1e-15) is no longer negligible.
FIT_FLOOR = 1e-10
#: Rounding allowance, relative to ‖J*‖, when comparing the implicit error with the bound.
ROUNDING = 1e-12
#: Points drawn per curve (the CSV has every iterate).
PLOT_POINTS = 40


def standardized_diabetes():
    """``(X, y)`` with zero-mean, unit-variance columns and response (dimensionless)."""
    X, y = ms.data.diabetes()
    return (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()


def ridge_problem(X, y):
    """``F(w, λ)`` and the gradient-descent step (step size 1/L, L = λ_max(XᵀX/n) + max λ)."""
    n = X.shape[0]
    gram, rhs = jnp.asarray(X.T @ X / n), jnp.asarray(X.T @ y / n)

    def F(w, lam):
        return gram @ w - rhs + lam * w

    def make_step(lam):
        step_size = 1.0 / (float(np.linalg.eigvalsh(np.asarray(gram)).max()) + float(np.max(lam)))
        return lambda w, lam: w - step_size * F(w, lam)

    return F, make_step


def closed_form(X, y, lam):
    n = X.shape[0]
    H = X.T @ X / n + np.diag(np.broadcast_to(lam, (X.shape[1],)))
    w = np.linalg.solve(H, X.T @ y / n)
    J = -np.linalg.solve(H, np.diag(w) if np.ndim(lam) else w[:, None])
    return H, w, J


def loglog_slope(x, y, floor):
    keep = (x > floor) & (y > 0) & np.isfinite(y)
    return np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0], int(keep.sum()), x[keep].max() / x[keep].min()


def write_csv(path, curve):
    columns = ["step", "iterate_error", "implicit_error", "unrolled_error", "bound", "residual_norm", "estimate"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in zip(*(getattr(curve, c) for c in columns)):
            writer.writerow([int(row[0])] + [f"{v:.17g}" for v in row[1:]])
    print(f"wrote {path}")


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--lam", type=float, default=0.1, help="ridge strength λ (dimensionless)")
    p.add_argument("--steps", type=int, default=600, help="gradient-descent steps K")
    p.add_argument("--per-feature", action="store_true", help="θ = one λ per feature instead of one λ")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()

    X, y = standardized_diabetes()
    lam = np.full(X.shape[1], args.lam) if args.per_feature else args.lam
    F, make_step = ridge_problem(X, y)
    H, w_exact, J_exact = closed_form(X, y, lam)
    curve = jacobian_error.error_curve(F, make_step(lam), jnp.zeros(X.shape[1]), lam, args.steps)
    timer(f"error curve: {args.steps} gradient steps, implicit and unrolled Jacobians at each")

    c = curve.constants
    print(f"reference vs closed form: ‖w* − w*_exact‖ = {np.linalg.norm(curve.x_star - w_exact):.2e}, "
          f"‖J* − J*_exact‖ = {np.linalg.norm(curve.jac_star - J_exact, 2):.2e}")
    print(f"constants (sampled on a ball of radius {c.radius:.3g}): α = {c.alpha:.6g} "
          f"(exact λ_min = {np.linalg.eigvalsh(H).min():.6g}), β = {c.beta:.6g} (exact 1), "
          f"γ = {c.gamma:.3g} (exact 0), R = {c.R:.6g} (exact ‖B(w*)‖ = "
          f"{np.linalg.norm(np.diag(w_exact) if args.per_feature else w_exact, 2):.6g}), C = {c.C:.6g}")
    # Late iterates approach w* along the slowest eigenvector, where the bound is attained;
    # compare up to the rounding of J(w_k) − J* (~1e-16 of ‖J*‖ per operation).
    rounding = ROUNDING * np.linalg.norm(curve.jac_star, 2)
    holds = bool(np.all(curve.implicit_error <= curve.bound + rounding))
    ratio = curve.implicit_error[1:] / curve.bound[1:]
    print(f"bound holds at every iterate (to {rounding:.0e}): {holds} "
          f"(largest implicit error / bound = {ratio.max():.6f})")
    slope, points, decades = loglog_slope(curve.iterate_error, curve.implicit_error,
                                          FIT_FLOOR * np.linalg.norm(w_exact))
    print(f"fitted slope of log(implicit error) vs log(iterate error): {slope:.4f} "
          f"({points} iterates over {np.log10(decades):.1f} decades; Theorem 1: 1)")
    last = args.steps
    print(f"at the last iterate (‖w_K − w*‖ = {curve.iterate_error[last]:.2e}): implicit error "
          f"{curve.implicit_error[last]:.2e}, unrolled error {curve.unrolled_error[last]:.2e} "
          f"({curve.unrolled_error[last] / curve.implicit_error[last]:.3g}× larger), a-posteriori "
          f"estimate {curve.estimate[last]:.2e}")

    write_csv(out / "jacobian_precision.csv", curve)
    # w_0 = 0 has no unrolled derivative yet: start at k = 1. The errors decay geometrically
    # in k, so evenly spaced steps are evenly spaced on the log axis.
    k = np.unique(np.linspace(1, args.steps, PLOT_POINTS).astype(int))
    theta = r"\lambda_j" if args.per_feature else r"\lambda"
    fig = plot_error_curve(
        curve.iterate_error[k],
        {r"implicit $J(w_k)$": curve.implicit_error[k],
         rf"unrolled $\partial w_k/\partial {theta}$ (forward mode)": curve.unrolled_error[k],
         r"Theorem 1 bound $C\,\|w_k - w^*\|$": curve.bound[k]},
        estimate=curve.estimate[k],
        xlabel=r"iterate error $\|w_k - w^*\|$ (dimensionless)",
        ylabel=r"Jacobian error $\|J - J^*\|_2$ (dimensionless)",
        title=f"Ridge on diabetes (λ = {args.lam:g}): gradient descent",
    )
    _common.save_figure(fig, out, "jacobian_precision.png", timer, dpi=110)
    return slope


if __name__ == "__main__":
    main()
