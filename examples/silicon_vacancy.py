"""A vacancy in Stillinger–Weber silicon: formation energy, relaxation volume, their
sensitivities to every potential parameter, first-order predictions and uncertainty.

Setting: diamond Si, ``ase.build.bulk("Si", "diamond", a=5.431, cubic=True)`` repeated
``--size`` n times along each axis (n = 3: 216 sites, 215 atoms with the vacancy), the
original SW parameters (``ms.potentials.StillingerWeber()``). The four neighbours of the
empty site start 0.4 Å towards it (from the ideal sites they sit in a shallow local
minimum, 3.84 Å apart, just outside the 3.77 Å cutoff; pushed in they bond to each other:
the known SW vacancy, E_f ≈ 2.8 eV). Every relaxation is L-BFGS to fmax = 1e-8 eV/Å.

Quantities (N lattice sites, one of them empty):

* formation energy ``E_f = E_vac − (N−1)/N · E_bulk``, at fixed cell (the perfect
  crystal's cell, a = 5.431 Å) and at zero stress (``ms.relax(..., relax_cell=True)``;
  the bulk at its own zero-stress lattice constant a₀);
* relaxation volume ``Ω_rel = V_vac − V_bulk`` of the zero-stress cells (same number of
  sites), cross-checked against the fixed-cell stress through the relaxed-ion elastic
  constants of the defective cell, ``Ω_rel ≈ −V Σ_{i≤3} [C⁻¹ (σ_vac − σ_bulk)]_i``
  (ASE stress sign, Voigt; equal to first order in the residual strain).

The perfect crystal needs no relaxation (every force vanishes by symmetry) and has a
closed form: only the 4 nearest neighbours lie inside the cutoff, so per atom
``e(x) = ε [2 A (B x⁻ᵖ − x⁻^q) e^{1/(x−a)} + 6 λ (−1/3 − cos θ₀)² e^{2γ/(x−a)}]`` with
``x = r_nn/σ``; the zero-stress lattice constant is ``a₀ = 4σx₀/√3`` with
``e'(x₀) = 0`` (one-dimensional implicit differentiation), hence exactly
``E_bulk* ∝ ε``, ``V_bulk* ∝ σ³``, both independent of λ. The fixed-cell bulk energy is
evaluated directly on the supercell (it includes second neighbours once σ grows enough
to bring them inside the cutoff); the two agree at the default parameters (printed).

Steps: (1) relax, E_f and Ω_rel; (2) dE_f/dθ, dΩ_rel/dθ for all 10 SW parameters
(``ms.sensitivity`` / ``ms.predict``'s Jacobian, with mdsens' error estimates);
(3) first-order predictions (``ms.predict``) against re-relaxation for λ and σ over
±5 % in 5 steps (errors O(Δθ²): the ratio of errors at 5 % and 2.5 % is ≈ 4);
(4) linearised uncertainty (``ms.propagate_uncertainty``) for independent 1 % relative
standard deviations of ε, σ and λ, against a small Monte Carlo of re-relaxations;
(5) the figure ``silicon_vacancy.png`` (relaxation field, predictions, uncertainty) and
CSVs; (6) clamped- and relaxed-ion elastic constants of the defective and the perfect
cell (``ms.elastic_constants``).

Run: ``python examples/silicon_vacancy.py --out out/`` (215 atoms, 20 Monte Carlo draws:
about 10-15 min on 2 busy shared cores, half of it compilation); ``--size 2`` (63 atoms,
what the slow test runs with ``--samples 12``) about 6-10 min, nearly all compilation.
``--samples`` sets the Monte Carlo size (each draw: two re-relaxations).
"""

from __future__ import annotations

import _common

_common.headless()

import csv  # noqa: E402

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.geometry import find_mic  # noqa: E402
from ase.units import GPa  # noqa: E402

import mdsens as ms  # noqa: E402

LATTICE = 5.431  # Å, the cell of the perfect crystal (fixed-cell calculations)
INWARD = 0.4  # Å, start of the four neighbours towards the empty site
FMAX = 1e-8  # eV/Å
SCAN = (-0.05, -0.025, 0.0, 0.025, 0.05)  # relative parameter changes of the scans
SCANNED = ("lam", "sigma")
UNCERTAIN = {"epsilon": 0.01, "sigma": 0.01, "lam": 0.01}  # relative standard deviations
#: Published SW values (Balamane, Halicioglu & Tiller, PRB 46, 2250 (1992)), GPa; the
#: clamped C44 as this project's elastic_si.py example computes it.
PUBLISHED = {"C11": 151.4, "C12": 76.4, "C44 relaxed": 56.4, "C44 clamped": 109.7}
SYMBOL = {"lam": "λ", "sigma": "σ", "epsilon": "ε"}


