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
   (``ms.sensitivity``, with its stability check: a true minimum, no rattlers).
3. At iterates R_k along the way, the **implicit** Jacobian −H(R_k)⁺ ∂²E/∂R∂θ(R_k)
   (``make_sensitivity``: compiled once, one CG solve per iterate).
4. Plot ‖J_k − J*‖/‖J*‖ for both against ‖R_k − R*‖ (minimum image, net translation
   removed, the gauge of ms.sensitivity), with ``mdsens.plot.error_curve``.

Run: ``python examples/jacobian_error.py --out out/`` (about 20 s on 2 cores).
"""

from __future__ import annotations

import _common

_common.headless()

import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax_md import minimize  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.md.sensitivity import make_sensitivity  # noqa: E402
from mdsens.plot import error_curve  # noqa: E402


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

    reference = system.replace(positions=jnp.asarray(R[-1]))
    ref = ms.sensitivity(reference, pot, wrt={"sigma_A": tangent})
    J_star = ref.dpositions[0]
    norm = float(np.linalg.norm(J_star))
    print(f"reference R* = R_K: fmax = {ref.fmax:.2e}, λ_min = {ref.lambda_min:.3g}, "
          f"{ref.n_soft_modes} soft modes, ‖J*‖ = {norm:.4g}")
    timer("reference implicit Jacobian J* (with the stability check)")

    implicit_at = make_sensitivity(pot, system, wrt={"sigma_A": tangent}, stability=False,
                                   on_failure="ignore")
    # The iterates are unrelaxed on purpose: that is what the figure measures.
    warnings.filterwarnings("ignore", category=ms.NotConvergedWarning)
    rows = []
    for k in range(args.every - 1, args.steps - 1, args.every):
        sol = float(np.linalg.norm(gauge(R[k] - R[-1], wrap=True)))
        with warnings.catch_warnings():  # far from the minimum H is indefinite: CG may fail
            warnings.simplefilter("ignore")
            S = implicit_at(system.replace(positions=jnp.asarray(R[k])))
        e_imp = float(np.linalg.norm(S.dpositions[0] - J_star)) / norm
        e_unr = float(np.linalg.norm(gauge(dR_unrolled[k]) - J_star)) / norm
        rows.append((k + 1, S.fmax, sol, e_imp, e_unr))
    timer(f"implicit Jacobian at {len(rows)} iterates")
    print(f"{'step':>6} {'fmax':>10} {'|R_k-R*|':>10} {'implicit':>10} {'unrolled':>10}")
    for k, f, s, a, b in rows:
        print(f"{k:6d} {f:10.2e} {s:10.2e} {a:10.2e} {b:10.2e}")
    rows = np.array(rows)
    # Below ~1e-11 the reference itself (fmax ~1e-14, λ_min ~1e-2) is the limit.
    keep = rows[:, 2] > 1e-11
    sol, e_imp, e_unr = rows[keep, 2], rows[keep, 3], rows[keep, 4]
    close = sol < 1e-3
    ratio = np.median(e_unr[close] / e_imp[close]) if np.any(close) else float("nan")
    slope = np.polyfit(np.log(sol[close]), np.log(e_imp[close]), 1)[0] if close.sum() > 1 else float("nan")
    print(f"near the solution (‖R_k − R*‖ < 1e-3): implicit error ∝ ‖R_k − R*‖^{slope:.2f}; "
          f"the unrolled error is {ratio:.3g}× larger (median)")
    print(f"unrolled Jacobian after all {args.steps} steps: relative error "
          f"{np.linalg.norm(gauge(dR_unrolled[-1]) - J_star) / norm:.2e}")

    fig = error_curve(
        sol, {"implicit (at iterate $R_k$)": e_imp, "unrolled FIRE (forward mode)": e_unr},
        xlabel=r"solution error $\|R_k - R^*\|$ ($\sigma_A$)",
        ylabel=r"Jacobian error $\|J_k - J^*\|\,/\,\|J^*\|$ (relative)",
        title=f"Theorem 1 on the 2D packing (N = {system.n_atoms}): " r"$\mathrm{d}R^*/\mathrm{d}\sigma_A$",
    )
    _common.save_figure(fig, out, "jacobian_error.png", timer, dpi=110)
    return slope, ratio


if __name__ == "__main__":
    main()
