"""Theorem 1 in practice: the implicit Jacobian is as accurate as the solution it uses.

Blondel et al. (NeurIPS 2022), Theorem 1: evaluated at an approximate solution x̂ instead
of x*, the implicit Jacobian is off by at most C ‖x̂ − x*‖. Unrolled differentiation of
the same iterates also converges, but lags behind the iterates themselves.

The experiment, on the bundled 2D soft-sphere packing (128 particles, reduced units)
and the direction "the small diameter σ_A grows" (dσ = [[1, ½], [½, 0]]):

1. Run jax-md's FIRE (``jax_md.minimize.fire_descent``, its default time steps) for K
   steps with ``lax.scan`` from the stored (unrelaxed) positions, and push the tangent
   of σ_A through every step with ``jax.jvp``: the **unrolled** Jacobian dR_k/dσ_A at
   every iterate R_k (forward mode, so memory does not grow with K).
2. The reference: R* = R_K (max force ~1e-14) and J* = the implicit Jacobian there
   (``make_sensitivity`` with its stability check: a true minimum, no rattlers).
3. At iterates R_k along the way, the **implicit** Jacobian −H(R_k)⁺ ∂²E/∂R∂θ(R_k)
   (``make_sensitivity``: compiled once, one CG solve per iterate) and the
   **a-posteriori estimate** of its error that the same call reports
   (``Sensitivity.error_estimate``: twice the first-order error along the Newton step,
   ``inf`` where ``linearity`` > ``LINEARITY_MAX``; not shown where the Hessian
   at R_k is indefinite, which ``ms.sensitivity`` would refuse as a saddle).
4. Plot ‖J_k − J*‖/‖J*‖ for both, and the estimate, against ‖R_k − R*‖ (minimum image,
   net translation removed, the gauge of ms.sensitivity) and against the largest force
   at R_k (the ``fmax`` a relaxation stops at), with ``mdsens.plot.error_curve``; write
   the curves to ``jacobian_error.csv``.

Run: ``python examples/jacobian_error.py --out out/`` (about 1 min on 2 shared cores,
most of it compilation).
"""

from __future__ import annotations

import _common

_common.headless()

import csv  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax_md import minimize  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.jacobian_error import LINEARITY_MAX  # noqa: E402
from mdsens.md.sensitivity import make_sensitivity  # noqa: E402
from mdsens.plot import error_curve  # noqa: E402

#: Iterates closer to R* than this are left out of the slope fit: below it the reference
#: itself (fmax ~1e-14, λ_min ~7e-3) is the limit.
FIT_FLOOR = 1e-11
#: Rounding allowance, relative to ‖J*‖, when comparing the estimate with the error.
ROUNDING = 1e-12
#: Columns of jacobian_error.csv (one row per iterate where the implicit Jacobian was taken).
CSV_COLUMNS = ("step", "iterate_error", "fmax", "implicit_error", "unrolled_error", "estimate", "linearity",
               "outside_newton_basin", "lambda_min", "contacts_changed")


def unrolled_fire(energy, system, params, tangent, steps):
    """Iterates R_k and their forward-mode derivatives dR_k/dθ·t, k = 1..steps."""
    cell = jnp.asarray(system.cell)

    def wrap(R):
        frac = jnp.linalg.solve(cell.T, R.T).T
        return (frac - jnp.floor(frac)) @ cell  # floor: zero derivative, so dR passes through

    def trajectory(p):
        init, apply = minimize.fire_descent(lambda R: energy(R, p, cell),
                                            lambda R, dR, **_: wrap(R + dR))

        def step(state, _):
            state = apply(state)
            return state, state.position

        return jax.lax.scan(step, init(system.positions), None, length=steps)[1]

    R, dR = jax.jit(lambda p, t: jax.jvp(trajectory, (p,), (t,)))(params, tangent)
    return np.asarray(R), np.asarray(dR)