# ------------------------------------------------------------------------ structures
def structures(n: int):
    """``(perfect, start, site)``: the perfect n×n×n cubic supercell, the vacancy start
    (atom 0 removed, its four neighbours moved INWARD towards the site) and the site."""
    atoms = bulk("Si", "diamond", a=LATTICE, cubic=True).repeat((n, n, n))
    site = atoms.positions[0].copy()
    vac = atoms.copy()
    del vac[0]
    d, r = find_mic(vac.positions - site, vac.cell)
    nn = np.argsort(r)[:4]
    vac.positions[nn] -= INWARD * d[nn] / r[nn, None]
    return ms.System.from_ase(atoms), ms.System.from_ase(vac), site


def vacancy_setting(p, size: int):
    """``(pot, θ₀, perfect, start, site, c_n)`` for ``--size`` cubic cells per axis, refused
    by the parser ``p`` below 2; ``c_n = (N − 1)/N`` scales the bulk energy in E_f."""
    if size < 2:
        p.error("--size must be >= 2 (the 3.77 Å cutoff needs a cell wider than 7.5 Å)")
    pot = ms.potentials.StillingerWeber()
    perfect, start, site = structures(size)
    return pot, dict(pot.params), perfect, start, site, (perfect.n_atoms - 1) / perfect.n_atoms


def volume(cell) -> float:
    return float(abs(np.linalg.det(np.asarray(cell))))


# ------------------------------------------------------------------------ the perfect crystal
def bulk_energy_per_atom(x, p):
    """SW energy per atom of ideal diamond, nearest-neighbour distance x σ (eV): 2 bonds
    and 6 bond angles (cos = −1/3) per atom; exact while 1.633 x < a (no 2nd neighbours)."""
    f2 = p["A"] * (p["B"] * x ** (-p["p"]) - x ** (-p["q"])) * jnp.exp(1.0 / (x - p["a"]))
    f3 = p["lam"] * (-1.0 / 3.0 - p["costheta0"]) ** 2 * jnp.exp(2.0 * p["gamma"] / (x - p["a"]))
    return p["epsilon"] * (2.0 * f2 + 6.0 * f3)


@jax.jit
def zero_stress_x(p):
    """x₀ = r_nn/σ of the zero-stress crystal: Newton on e'(x) = 0, then one Newton step
    left differentiable, whose derivative is the implicit one, dx₀/dθ = −e_xθ/e_xx."""
    de = jax.grad(bulk_energy_per_atom)
    d2e = jax.grad(de)
    x = jnp.float64(2.0 ** (1.0 / 6.0))
    q = jax.lax.stop_gradient(p)
    for _ in range(12):  # quadratic convergence from 2^(1/6): ~1e-16 after 5
        x = x - de(x, q) / d2e(x, q)
    x = jax.lax.stop_gradient(x)
    return x - de(x, p) / d2e(x, p)


def bulk_zero_stress(p, n_sites):
    """``(E_bulk*, V_bulk*, a₀)``: energy (eV), volume (Å³) and lattice constant (Å) of
    the perfect zero-stress crystal of ``n_sites`` atoms (closed form; differentiable)."""
    x0 = zero_stress_x(p)
    a0 = 4.0 * p["sigma"] * x0 / jnp.sqrt(3.0)
    return n_sites * bulk_energy_per_atom(x0, p), n_sites * a0**3 / 8.0, a0


class FixedCellBulk:
    """Energy of the perfect supercell at the fixed cell (direct evaluation with
    ``pot.energy``: a fresh neighbor list per parameter set, so growing cutoffs are
    honoured)."""

    def __init__(self, pot, perfect):
        self.pot, self.perfect = pot, perfect
        self.E = pot.energy_fn(perfect, neighbor_list=True)
        self.nb0 = pot.neighbor_list(perfect)

    def traced(self, p):
        """jax-traceable at the default neighbour list (derivatives at θ₀)."""
        return self.E(self.perfect.positions, p, self.perfect.cell, self.nb0)

    def __call__(self, p) -> float:
        return float(self.pot.energy(self.perfect, p))


