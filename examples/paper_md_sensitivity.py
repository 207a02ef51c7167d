"""The molecular-dynamics figure of Blondel et al. (NeurIPS 2022, §4), in the paper's setting.

jax-md's bubble-raft experiment: a 2D periodic binary soft-sphere packing of N = 128
particles (reduced units, lengths in σ_B): half of diameter D (species A), half of
diameter 1 (species B), σ_AA = D, σ_BB = 1, σ_AB = (1 + D)/2, soft spheres with ε = 1,
α = 2, at packing fraction φ = 0.98, i.e. a square box of side
L(D) = sqrt(N π (1 + D²) / 8 / φ); D = 0.6 by default. It is relaxed with FIRE from
uniformly random positions, and the relaxed positions R* are differentiated w.r.t. D:

* **fixed box**: ``ms.sensitivity`` along the direction dσ/dD = [[1, ½], [½, 0]] (D
  enters σ_AA and σ_AB): one forward-mode implicit solve, H dR*/dD = −∂²E/∂R∂D;
* **box following D** at fixed φ, as in jax-md's experiment: the cell-derivative
  machinery, ``ms.sensitivity(..., wrt="cell")`` (strain at fixed fractional
  coordinates, affine part included), by the chain rule
  dR*/dD = ∂R*/∂D|_L + (d ln L/dD)(dR*/dε_xx + dR*/dε_yy), d ln L/dD = D/(1 + D²).

Gauge: a periodic packing can translate freely, so derivatives are compared modulo that
zero mode: every one is re-centred (no net translation), the implicit ones included.

Independent checks, printed as relative errors: central finite differences of FIRE
re-relaxations at D ± h (the box rescaled with L(D ± h) in the second case), and
−H⁺ ∂²E/∂R∂D from a dense pseudo-inverse of the Hessian (``jax.hessian`` of the energy
at R*). Figure: the relaxed packing at scale with its periodic images and the arrows
dR*/dD, for both cases, and the distribution of |dR*_i/dD| by species.

Run: ``python examples/paper_md_sensitivity.py --out out/`` (1-2 min on 2 cores, mostly
compilation, so ``--n 32`` is hardly faster). ``--out docs/figures`` regenerates the
README's figure.
"""

from __future__ import annotations

import _common

_common.headless()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.plot import SPECIES_COLORS, sensitivity_arrows  # noqa: E402

SYMBOLS = ("A", "B")
#: dσ/dD: D is σ_AA and enters σ_AB = (1 + D)/2 with weight ½; σ_BB = 1 does not move.
SIGMA_TANGENT = np.array([[1.0, 0.5], [0.5, 0.0]])
#: Relative cut of the dense pseudo-inverse: the two translations are exact zeros
#: (~1e-15 λ_max), the softest vibration ~1e-3 λ_max.
PINV_RCOND = 1e-10


# ------------------------------------------------------------------------ the setting
def box_side(n: int, diameter: float, packing_fraction: float):
    """L with N/2 discs of diameter D and N/2 of diameter 1 filling φ of an L × L box."""
    return jnp.sqrt(n * jnp.pi * (1 + diameter**2) / 8 / packing_fraction)


def dlog_box_side(diameter: float) -> float:
    """d ln L / dD at fixed N and φ."""
    return diameter / (1 + diameter**2)


def sigma_matrix(diameter):
    """Contact distances σ_ab for species (A, B) = (diameter D, diameter 1)."""
    return jnp.array([[diameter, (1 + diameter) / 2], [(1 + diameter) / 2, 1.0]], dtype=jnp.float64)