def contact_network(positions, species, sigma, cell):
    """Boolean (N, N) matrix of overlapping pairs, r_ij < σ_ij (minimum image).

    The harmonic soft sphere's Hessian jumps when a contact opens or closes, so an
    iterate with a different contact network than R* is outside the region where J is
    smooth in R: the first-order estimate cannot see that jump (see the CSV column)."""
    D = positions[:, None, :] - positions[None, :, :]
    frac = D @ np.linalg.inv(cell)
    D = (frac - np.round(frac)) @ cell
    r = np.linalg.norm(D, axis=-1)
    s = 0.5 * (sigma + sigma.T)[species[:, None], species[None, :]]
    touching = r < s
    np.fill_diagonal(touching, False)
    return touching


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([f"{v:.17g}" if isinstance(v, float) else v for v in row])
    print(f"wrote {path}")


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1600, help="FIRE steps K (the last is the reference)")
    p.add_argument("--every", type=int, default=40, help="evaluate the implicit Jacobian every this many steps")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()

    system = ms.read(ms.data.path("soft_spheres_2d.xyz"))
    pot = ms.potentials.SoftSphere(sigma={"A": 1.0, "B": 1.4})
    energy = pot.energy_fn(system, neighbor_list=False)
    tangent = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    tangent["sigma"] = np.array([[1.0, 0.5], [0.5, 0.0]])
    tangent_j = {k: jnp.asarray(v, jnp.float64) for k, v in tangent.items()}

    R, dR_unrolled = unrolled_fire(energy, system, pot.params, tangent_j, args.steps)
    timer(f"unrolled jax-md FIRE with lax.scan + jax.jvp: {args.steps} steps")

    cell = np.asarray(system.cell)

    def gauge(D, wrap=False):
        if wrap:
            frac = np.linalg.solve(cell.T, D.T).T
            D = (frac - np.round(frac)) @ cell
        return D - D.mean(axis=0)

    # One compiled sensitivity for the reference and every iterate. Its stability analysis
    # gives λ_min, which the estimate needs. Far from the minimum the Hessian is indefinite:
    # ms.sensitivity would raise a SaddlePointError there; here such an iterate is recorded
    # with no estimate (NaN), and the reference is checked by hand below.
    implicit_at = make_sensitivity(pot, system, wrt={"sigma_A": tangent},
                                   stability=ms.StabilityOptions(raise_on_saddle=False, warn=False),
                                   on_failure="ignore")
    ref = implicit_at(system.replace(positions=jnp.asarray(R[-1])))
    if not (ref.lambda_min > 0 and ref.n_soft_modes == 0 and ref.solve_residual[0] < 1e-8):
        raise SystemExit(f"R_K is not a usable reference: λ_min = {ref.lambda_min:.3g}, "
                         f"{ref.n_soft_modes} soft modes, solve residual {ref.solve_residual[0]:.1e}; "
                         "run more --steps")
    J_star = ref.dpositions[0]
    norm = float(np.linalg.norm(J_star))
    print(f"reference R* = R_K: fmax = {ref.fmax:.2e}, λ_min = {ref.lambda_min:.3g}, "
          f"{ref.n_soft_modes} soft modes, ‖J*‖ = {norm:.4g}")
    timer("reference implicit Jacobian J* (with the stability check)")

    # The iterates are unrelaxed on purpose: that is what the figure measures.
    warnings.filterwarnings("ignore", category=ms.NotConvergedWarning)
    species = np.asarray(system.species)
    sigma = np.asarray(pot.params["sigma"])
    contacts_star = contact_network(R[-1], species, sigma, cell)
    rows = []
    for k in range(args.every - 1, args.steps - 1, args.every):
        sol = float(np.linalg.norm(gauge(R[k] - R[-1], wrap=True)))
        with warnings.catch_warnings():  # far from the minimum H is indefinite: CG may fail
            warnings.simplefilter("ignore")
            S = implicit_at(system.replace(positions=jnp.asarray(R[k])))
        e_imp = float(np.linalg.norm(S.dpositions[0] - J_star)) / norm
        e_unr = float(np.linalg.norm(gauge(dR_unrolled[k]) - J_star)) / norm
        # ms.sensitivity refuses an indefinite Hessian (a saddle): no estimate there
        estimate = float(S.error_estimate[0]) / norm if S.lambda_min > 0 else float("nan")
        outside = int(S.lambda_min > 0 and not S.linearity <= LINEARITY_MAX)  # reported as inf
        changed = int(np.sum(contact_network(R[k], species, sigma, cell) != contacts_star) // 2)
        rows.append((k + 1, sol, float(S.fmax), e_imp, e_unr, estimate, float(S.linearity), outside,
                     float(S.lambda_min), changed))
    timer(f"implicit Jacobian and its error estimate at {len(rows)} iterates")
    write_csv(out / "jacobian_error.csv", rows)

    print(f"{'step':>6} {'fmax':>9} {'|R_k-R*|':>9} {'implicit':>9} {'unrolled':>9} {'estimate':>9} "
          f"{'est/impl':>9} {'linearity':>9} {'contacts':>8}")
    for k, s, f, a, b, est, lin, fb, lam, ch in rows:
        print(f"{k:6d} {f:9.2e} {s:9.2e} {a:9.2e} {b:9.2e} {est:9.2e} {est / a:9.3g} {lin:9.2e} {ch:8d}"
              + ("  (linearity > max: estimate inf)" if fb else "")
              + ("  (λ_min < 0: no estimate)" if not lam > 0 else ""))
    table = np.array([r[:7] for r in rows], dtype=float)
    steps, sol, fmax, e_imp, e_unr, est, lin = table.T
    outside = np.array([r[7] for r in rows], bool)

    # Theorem 1: the implicit error is linear in the solution error near R*
    keep = sol > FIT_FLOOR
    close = keep & (sol < 1e-3)
    ratio = np.median(e_unr[close] / e_imp[close]) if np.any(close) else float("nan")
    slope = np.polyfit(np.log(sol[close]), np.log(e_imp[close]), 1)[0] if close.sum() > 1 else float("nan")
    print(f"near the solution (‖R_k − R*‖ < 1e-3): implicit error ∝ ‖R_k − R*‖^{slope:.2f}; "
          f"the unrolled error is {ratio:.3g}× larger (median)")
    print(f"unrolled Jacobian after all {args.steps} steps: relative error "
          f"{np.linalg.norm(gauge(dR_unrolled[-1]) - J_star) / norm:.2e}")

    # The estimate against the true error. Its floor is the estimate at R* itself (twice
    # the error of ms.sensitivity's own solve there), which the truth J* shares: only
    # errors above it say whether the first-order part is right.
    floor = float(ref.error_estimate[0]) / norm
    has = np.isfinite(est)
    bounded = est[has] >= e_imp[has] - ROUNDING
    newton = has & (lin <= LINEARITY_MAX)
    above = newton & (e_imp > floor)
    q = est / e_imp
    print(f"estimate floor (estimate at R*, relative to ‖J*‖): {floor:.3e}")
    print(f"estimate ≥ implicit error at every iterate with an estimate: {bool(np.all(bounded))} "
          f"({int(bounded.sum())} of {int(has.sum())}; smallest estimate/error "
          f"{np.min(q[has]):.3g} at step {int(steps[has][np.argmin(q[has])])})")
    print(f"estimate/error where linearity ≤ {LINEARITY_MAX:g} ({int(newton.sum())} iterates): "
          f"min {np.min(q[newton]):.3g}, max {np.max(q[newton]):.3g}")
    print(f"estimate/error where linearity ≤ {LINEARITY_MAX:g} and the error is above the estimate floor "
          f"({int(above.sum())} iterates): min {np.min(q[above]):.3g}, max {np.max(q[above]):.3g}")
    print(f"iterates outside the Newton basin (linearity > {LINEARITY_MAX:g}, estimate inf): {int(outside.sum())}")
    print(f"iterates with an indefinite Hessian (λ_min < 0, refused by ms.sensitivity): "
          f"{int(np.isnan(est).sum())}")

    # Two views of the same iterates: the distance to R* (Theorem 1's variable, unknown in
    # practice) and the largest force (what a relaxation's fmax controls).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 4.6), layout="constrained")
    ax_sol, ax_f = fig.subplots(1, 2)
    curves = {"implicit (at iterate $R_k$)": e_imp, "unrolled FIRE (forward mode)": e_unr}
    ylabel = r"Jacobian error $\|J_k - J^*\|\,/\,\|J^*\|$ (relative)"
    error_curve(sol, curves, ax=ax_sol, estimate=np.where(has, est, np.nan),
                xlabel=r"solution error $\|R_k - R^*\|$ ($\sigma_A$)", ylabel=ylabel,
                title="against the distance to the minimum")
    error_curve(fmax, curves, ax=ax_f, estimate=np.where(has, est, np.nan), reference_label=r"$\propto$ fmax",
                xlabel=r"largest force at $R_k$, fmax ($\epsilon/\sigma_A$)", ylabel=ylabel,
                title="against the force residual")
    for ax, x in ((ax_sol, sol), (ax_f, fmax)):  # where the estimate is inf: on the implicit error
        if outside.any():
            ax.plot(x[outside], e_imp[outside], linestyle="none", marker="o", markersize=9,
                    markerfacecolor="none", markeredgecolor="black",
                    label=f"estimate inf (linearity > {LINEARITY_MAX:g})")
            ax.legend(fontsize="small")
    fig.suptitle(f"Theorem 1 on the 2D packing (N = {system.n_atoms}), FIRE iterates: "
                 r"$\mathrm{d}R^*/\mathrm{d}\sigma_A$")
    _common.save_figure(fig, out, "jacobian_error.png", timer, dpi=110)
    return slope, ratio


if __name__ == "__main__":
    main()