# ------------------------------------------------------------------------ helpers
def with_param(pot, name, relative):
    p = dict(pot.params)
    p[name] = jnp.asarray(float(pot.params[name]) * (1.0 + relative), jnp.float64)
    return p


def flat(p) -> np.ndarray:
    return np.asarray(jax.flatten_util.ravel_pytree(p)[0])


def energy_observable(pot, result, params):
    """``E(R, θ, cell)`` of the relaxed vacancy cell, jax-traceable (neighbor list of the
    relaxed structure; for derivatives at θ₀)."""
    E = pot.energy_fn(result.system, neighbor_list=True)
    nb = pot.neighbor_list(result.system, params)
    return lambda R, p, c: E(R, p, c, nb)


def displacements(relaxed, perfect, site):
    """``(r, u)``: distance of each perfect site from the vacancy (Å) and the displacement
    of the relaxed atom from it (Å, minimum image, net translation removed)."""
    ideal = np.asarray(perfect.positions)[1:]
    cell = np.asarray(perfect.cell)
    u, _ = find_mic(np.asarray(relaxed.positions) - ideal, cell)
    u -= u.mean(axis=0)
    d, r = find_mic(ideal - site, cell)
    return d, r, u


# ------------------------------------------------------------------------ figure
def figure(field, scan, errors, mc, lin, sens_rows, n_atoms, size):
    from matplotlib.figure import Figure

    d, r, u = field
    fig = Figure(figsize=(19.0, 9.6), layout="constrained")
    ax = fig.subplots(2, 4)
    norm = np.linalg.norm(u, axis=1)
    radial = np.sum(u * d, axis=1) / r
    inward = radial < 0
    a = ax[0, 0]
    floor = 1e-5  # sites whose displacement vanishes by symmetry (|u| ~ 1e-15) are drawn here
    shown = np.maximum(norm, floor)
    zero = norm < floor
    a.scatter(r[inward & ~zero], shown[inward & ~zero], s=18, c="tab:blue", label="inward (u·r̂ < 0)")
    a.scatter(r[~inward & ~zero], shown[~inward & ~zero], s=18, c="tab:red", marker="s", label="outward (u·r̂ > 0)")
    if zero.any():
        a.scatter(r[zero], shown[zero], s=22, c="tab:gray", marker="v", label=f"|u| < {floor:g} Å (zero by symmetry)")
    a.set_yscale("log")
    a.set_ylim(floor / 2, 2.0)
    a.set_xlabel("distance of the lattice site from the vacancy (Å)")
    a.set_ylabel("|u| = |R* − R_site| (Å)")
    a.set_title("(a) relaxation field around the vacancy")
    a.legend(fontsize="small")

    a = ax[0, 1]
    z = d[:, 2]
    layer = np.abs(z) < LATTICE / 4 + 0.1
    scale = 0.6 / max(norm[layer & (r > 3.0)].max(), 1e-12)  # shells beyond the first
    near = layer & (r < 3.0)
    for chosen, colour, label in ((layer & ~near, "tab:gray", f"×{scale:.0f}"), (near, "tab:blue", "×1 (first shell)")):
        a.quiver(d[chosen, 0], d[chosen, 1], u[chosen, 0] * (1.0 if colour == "tab:blue" else scale),
                 u[chosen, 1] * (1.0 if colour == "tab:blue" else scale), angles="xy", scale_units="xy", scale=1.0,
                 color=colour, width=0.004, label=f"displacement {label}")
    dots = a.scatter(d[layer, 0], d[layer, 1], s=14, c=z[layer], cmap="coolwarm", zorder=3)
    fig.colorbar(dots, ax=a, label="z − z_vac (Å)", shrink=0.8)
    a.plot([0], [0], "kx", ms=10, mew=2, label="vacant site")
    a.set_aspect("equal")
    a.set_xlabel("x − x_vac (Å)")
    a.set_ylabel("y − y_vac (Å)")
    a.set_title("(b) in-plane displacements, |z − z_vac| ≤ a/4")
    a.legend(fontsize="x-small", loc="upper right")

    for col, key, unit, title in ((2, "E_f", "eV", "(c) E_f (fixed cell)"),
                                  (3, "Omega", "Å³", "(d) relaxation volume Ω_rel (zero stress)")):
        a = ax[0, col]
        for name, colour in zip(SCANNED, ("tab:blue", "tab:orange")):
            rows = [s for s in scan if s["parameter"] == name]
            x = 100 * np.array([s["relative"] for s in rows])
            fine = np.linspace(x.min(), x.max(), 50)
            slope = np.polyfit(x, [s[f"{key}_linear"] for s in rows], 1)
            a.plot(fine, np.polyval(slope, fine), "-", color=colour, label=f"first order in {SYMBOL[name]} (ms.predict)")
            if key == "E_f":
                a.plot(x, [s["E_f_predict"] for s in rows], "+", color=colour, ms=10,
                       label=f"E at ms.predict's structure, {SYMBOL[name]}")
            a.plot(x, [s[f"{key}_relaxed"] for s in rows], "o", mfc="none", color=colour, ms=8,
                   label=f"re-relaxed, {SYMBOL[name]}")
        a.set_xlabel("relative parameter change (%)")
        a.set_ylabel(f"{key.replace('Omega', 'Ω_rel')} ({unit})")
        a.set_title(title)
        a.legend(fontsize="x-small")

    a = ax[1, 0]
    for (name, key), e in errors.items():
        h = np.array(sorted(e))
        a.loglog(100 * h, [e[k] for k in h], "o-", label=f"{key}, {SYMBOL[name]}")
    h = np.array([2.5, 5.0])
    a.loglog(h, 1e-3 * (h / 2.5) ** 2, "k--", lw=1, label="∝ Δθ² (guide)")
    a.set_xlabel("|relative parameter change| (%)")
    a.set_ylabel("|prediction − re-relaxation| (eV, Å³), mean of ±Δθ")
    a.set_xticks([2.5, 5.0], ["2.5", "5"])
    a.minorticks_off()
    a.set_title("(e) first-order prediction error is second order")
    a.legend(fontsize="x-small")

    for col, key, unit in ((1, "E_f*", "eV"), (2, "Omega", "Å³")):
        a = ax[1, col]
        samples = np.array(mc[key])
        a.hist(samples, bins=max(6, len(samples) // 3), density=True, color="tab:gray", alpha=0.6,
               label=f"{len(samples)} re-relaxations (σ = {np.std(samples, ddof=1):.3g} {unit})")
        mu, s = lin[key]
        xs = np.linspace(mu - 4 * s, mu + 4 * s, 200)
        a.plot(xs, np.exp(-0.5 * ((xs - mu) / s) ** 2) / (s * np.sqrt(2 * np.pi)), "k-",
               label=f"linearised N(θ₀ value, {s:.3g} {unit})")
        a.set_xlabel(f"{'E_f (zero stress)' if key == 'E_f*' else 'Ω_rel (zero stress)'} ({unit})")
        a.set_ylabel(f"probability density (1/{unit})")
        a.set_title(f"({'f' if col == 1 else 'g'}) uncertainty: 1 % std on ε, σ, λ")
        a.legend(fontsize="x-small")

    a = ax[1, 3]
    names = [row["parameter"] for row in sens_rows]
    rel = [row["theta_dE_f"] for row in sens_rows]
    a.barh(names, rel, color="tab:blue")
    a.axvline(0, color="k", lw=0.8)
    a.set_xlabel("θ · dE_f/dθ (eV per unit relative change)")
    a.set_ylabel("SW parameter")
    a.set_title("(h) log-sensitivity of E_f (fixed cell)")
    fig.suptitle(f"Stillinger–Weber Si vacancy, {n_atoms} atoms ({size}×{size}×{size} cubic cells)")
    return fig


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


# ------------------------------------------------------------------------ main
def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3, help="cubic 8-atom cells per axis (3: 215 atoms, 2: 63)")
    p.add_argument("--samples", type=int, default=20, help="Monte Carlo re-relaxations (each cell type)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws")
    args = p.parse_args(argv)
    pot, theta0, perfect, start, site, c_n = vacancy_setting(p, args.size)
    out = _common.out_dir(args.out)
    timer = _common.Timer()
    n_sites = perfect.n_atoms
    print(f"SW silicon, {args.size}x{args.size}x{args.size} cubic cells: {n_sites} sites, vacancy cell "
          f"{start.n_atoms} atoms, a = {LATTICE} Å, V = {volume(perfect.cell):.4f} Å³")

    # ---------------------------------------------------------------- (1) bulk and vacancy
    bulk_fixed = FixedCellBulk(pot, perfect)
    Eb = bulk_fixed(theta0)
    Eb_closed = n_sites * float(bulk_energy_per_atom(np.sqrt(3.0) / 4 * LATTICE / theta0["sigma"], theta0))
    Eb_star, Vb_star, a0 = (float(v) for v in bulk_zero_stress(theta0, n_sites))
    # hydrostatic stress of the perfect crystal, closed form: σ_xx = (1/3V) dE/d ln a = N x e'(x) / 3V
    x_fixed = np.sqrt(3.0) / 4 * LATTICE / float(theta0["sigma"])
    p_closed = n_sites * x_fixed * float(jax.grad(bulk_energy_per_atom)(x_fixed, theta0)) / (3 * volume(perfect.cell))
    sigma_bulk = np.array([p_closed] * 3 + [0.0] * 3)
    sigma_direct = np.asarray(pot.stress(perfect))
    print(f"bulk energy per atom (direct, fixed cell) [eV]: {Eb / n_sites:.10f}")
    print(f"bulk closed form vs direct evaluation [eV]: {Eb_closed - Eb:.3e}")
    print(f"bulk stress at a = {LATTICE} Å: {p_closed / GPa:.6f} GPa (closed form; direct "
          f"evaluation differs by {np.abs(sigma_direct - sigma_bulk).max() / GPa:.1e} GPa)")
    print(f"bulk zero-stress lattice constant a0 (closed form) [Å]: {a0:.8f}")
    timer("perfect crystal (no relaxation: forces vanish by symmetry)")

    res = ms.relax(start, pot, fmax=FMAX, max_steps=100_000)
    res_cell = ms.relax(res.system, pot, fmax=FMAX, max_steps=100_000, relax_cell=True)
    if not (res.converged and res_cell.converged):
        raise RuntimeError("a vacancy relaxation did not converge")
    E_f = float(res.energy) - c_n * Eb
    E_f_star = float(res_cell.energy) - c_n * Eb_star
    V_vac = volume(res_cell.system.cell)
    omega = V_vac - Vb_star
    timer(f"vacancy relaxed: fixed cell {res.steps} L-BFGS steps, zero-stress cell {res_cell.steps} steps")
    field = displacements(res.system, perfect, site)
    d, r, u = field
    first = np.argsort(r)[:4]
    print(f"first-shell inward relaxation [Å]: {-np.mean(np.sum(u[first] * d[first], axis=1) / r[first]):.4f} "
          f"(start {INWARD}); largest |u| beyond the first shell: "
          f"{np.linalg.norm(u, axis=1)[np.argsort(r)[4:]].max():.4f} Å")
    print(f"E_f (fixed cell) [eV]: {E_f:.8f}")
    print(f"E_f (zero stress) [eV]: {E_f_star:.8f}")
    print(f"relaxation volume (zero-stress cells) [Å³]: {omega:.6f}  "
          f"(= {omega / (Vb_star / n_sites):.4f} atomic volumes)")

    C_vac = ms.elastic_constants(res, pot)
    d_sigma = np.asarray(res.stress) - sigma_bulk
    omega_stress = -volume(perfect.cell) * float(np.sum(np.linalg.solve(C_vac.relaxed, d_sigma)[:3]))
    print(f"relaxation volume (fixed-cell stress, -V tr C⁻¹Δσ) [Å³]: {omega_stress:.6f}")
    print(f"relaxation volume, relative difference of the two routes: {abs(omega_stress - omega) / abs(omega):.3e}")
    timer("elastic constants of the defective cell")

    # ---------------------------------------------------------------- (2) sensitivities
    pred0 = ms.predict(res, pot, theta0)  # the Jacobian (one solve per parameter)
    jac = pred0.jacobian
    sens = jac.sensitivity
    timer("fixed-cell Jacobian dR*/dθ, dE*/dθ, dσ*/dθ (10 implicit solves)")
    pred0_cell = ms.predict(res_cell, pot, theta0, relax_cell=True)
    jac_cell = pred0_cell.jacobian
    timer("zero-stress Jacobian (cell following θ: strain sensitivities and elastic constants)")

    names = jac.names
    dEb_fixed = flat(jax.grad(bulk_fixed.traced)(theta0))
    dEb_closed = flat(jax.grad(lambda q: n_sites * bulk_energy_per_atom(np.sqrt(3.0) / 4 * LATTICE / q["sigma"], q))(theta0))
    print(f"bulk dE/dθ, closed form vs direct evaluation: max difference {np.abs(dEb_closed - dEb_fixed).max():.3e} eV")
    dEb_star, dVb_star = (flat(jax.grad(lambda q, i=i: bulk_zero_stress(q, n_sites)[i])(theta0)) for i in (0, 1))
    dE_f = jac.energy - c_n * dEb_fixed
    dE_f_star = jac_cell.energy - c_n * dEb_star
    dV_vac = V_vac * np.array([np.trace(np.linalg.solve(np.asarray(res_cell.system.cell), dc)) for dc in jac_cell.cell])
    d_omega = dV_vac - dVb_star
    values = flat(theta0)
    print(f"sensitivities (fixed-cell solve: ‖P∇E‖ = {sens.residual_norm:.2e} eV/Å, λ_min = {sens.lambda_min:.4g} "
          f"eV/Å², {sens.n_zero_modes} zero modes; error_estimate bounds ‖dR*/dθ‖'s error, Å per unit θ; "
          "the energy derivatives are stationary, their error ≲ ‖P∇E‖ × error_estimate)")
    head = (f"{'parameter':>10} {'value':>10} {'dE_vac/dθ':>12} {'dE_bulk/dθ':>12} {'dE_f/dθ':>12} "
            f"{'dE_f*/dθ':>12} {'dΩ_rel/dθ':>12} {'θ·dE_f/dθ':>11} {'solve_res':>9} {'error_est':>9}")
    print(head)
    print("-" * len(head))
    sens_rows = []
    for j, name in enumerate(names):
        row = dict(parameter=name, value=values[j], dE_vac=jac.energy[j], dE_bulk=dEb_fixed[j], dE_f=dE_f[j],
                   dE_f_zero_stress=dE_f_star[j], dOmega=d_omega[j], theta_dE_f=values[j] * dE_f[j],
                   solve_residual=sens.solve_residual[j], error_estimate=sens.error_estimate[j])
        sens_rows.append(row)
        print(f"{name:>10} {values[j]:10.6g} {jac.energy[j]:12.6g} {dEb_fixed[j]:12.6g} {dE_f[j]:12.6g} "
              f"{dE_f_star[j]:12.6g} {d_omega[j]:12.6g} {row['theta_dE_f']:11.5g} {sens.solve_residual[j]:9.2e} "
              f"{sens.error_estimate[j]:9.2e}")
    for name in ("epsilon", "lam", "sigma"):
        j = names.index(name)
        print(f"dE_f/d{name} [eV per unit]: {dE_f[j]:.8g}")
        print(f"dE_f*/d{name} [eV per unit]: {dE_f_star[j]:.8g}")
        print(f"dOmega_rel/d{name} [Å³ per unit]: {d_omega[j]:.8g}")
    # exact scaling laws of SW (E ∝ ε at fixed geometry; lengths ∝ σ, the cutoff aσ included)
    je, js = names.index("epsilon"), names.index("sigma")
    eps, sig = values[je], values[js]
    print("exact scaling checks (SW energy ∝ ε; every length ∝ σ at zero stress):")
    print(f"  dE_f/dε − E_f/ε [eV]: {dE_f[je] - E_f / eps:.3e}")
    print(f"  dE_f*/dε − E_f*/ε [eV]: {dE_f_star[je] - E_f_star / eps:.3e}")
    print(f"  dE_f*/dσ [eV/Å]: {dE_f_star[js]:.3e}")
    print(f"  dΩ_rel/dε [Å³]: {d_omega[je]:.3e}")
    print(f"  (dΩ_rel/dσ − 3Ω_rel/σ)/(3Ω_rel/σ): {(d_omega[js] - 3 * omega / sig) / (3 * omega / sig):.3e}")
    write_csv(out / "silicon_vacancy_sensitivities.csv", sens_rows)

    # ---------------------------------------------------------------- (3) predictions
    scan, errors = [], {}
    print(f"{'param':>6} {'Δθ/θ':>7} {'E_f relaxed':>14} {'first order':>14} {'E at pred.':>14} {'diff 1st':>10} "
          f"{'diff pred.':>10} {'Ω relaxed':>11} {'Ω predicted':>11} {'diff Ω':>10}")
    for name in SCANNED:
        j = names.index(name)
        for h in SCAN:
            q = with_param(pot, name, h)
            dq = flat(q) - values
            pr = ms.predict(res, pot, q, jacobian=jac)
            pr_cell = ms.predict(res_cell, pot, q, relax_cell=True, jacobian=jac_cell)
            Ebq = bulk_fixed(q)
            Eb_q_star, Vb_q_star, _ = (float(v) for v in bulk_zero_stress(q, n_sites))
            rq = ms.relax(res.system, pot, params=q, fmax=FMAX, max_steps=100_000)
            rq_cell = ms.relax(res_cell.system, pot, params=q, fmax=FMAX, max_steps=100_000, relax_cell=True)
            assert rq.converged and rq_cell.converged
            row = dict(parameter=name, relative=h, value=float(q[name]),
                       E_f_relaxed=float(rq.energy) - c_n * Ebq,
                       E_f_linear=E_f + float(dE_f @ dq),
                       E_f_predict=pr.energy - c_n * Ebq,
                       E_f_zero_stress_relaxed=float(rq_cell.energy) - c_n * Eb_q_star,
                       E_f_zero_stress_linear=E_f_star + float(dE_f_star @ dq),
                       Omega_relaxed=volume(rq_cell.system.cell) - Vb_q_star,
                       Omega_linear=omega + float(d_omega @ dq),
                       Omega_predict=volume(pr_cell.cell) - Vb_q_star)
            scan.append(row)
            print(f"{name:>6} {h:+7.3f} {row['E_f_relaxed']:14.8f} {row['E_f_linear']:14.8f} {row['E_f_predict']:14.8f} "
                  f"{row['E_f_linear'] - row['E_f_relaxed']:10.2e} {row['E_f_predict'] - row['E_f_relaxed']:10.2e} "
                  f"{row['Omega_relaxed']:11.5f} {row['Omega_linear']:11.5f} {row['Omega_linear'] - row['Omega_relaxed']:10.2e}")
        rows = {s["relative"]: s for s in scan if s["parameter"] == name}
        for key, (got, want) in {"E_f first order": ("E_f_linear", "E_f_relaxed"),
                                 "E_f at predicted structure": ("E_f_predict", "E_f_relaxed"),
                                 "E_f* first order": ("E_f_zero_stress_linear", "E_f_zero_stress_relaxed"),
                                 "Omega_rel first order": ("Omega_linear", "Omega_relaxed")}.items():
            err = {h: 0.5 * abs((rows[h][got] - rows[h][want]) + (rows[-h][got] - rows[-h][want]))
                   for h in SCAN if h > 0}
            if key != "E_f at predicted structure" and err[0.05] >= 1e-9:
                errors[(name, key)] = err
            if err[0.05] < 1e-9:  # E_f* does not depend on σ at all (exact scaling)
                print(f"prediction error, {key}, {name}: {err[0.05]:.1e} (exact: independent of {name})")
                continue
            order = "fourth order: 16" if key == "E_f at predicted structure" else "second order: 4"
            print(f"prediction error ratio, {key}, {name} (5% / 2.5%): {err[0.05] / err[0.025]:.4f}  "
                  f"(errors {err[0.025]:.3e}, {err[0.05]:.3e}; {order})")
    write_csv(out / "silicon_vacancy_scan.csv", scan)
    timer(f"scans of {', '.join(SCANNED)}: ms.predict vs {2 * len(SCANNED) * len(SCAN)} re-relaxations")

    # ---------------------------------------------------------------- (4) uncertainty
    cov = np.zeros((len(names), len(names)))
    for name, rel in UNCERTAIN.items():
        j = names.index(name)
        cov[j, j] = (rel * values[j]) ** 2
    print("parameter covariance: independent, relative std "
          + ", ".join(f"{SYMBOL[k]} {100 * v:g}%" for k, v in UNCERTAIN.items()) + "; all other parameters exact")
    E_vac = energy_observable(pot, res, theta0)
    E_vac_cell = energy_observable(pot, res_cell, theta0)
    u_fixed = ms.propagate_uncertainty(
        res, pot, cov, {"E_f": lambda R, q, c: E_vac(R, q, c) - c_n * bulk_fixed.traced(q)},
        mode="forward", jacobian=jac)
    u_cell = ms.propagate_uncertainty(
        res_cell, pot, cov, {"E_f*": lambda R, q, c: E_vac_cell(R, q, c) - c_n * bulk_zero_stress(q, n_sites)[0],
                             "Omega_rel": lambda R, q, c: jnp.abs(jnp.linalg.det(c)) - bulk_zero_stress(q, n_sites)[1]},
        relax_cell=True, jacobian=jac_cell)
    print(u_fixed.table())
    print(u_cell.table())
    lin = {"E_f": (E_f, float(u_fixed["E_f"].std)), "E_f*": (E_f_star, float(u_cell["E_f*"].std)),
           "Omega": (omega, float(u_cell["Omega_rel"].std))}
    timer("linearised uncertainty (ms.propagate_uncertainty, forward mode, Jacobians reused)")

    rng = np.random.default_rng(args.seed)
    draws = rng.standard_normal((args.samples, len(UNCERTAIN)))
    mc = {"E_f": [], "E_f*": [], "Omega": []}
    model = {"E_f": [], "E_f*": [], "Omega": []}
    mc_rows = []
    for z in draws:
        q = dict(theta0)
        for (name, rel), zk in zip(UNCERTAIN.items(), z):
            q[name] = jnp.asarray(float(theta0[name]) * (1.0 + rel * zk), jnp.float64)
        dq = flat(q) - values
        rq = ms.relax(res.system, pot, params=q, fmax=FMAX, max_steps=100_000)
        rq_cell = ms.relax(res_cell.system, pot, params=q, fmax=FMAX, max_steps=100_000, relax_cell=True)
        assert rq.converged and rq_cell.converged
        Eq_star, Vq_star, _ = (float(v) for v in bulk_zero_stress(q, n_sites))
        mc["E_f"].append(float(rq.energy) - c_n * bulk_fixed(q))
        mc["E_f*"].append(float(rq_cell.energy) - c_n * Eq_star)
        mc["Omega"].append(volume(rq_cell.system.cell) - Vq_star)
        model["E_f"].append(E_f + float(u_fixed["E_f"].jacobian[0] @ dq))
        model["E_f*"].append(E_f_star + float(u_cell["E_f*"].jacobian[0] @ dq))
        model["Omega"].append(omega + float(u_cell["Omega_rel"].jacobian[0] @ dq))
        mc_rows.append(dict({k: float(q[k]) for k in UNCERTAIN}, E_f=mc["E_f"][-1], E_f_zero_stress=mc["E_f*"][-1],
                            Omega_rel=mc["Omega"][-1]))
    write_csv(out / "silicon_vacancy_monte_carlo.csv", mc_rows)
    M = args.samples
    rel_se = 1.0 / np.sqrt(2.0 * (M - 1))  # relative standard error of a Gaussian sample std
    for key, label, unit in (("E_f", "E_f (fixed cell)", "eV"), ("E_f*", "E_f (zero stress)", "eV"),
                             ("Omega", "relaxation volume", "Å³")):
        s_mc, s_model = float(np.std(mc[key], ddof=1)), float(np.std(model[key], ddof=1))
        print(f"{label} linearised std [{unit}]: {lin[key][1]:.6g}")
        print(f"{label} Monte Carlo std [{unit}]: {s_mc:.6g} ± {s_mc * rel_se:.2g} ({M} re-relaxations)")
        print(f"{label} same draws through the linear model, std [{unit}]: {s_model:.6g}")
        print(f"{label} Monte Carlo mean − θ₀ value [{unit}]: {np.mean(mc[key]) - lin[key][0]:.3e}")
    timer(f"Monte Carlo: {M} draws × 2 re-relaxations")

    # ---------------------------------------------------------------- (6) elastic constants
    C_bulk = ms.elastic_constants(perfect, pot)
    timer("elastic constants of the perfect crystal")
    print(f"elastic constants (GPa){'':8}{'vacancy':>20}{'perfect':>20}{'published':>11}")
    print(f"{'':31}{'clamped':>10}{'relaxed':>10}{'clamped':>10}{'relaxed':>10}")
    for label, (i, k) in {"C11": (0, 0), "C12": (0, 1), "C44": (3, 3)}.items():
        pub = PUBLISHED[label] if label != "C44" else PUBLISHED["C44 relaxed"]
        print(f"{label:31}{C_vac.clamped[i, k] / GPa:10.2f}{C_vac.relaxed[i, k] / GPa:10.2f}"
              f"{C_bulk.clamped[i, k] / GPa:10.2f}{C_bulk.relaxed[i, k] / GPa:10.2f}{pub:11.1f}")
        for kind, C in (("vacancy", C_vac), ("perfect", C_bulk)):
            print(f"{label} {kind} clamped [GPa]: {C.clamped[i, k] / GPa:.4f}")
            print(f"{label} {kind} relaxed [GPa]: {C.relaxed[i, k] / GPa:.4f}")
    print(f"(published clamped-ion C44: {PUBLISHED['C44 clamped']} GPa)")

    fig = figure(field, scan, errors, mc, lin, sens_rows, start.n_atoms, args.size)
    _common.save_figure(fig, out, "silicon_vacancy.png", timer, dpi=100)
    return dict(E_f=E_f, omega=omega)


if __name__ == "__main__":
    main()