def packing(n: int, diameter: float, packing_fraction: float, seed: int):
    """The unrelaxed packing (uniform random positions, as jax-md's experiment) and its potential."""
    side = float(box_side(n, diameter, packing_fraction))
    positions = jax.random.uniform(jax.random.PRNGKey(seed), (n, 2), jnp.float64) * side
    species = np.repeat([0, 1], n // 2)  # first half A (diameter D), second half B (diameter 1)
    system = ms.System(positions=positions, cell=side * np.eye(2), species=species, symbols=SYMBOLS, pbc=True)
    pot = ms.potentials.SoftSphere(sigma=np.asarray(sigma_matrix(diameter)), epsilon=1.0, alpha=2.0,
                                   symbols=SYMBOLS)
    return system, pot


def params_at(pot, diameter):
    return dict(pot.params, sigma=sigma_matrix(diameter))


def recentred(dR):
    """Modulo the translational zero mode: no net translation."""
    dR = np.asarray(dR)
    return dR - dR.mean(axis=0)


def relative_error(a, reference) -> float:
    return float(np.linalg.norm(np.asarray(a) - reference) / np.linalg.norm(reference))


# ------------------------------------------------------------------------ derivatives
def implicit_derivatives(result, pot):
    """``(sens, strain)``: ``ms.sensitivity`` along dσ/dD (box fixed) and w.r.t. the cell
    (Voigt strain xx, yy, xy at fixed fractional coordinates, affine part included)."""
    tangent = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    tangent["sigma"] = SIGMA_TANGENT
    return ms.sensitivity(result, pot, wrt={"D": tangent}), ms.sensitivity(result, pot, wrt="cell")


def box_following(fixed_box, strain, diameter):
    """dR*/dD when L follows D: the box side scales isotropically, ε_xx = ε_yy = d ln L."""
    return fixed_box + dlog_box_side(diameter) * (strain.dpositions[0] + strain.dpositions[1])


def dense_derivatives(system, pot, diameter, packing_fraction):
    """``(fixed_box, box_following, eigenvalues)``: −H⁺ ∂(∇_R E)/∂D with a dense Hessian.

    Cartesian positions are held fixed while D changes σ (and the cell, in the second
    case): R*(D) solves ∇_R E(R*, σ(D), cell(D)) = 0 either way, and the pseudo-inverse
    picks the solution without net translation.
    """
    energy = pot.energy_fn(system, neighbor_list=False)  # all pairs: exact, N is small
    R, n = system.positions, system.n_atoms
    side0 = box_side(n, diameter, packing_fraction)

    def force_gradient(d, follow):
        cell = system.cell * (box_side(n, d, packing_fraction) / side0 if follow else 1.0)
        return jax.grad(energy)(R, params_at(pot, d), cell)

    @jax.jit
    def hessian_and_mixed(d):
        H = jax.hessian(energy)(R, params_at(pot, d), system.cell).reshape(2 * n, 2 * n)
        mixed = [jax.jacfwd(lambda x: force_gradient(x, follow))(d).ravel() for follow in (False, True)]
        return H, mixed

    H, (b_fixed, b_follow) = hessian_and_mixed(jnp.float64(diameter))
    H = np.asarray(H)
    H_pinv = np.linalg.pinv(H, rcond=PINV_RCOND, hermitian=True)
    return ((-H_pinv @ np.asarray(b_fixed)).reshape(n, 2), (-H_pinv @ np.asarray(b_follow)).reshape(n, 2),
            np.linalg.eigvalsh(H))


def aligned(relaxed, reference_fractional, cell):
    """``relaxed`` positions unwrapped to the periodic image nearest ``reference_fractional``."""
    shift = np.asarray(relaxed) @ np.linalg.inv(cell) - reference_fractional
    return (reference_fractional + shift - np.round(shift)) @ cell


def finite_differences(relax_fn, result, pot, diameter, packing_fraction, h, fmax):
    """``(fixed_box, box_following, steps)``: central differences of FIRE re-relaxations at
    D ± h, started from R* (scaled with the box when it follows D), re-centred."""
    system = result.system
    n = system.n_atoms
    cell0 = np.asarray(system.cell)
    fractional = np.asarray(system.positions) @ np.linalg.inv(cell0)
    side0 = float(box_side(n, diameter, packing_fraction))
    out, steps = [], []
    for follow in (False, True):
        ends = []
        for d in (diameter + h, diameter - h):
            cell = cell0 * (float(box_side(n, d, packing_fraction)) / side0 if follow else 1.0)
            start = system.replace(positions=fractional @ cell, cell=cell)
            r = relax_fn(start, params=params_at(pot, d), fmax=fmax, max_steps=500_000)
            if not r.converged:
                raise RuntimeError(f"the re-relaxation at D = {d} did not converge (fmax = {r.fmax:.3e}).")
            ends.append(aligned(r.system.positions, fractional, cell))
            steps.append(r.steps)
        out.append(recentred((ends[0] - ends[1]) / (2 * h)))
    return out[0], out[1], steps


# ------------------------------------------------------------------------ figure
def figure(system, fixed_box, following, diameter, packing_fraction, steps):
    """(a), (b): the packing to scale with its periodic images and dR*/dD arrows, box fixed
    and box following D; (c): histograms of |dR*_i/dD| by species."""
    from matplotlib.figure import Figure

    n = system.n_atoms
    radii = {"A": diameter / 2, "B": 0.5}
    side = float(box_side(n, diameter, packing_fraction))
    fig = Figure(figsize=(12.5, 11.0), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.985))  # room above the titles (equal-aspect panels)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 0.42])
    common = dict(radii=radii, length_unit=r"$\sigma_B$", displacement_unit="", clip_to_cell=False,
                  label=r"$\mathrm{d}R^*_i/\mathrm{d}D$")
    sensitivity_arrows(system, fixed_box, ax=fig.add_subplot(grid[0, 0]),
                       title=r"(a) box fixed: $D$ enters $\sigma_{AA}$ and $\sigma_{AB}$", **common)
    # the cell rows grow by dL/dD: an image one cell over moves by that much more
    sensitivity_arrows(system, following, ax=fig.add_subplot(grid[0, 1]),
                       dcell=side * dlog_box_side(diameter) * np.eye(2),
                       title="(b) box side L(D) following D at fixed $\\phi$: affine + relaxation", **common)

    ax = fig.add_subplot(grid[1, :])
    species = np.asarray(system.species)
    norms = {"fixed box": np.linalg.norm(fixed_box, axis=1), "box following D": np.linalg.norm(following, axis=1)}
    everything = np.concatenate(list(norms.values()))
    bins = np.geomspace(max(everything.min(), 1e-6 * everything.max()), everything.max(), 36)
    for k, sym in enumerate(SYMBOLS):
        colour, chosen = SPECIES_COLORS[k], species == k
        name = f"{sym} (diameter {diameter if sym == 'A' else 1.0:g})"
        ax.hist(norms["fixed box"][chosen], bins=bins, histtype="stepfilled", color=colour, alpha=0.45,
                edgecolor=colour, linewidth=1.0, label=f"{name}, fixed box")
        ax.hist(norms["box following D"][chosen], bins=bins, histtype="step", color=colour, linewidth=2.0,
                linestyle="--", label=f"{name}, box following D")
    ax.set_xscale("log")
    ax.set_xlabel(r"per-particle $|\mathrm{d}R^*_i/\mathrm{d}D|$ ($\sigma_B$ per unit $D$: dimensionless)")
    ax.set_ylabel("number of particles")
    ax.set_title(f"(c) distribution of the response by species; N = {n}, D = {diameter:g}, "
                 f"$\\phi$ = {packing_fraction:g}, relaxed by FIRE in {steps} steps")
    ax.legend(fontsize="small", ncol=2)
    return fig


