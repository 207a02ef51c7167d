"""How does a jammed 2D packing move when the small particles grow?

The molecular-dynamics experiment of Blondel et al., "Efficient and Modular Implicit
Differentiation" (NeurIPS 2022): relax the bundled 128-particle binary soft-sphere
packing (diameters σ_A = 1.0, σ_B = 1.4, packing fraction 0.90, reduced units), then
differentiate the relaxed positions R* w.r.t. the diameter of the small particles σ_A.

* Implicit differentiation, forward mode: ``ms.sensitivity`` solves
  H dR*/dθ = −∂²E/∂R∂θ (one CG solve with the Hessian H, never unrolling the minimizer).
  The direction "σ_A grows by 1" changes the additive mixing matrix
  σ_ij = (σ_i + σ_j)/2 by dσ = [[1, ½], [½, 0]].
* Independent check: central finite differences of re-relaxed packings,
  (R*(σ_A + h) − R*(σ_A − h)) / 2h, both relaxed from R* (minimum image, net
  translation removed: the gauge ms.sensitivity returns).
* Figure: each particle as a disc of radius σ/2 with an arrow dR*/dσ_A.

Run: ``python examples/packing_sensitivity.py --out out/`` (about 30-40 s on 2 cores,
mostly compilation). Prints ``relative error (implicit vs finite differences): ...``.
"""

from __future__ import annotations

import _common

_common.headless()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.plot import sensitivity_arrows  # noqa: E402


def minimum_image(D, cell):
    frac = np.linalg.solve(cell.T, D.T).T
    return (frac - np.round(frac)) @ cell


def contacts(system, diameters):
    """Overlapping neighbors of each particle (soft spheres interact only when r < σ_ij)."""
    R, cell = np.asarray(system.positions), np.asarray(system.cell)
    d = np.array([diameters[system.symbols[k]] for k in np.asarray(system.species)])
    D = minimum_image((R[:, None] - R[None]).reshape(-1, R.shape[1]), cell).reshape(len(R), len(R), -1)
    touching = np.linalg.norm(D, axis=-1) < (d[:, None] + d[None]) / 2
    np.fill_diagonal(touching, False)
    return touching.sum(axis=1)


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--fmax", type=float, default=1e-12, help="force criterion of the relaxation")
    p.add_argument("--h", type=float, default=1e-5, help="finite-difference step in σ_A")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()

    system = ms.read(ms.data.path("soft_spheres_2d.xyz"))
    diameters = {"A": 1.0, "B": 1.4}
    pot = ms.potentials.SoftSphere(sigma=diameters)  # harmonic contacts, ε = 1
    print(f"{system}, species {system.symbols}, diameters {diameters}")

    # One compiled relaxation, reused for the finite-difference re-relaxations.
    relax_fn = ms.make_relax(pot, system)
    res = relax_fn(system, fmax=args.fmax, max_steps=200_000)
    assert res.converged, "relaxation did not converge"
    timer(f"relaxed: {res.steps} L-BFGS steps, fmax = {res.fmax:.2e}, E* = {float(res.energy):.6g}")

    # d(params) for "σ_A grows by 1" (additive mixing); ε and α do not change.
    tangent = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    tangent["sigma"] = np.array([[1.0, 0.5], [0.5, 0.0]])

    sens = ms.sensitivity(res, pot, wrt={"sigma_A": tangent})
    dR = sens.dpositions[0]  # (N, 2): dR*/dσ_A, no net translation
    timer("implicit dR*/dσ_A (forward mode, one CG solve; compile and stability check included)")
    print(sens.table())
    if sens.n_soft_modes:
        print(f"note: {sens.n_soft_modes} soft modes (rattlers) are gauge-fixed; finite "
              "differences may move rattlers arbitrarily.")

    # Finite differences of re-relaxed structures: the independent truth.
    h = args.h
    ends = []
    for sign in (+1, -1):
        params = {k: jnp.asarray(np.asarray(v) + sign * h * tangent[k], jnp.float64)
                  for k, v in pot.params.items()}
        r = relax_fn(res.system, params=params, fmax=args.fmax / 10, max_steps=200_000)
        assert r.converged, "finite-difference re-relaxation did not converge"
        ends.append(np.asarray(r.system.positions))
    cell = np.asarray(system.cell)
    fd = minimum_image(ends[0] - ends[1], cell) / (2 * h)
    # Rattlers (fewer than d + 1 contacts) move arbitrarily in re-relaxations and carry
    # no implicit response (their free directions are gauge-fixed): compare the rest, in
    # the same gauge (no net translation of the rigid particles).
    rigid = contacts(res.system, diameters) > system.dim
    fd -= fd[rigid].mean(axis=0)
    timer(f"finite differences: 2 re-relaxations, h = {h:g}")

    rel = float(np.linalg.norm(fd[rigid] - dR[rigid]) / np.linalg.norm(dR[rigid]))
    if not rigid.all():
        print(f"{int((~rigid).sum())} rattler(s) left out of the comparison")
    worst = int(np.argmax(np.linalg.norm(dR, axis=1)))
    print(f"particle {worst} (largest response, species {system.symbols[int(system.species[worst])]}):")
    print(f"  implicit            dR*/dσ_A = {dR[worst]}")
    print(f"  finite differences  dR*/dσ_A = {fd[worst]}")
    print(f"dE*/dσ_A = {sens.denergy[0]:.10g} (total), {sens.denergy_partial[0]:.10g} (partial; equal at a minimum)")
    print(f"relative error (implicit vs finite differences): {rel:.3e}")

    fig = sensitivity_arrows(
        res.system, dR, radii={s: d / 2 for s, d in diameters.items()},
        label=r"$\mathrm{d}R^*/\mathrm{d}\sigma_A$", length_unit=r"$\sigma_A$", displacement_unit="",
        title=f"Relaxed packing, N = {system.n_atoms}: response to the small diameter $\\sigma_A$",
    )
    _common.save_figure(fig, out, "packing_sensitivity.png", timer, dpi=110)
    return rel


if __name__ == "__main__":
    main()