# ------------------------------------------------------------------------ main
def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="number of particles (even; half of each species)")
    p.add_argument("--diameter", type=float, default=0.6, help="diameter D of species A (σ_B = 1)")
    p.add_argument("--packing-fraction", type=float, default=0.98, help="packing fraction φ")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial positions")
    p.add_argument("--fmax", type=float, default=1e-12, help="force criterion of the relaxations")
    p.add_argument("--h", type=float, default=1e-6, help="finite-difference step in D")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()
    D, phi = args.diameter, args.packing_fraction

    if args.n % 2 or args.n < 8:
        p.error(f"--n must be an even number >= 8 (half of each species); got {args.n}.")
    system, pot = packing(args.n, D, phi, args.seed)
    print(f"{system}: N/2 of diameter D = {D:g} (A), N/2 of diameter 1 (B), φ = {phi:g}, "
          f"L = {float(box_side(args.n, D, phi)):.6g}; σ = {np.asarray(pot.params['sigma']).tolist()}")
    relax_fn = ms.make_relax(pot, system, minimizer=ms.FIRE())  # compiled once, reused for FD
    result = relax_fn(system, fmax=args.fmax, max_steps=500_000)
    if not result.converged:
        raise RuntimeError(f"the relaxation did not converge (fmax = {result.fmax:.3e}).")
    timer(f"relaxed: {result.steps} FIRE steps, fmax = {result.fmax:.2e}, E* = {float(result.energy):.8g}")

    sens, strain = implicit_derivatives(result, pot)
    timer("implicit dR*/dD and dR*/dε (forward mode, one CG solve per direction; "
          "compilation and stability analysis included)")
    print(sens.table())
    if sens.n_soft_modes:
        print(f"note: {sens.n_soft_modes} soft modes (rattlers) are gauge-fixed to zero response")
    implicit_derivatives(result, pot)
    timer("the same again, compiled (what a new structure or parameter value costs)")
    fixed_box = recentred(sens.dpositions[0])
    following = recentred(box_following(sens.dpositions[0], strain, D))

    dense_fixed, dense_follow, eigenvalues = dense_derivatives(result.system, pot, D, phi)
    n_zero = int(np.sum(np.abs(eigenvalues) <= PINV_RCOND * eigenvalues.max()))
    timer(f"dense pseudo-inverse ({2 * args.n}×{2 * args.n} Hessian, {n_zero} zero modes, "
          f"λ_min/λ_max = {eigenvalues[n_zero] / eigenvalues.max():.3g})")

    fd_fixed, fd_follow, fd_steps = finite_differences(relax_fn, result, pot, D, phi, args.h, args.fmax / 10)
    timer(f"finite differences: 4 FIRE re-relaxations, h = {args.h:g}, steps {fd_steps}")

    worst = int(np.argmax(np.linalg.norm(fixed_box, axis=1)))
    print(f"particle {worst} (largest response, species {SYMBOLS[int(system.species[worst])]}):")
    print(f"  implicit            dR*/dD = {fixed_box[worst]} (fixed box), {following[worst]} (box following)")
    print(f"  finite differences  dR*/dD = {fd_fixed[worst]} (fixed box), {fd_follow[worst]} (box following)")
    print(f"  dense pseudo-inv.   dR*/dD = {dense_fixed[worst]} (fixed box), {dense_follow[worst]} (box following)")
    species = np.asarray(system.species)
    for name, dR in (("fixed box", fixed_box), ("box following", following)):
        norms = np.linalg.norm(dR, axis=1)
        print(f"|dR*_i/dD| {name}: median A {np.median(norms[species == 0]):.4g}, "
              f"B {np.median(norms[species == 1]):.4g}; max {norms.max():.4g}")
    errors = {
        "fd_fixed": relative_error(fixed_box, fd_fixed),
        "fd_follow": relative_error(following, fd_follow),
        "pinv_fixed": relative_error(fixed_box, dense_fixed),
        "pinv_follow": relative_error(following, dense_follow),
    }
    print(f"relative error (implicit vs finite differences, fixed box): {errors['fd_fixed']:.3e}")
    print(f"relative error (implicit vs finite differences, box following): {errors['fd_follow']:.3e}")
    print(f"relative error (implicit vs dense pseudo-inverse, fixed box): {errors['pinv_fixed']:.3e}")
    print(f"relative error (implicit vs dense pseudo-inverse, box following): {errors['pinv_follow']:.3e}")

    fig = figure(result.system, fixed_box, following, D, phi, result.steps)
    _common.save_figure(fig, out, "paper_md_sensitivity.png", timer, dpi=100)
    return errors


if __name__ == "__main__":
    main()
