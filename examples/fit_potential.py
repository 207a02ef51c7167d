"""Fit Stillinger–Weber silicon to a lattice constant, a relaxed vacancy and elastic constants.

The inverse problem: targets are generated with the published SW parameters θ* (ε, σ, λ
fitted; the other seven fixed): (a) the zero-stress lattice constant a₀, (b) the relaxed
positions R* of a vacancy in a 2×2×2 cubic supercell (63 atoms) whose cell is the
zero-stress one, (c) the relaxed-ion elastic constants C11, C12, C44. The fit starts 10 %
off (ε, σ, λ all ×1.1) and minimizes the weighted sum of normalized squared residuals

    L(θ) = (a₀(θ)/a₀* − 1)² + (1/3) Σ_IJ (C_IJ(θ)/C_IJ* − 1)²
           + Σ_i |R_i*(θ) − R_i^target|² / (N a₀*²)

with BFGS (scipy, Wolfe line search) in the relative parameters θ/θ_start.

Gradients are reverse mode through the relaxation, never unrolled. The vacancy term is
written as a user would write it and differentiated with plain ``jax.grad``:

    R = ms.relax(vacancy(cell=2a₀(θ)·I), pot, params=params(θ), fmax=1e-9).system.positions
    O(θ) = Σ_i |R_i − R_i^target|² / (N a₀*²)      (minimum image, net translation removed)

``ms.relax`` is an implicit layer, differentiable w.r.t. its parameters and its input
cell (at fixed fractional coordinates), so JAX chains the cell's dependence on θ through
a₀(θ) by itself; the backward pass is one transposed solve of the Hessian, compiled once
(the later gradients compile nothing). The perfect crystal needs no relaxation of its
atoms (forces vanish by symmetry), so a₀ and C_IJ come from its 2-atom primitive cell in
closed form, differentiated with ``jax.grad``: a₀ by one Newton step on the zero-pressure
condition (1-D implicit differentiation), the relaxed-ion constants as
``C = (C⁰ − Λᵀ H⁻¹ Λ)/V`` with the 3×3 internal-strain Hessian H (Kleinman relaxation of
C44). The model's C_IJ follow a₀(θ), while ``ms.elastic_constants(..., wrt=...)`` gives
dC/dθ at fixed cell, so the closed form (which chains both) stays; the default run generates (a) and (c) with the
library — ``ms.relax(..., relax_cell=True)`` of the 64-atom crystal and
``ms.elastic_constants`` of it — so the recovered θ also checks the closed form against
them. ``--quick`` generates them from the closed form (what the test runs).

Once, at the first outer step, the gradient is computed three ways: ``jax.grad`` (the
fit's), ``ms.observable_gradient`` (the same implicit derivative assembled by hand: one
transposed solve w.r.t. θ at fixed cell, one w.r.t. the cell's strain, chained through
d ln a₀/dθ) and central finite differences of L (two re-evaluations, each with a vacancy
re-relaxation, per parameter). Their agreement and the cost of one outer-step gradient
each way (median of 5 after warm-up, as ratios to finite differences) are printed.

Run: ``python examples/fit_potential.py --out out/``. Compilation dominates: 2.5 min on 2
shared cores at load ~5, of which the 10 BFGS steps took 1.4 s; ``--quick`` skips the
library targets' programs (1.3 min at load ~1, 2 min at load ~5). Measured there, one
outer-step gradient costs 0.08 s by ``jax.grad``, 0.04 s by ``ms.observable_gradient``
and 0.13 s by finite differences (ratios 0.65 and 0.28); the gradients agree to 8e-13
with each other and to 2e-9 with finite differences (their truncation). Writes
``fit_potential.png`` (loss and parameter errors per outer step) and ``fit_potential.csv``.
"""

from __future__ import annotations

import _common

_common.headless()

import csv  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.geometry import find_mic  # noqa: E402
from ase.units import GPa  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

import mdsens as ms  # noqa: E402

FITTED = ("epsilon", "sigma", "lam")
SYMBOL = {"epsilon": "ε", "sigma": "σ", "lam": "λ"}
UNIT = {"epsilon": "eV", "sigma": "Å", "lam": ""}
START = 1.10  # every fitted parameter starts 10 % above the truth
LATTICE = 5.431  # Å, only to build the vacancy's start (fractional coordinates)
INWARD = 0.4  # Å, the vacancy's four neighbours start this far towards the empty site
FMAX = 1e-9  # eV/Å
FD_STEP = 1e-5  # relative step of the central finite differences of L
#: the four bonds of a diamond A site, in units of the cubic lattice constant
BONDS = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float) / 4.0
#: The vacancy cell uses the dense (all-pairs) energy: a neighbor list's capacity changes
#: with the geometry along the fit and every new capacity recompiles the programs, while
#: at 63 atoms the dense sum costs only ~1.6x a list. The stability analysis is off in the
#: reverse solves (no rattlers; the translations are the null space): it would cost
#: 0.3 s a gradient, 4x the rest. Every ms.relax call passes the same options, so the
#: primal relaxations (targets, finite differences) share the gradient's compiled program.
DENSE = False
RELAX = dict(fmax=FMAX, max_steps=100_000, neighbor_list=DENSE, stability=False)
REPEATS = 5  # timed repeats of one outer-step gradient (the median is printed)
ELASTIC = {"C11": (0, 0), "C12": (0, 1), "C44": (3, 3)}


# ------------------------------------------------------------------------ perfect crystal
def primitive_energy(F, u, a, p):
    """SW energy (eV) of diamond's 2-atom primitive cell, lattice constant ``a`` (Å),
    deformed by ``F``, sublattice B shifted by ``u`` (Å). Only the 4 nearest neighbours
    lie inside the cutoff aσ (second neighbours are at a/√2 = 1.87σ > 1.8σ, and both
    scale with σ); the B site sees the same bonds reversed, hence the same angles."""
    b = (a * BONDS) @ F.T + u
    r = jnp.linalg.norm(b, axis=1)
    s, cut = p["sigma"], p["a"] * p["sigma"]
    pair = p["A"] * p["epsilon"] * (p["B"] * (s / r) ** p["p"] - (s / r) ** p["q"]) * jnp.exp(s / (r - cut))
    g = jnp.exp(p["gamma"] * s / (r - cut))
    cos = (b @ b.T) / (r[:, None] * r[None, :])
    j, k = np.triu_indices(4, 1)
    three = p["lam"] * p["epsilon"] * (cos[j, k] - p["costheta0"]) ** 2 * g[j] * g[k]
    return jnp.sum(pair) + 2.0 * jnp.sum(three)


def _pressure_term(a, p):
    return jax.grad(lambda x: primitive_energy(jnp.eye(3), jnp.zeros(3), x, p))(a)


def lattice_constant(p):
    """Zero-stress a₀ (Å): Newton on dE/da = 0, then one Newton step left differentiable,
    whose derivative is the implicit one, da₀/dθ = −E_aθ / E_aa."""
    curvature = jax.grad(_pressure_term)
    q = jax.lax.stop_gradient(p)
    a = LATTICE * q["sigma"] / 2.0951
    # quadratic convergence from within 1e-3 (a₀ ∝ σ): round-off after 4 of the 8 steps
    a = jax.lax.fori_loop(0, 8, lambda _, a: a - _pressure_term(a, q) / curvature(a, q), a)
    a = jax.lax.stop_gradient(a)
    return a - _pressure_term(a, p) / curvature(a, p)


def voigt_strain(e):
    """Symmetric strain from Voigt (xx, yy, zz, yz, xz, xy), engineering shear."""
    return jnp.array([[e[0], e[5] / 2, e[4] / 2], [e[5] / 2, e[1], e[3] / 2], [e[4] / 2, e[3] / 2, e[2]]])


def elastic_constants(p, a):
    """Relaxed-ion Voigt constants (eV/Å³) at lattice constant ``a``:
    C = (C⁰ − Λᵀ H⁻¹ Λ)/V, the internal strain u*(e) = −H⁻¹Λ e by implicit differentiation
    of ∂E/∂u = 0 (H is 3×3 and regular: fixing atom A removes the translations)."""
    energy = lambda e, u: primitive_energy(jnp.eye(3) + voigt_strain(e), u, a, p)  # noqa: E731
    e0, u0 = jnp.zeros(6), jnp.zeros(3)
    born = jax.hessian(energy, argnums=0)(e0, u0)
    coupling = jax.jacfwd(jax.grad(energy, argnums=1), argnums=0)(e0, u0)  # (3, 6)
    internal = jax.hessian(energy, argnums=1)(e0, u0)
    return (born - coupling.T @ jnp.linalg.solve(internal, coupling)) / (a**3 / 4.0)


def bulk_observables(p):
    a = lattice_constant(p)
    C = elastic_constants(p, a)
    return a, jnp.stack([C[ij] for ij in ELASTIC.values()])


@jax.jit
def bulk_terms(theta, base_params, a_target, C_target):
    """The perfect crystal's part of L, a₀, (C11, C12, C44), dL_bulk/dθ and d ln a₀/dθ, in
    one compiled program (reverse mode)."""

    def loss(theta):
        a, C = bulk_observables(params_with(base_params, theta))
        return (a / a_target - 1.0) ** 2 + jnp.mean((C / C_target - 1.0) ** 2), (a, C)

    (value, (a, C)), grad = jax.value_and_grad(loss, has_aux=True)(theta)
    log_a_grad = jax.grad(lambda t: jnp.log(lattice_constant(params_with(base_params, t))))(theta)
    return value, a, C, grad, log_a_grad


@jax.jit
def lattice_constant_of(theta, base_params):
    """a₀(θ) (Å), compiled; ``jax.grad`` of it compiles its derivative once."""
    return lattice_constant(params_with(base_params, theta))


# ------------------------------------------------------------------------ vacancy
def vacancy_start():
    """(fractional start positions of the 63-atom vacancy cell, a System of it)."""
    atoms = bulk("Si", "diamond", a=LATTICE, cubic=True).repeat((2, 2, 2))
    site = atoms.positions[0].copy()
    del atoms[0]
    d, r = find_mic(atoms.positions - site, atoms.cell)
    nn = np.argsort(r)[:4]
    atoms.positions[nn] -= INWARD * d[nn] / r[nn, None]
    return atoms.get_scaled_positions(wrap=False), ms.System.from_ase(atoms)


def vacancy_system_with_cell(system, frac, a):
    """The vacancy cell 2a·I (``a`` in Å, possibly traced) with atoms at fractional ``frac``."""
    cell = 2.0 * a * jnp.eye(3)
    return system.replace(positions=jnp.asarray(frac) @ cell, cell=cell)


def make_vacancy_observable(target_positions, lattice_target):
    """Σ_i |R_i − R_i^target|² / (N a₀*²), minimum image, net translation removed;
    ``O(positions, params, cell)`` as ``ms.observable_gradient`` takes it. Compiled: under
    ``jax.grad`` outside ``jit`` each eager operation on the relaxed positions would be
    linearized and transposed on its own (0.02-0.05 s a gradient here)."""
    target = jnp.asarray(target_positions)
    n = target.shape[0]

    def observable(R, params, cell):
        frac = (R - target) @ jnp.linalg.inv(cell)
        d = (frac - jnp.round(frac)) @ cell  # round has zero derivative: mic is exact
        d = d - jnp.mean(d, axis=0)
        return jnp.sum(d**2) / (n * lattice_target**2)

    return jax.jit(observable)


def relax_vacancy(pot, system, params, a, frac):
    """``ms.relax`` of the vacancy cell 2a·I from fractional positions ``frac``."""
    res = ms.relax(vacancy_system_with_cell(system, frac, a), pot, params=params, **RELAX)
    if not bool(res.converged):
        raise RuntimeError("vacancy relaxation did not converge")
    return res


# ------------------------------------------------------------------------ the fit
def params_with(params, theta):
    """``params`` with the fitted entries set to ``theta`` (FITTED order)."""
    p = dict(params)
    for k, name in enumerate(FITTED):
        p[name] = jnp.asarray(theta[k], jnp.float64)
    return p


class Fit:
    """Loss and its reverse-mode gradient in the relative parameters z = θ/θ_start."""

    def __init__(self, pot, theta_start, targets, frac0, vacancy_system):
        self.pot, self.theta_start = pot, np.asarray(theta_start)
        self.a_t, self.C_t, R_t = targets
        self.frac = np.array(frac0)  # warm start: the last relaxed fractional positions
        self.vacancy_system = vacancy_system
        self.vacancy_term = make_vacancy_observable(R_t, self.a_t)
        self.evaluations = 0

    def params(self, theta):
        return params_with(self.pot.params, theta)

    def bulk(self, theta):
        return bulk_terms(jnp.asarray(theta), dict(self.pot.params), self.a_t, jnp.asarray(self.C_t))

    def relax_vacancy(self, theta, a, frac=None):
        return relax_vacancy(self.pot, self.vacancy_system, self.params(theta), a,
                             self.frac if frac is None else frac)

    def vacancy_loss(self, theta, frac):
        """The vacancy term O(θ) as a user writes it, for ``jax.grad``: relax in the cell
        2a₀(θ)·I from fractional positions ``frac``, then the positions residual. Aux: the
        relaxed positions and cell (no derivative) and whether the relaxation converged."""
        a = lattice_constant_of(theta, dict(self.pot.params))
        res = ms.relax(vacancy_system_with_cell(self.vacancy_system, frac, a), self.pot,
                       params=self.params(theta), **RELAX)
        R, cell = res.system.positions, res.system.cell
        return self.vacancy_term(R, None, cell), (R, cell, res.converged)

    def value(self, z, frac=None):
        """L(z) only (relaxations as the finite differences use them; no derivatives)."""
        theta = np.asarray(z) * self.theta_start
        bulk, a, _, _, _ = self.bulk(theta)
        res = self.relax_vacancy(theta, float(a), frac)
        return float(bulk) + float(self.vacancy_term(res.system.positions, None, res.system.cell))

    def value_and_grad(self, z, frac=None):
        """L(z) and dL/dz, reverse mode: the closed-form bulk and the vacancy term each by
        ``jax.grad``. Without ``frac`` it warm-starts from (and updates) the last relaxed
        fractional positions and counts as an evaluation of the fit."""
        theta = np.asarray(z) * self.theta_start
        bulk, _, _, g_bulk, _ = self.bulk(theta)
        start = self.frac if frac is None else frac
        (vac, (R, cell, converged)), g_vac = jax.value_and_grad(self.vacancy_loss, has_aux=True)(
            jnp.asarray(theta), start)
        if not bool(converged):
            raise RuntimeError("vacancy relaxation did not converge")
        if frac is None:
            self.frac = np.asarray(R) @ np.linalg.inv(np.asarray(cell))
            self.evaluations += 1
        return float(bulk) + float(vac), (np.asarray(g_bulk) + np.asarray(g_vac)) * self.theta_start

    def value_and_grad_observable(self, z, frac):
        """The cross-check: dL/dz with the vacancy term from ``ms.observable_gradient`` (one
        transposed solve w.r.t. θ at fixed cell, one w.r.t. the cell's strain), chained by
        hand through a₀(θ): the cell is 2a₀(θ)·I, a hydrostatic strain d ln a₀."""
        theta = np.asarray(z) * self.theta_start
        bulk, a, _, g_bulk, log_a_grad = self.bulk(theta)
        res = self.relax_vacancy(theta, float(a), frac)
        p = self.params(theta)
        vac = float(self.vacancy_term(res.system.positions, p, res.system.cell))
        options = dict(params=p, neighbor_list=DENSE, stability=False)
        g_params = ms.observable_gradient(res, self.pot, self.vacancy_term, **options)
        g_strain = ms.observable_gradient(res, self.pot, self.vacancy_term, wrt="cell", **options)
        hydrostatic = float(np.sum(np.asarray(g_strain)[:3]))  # dO/d ln a: ε = d ln a · I
        g_theta = (np.asarray(g_bulk) + np.array([float(g_params[k]) for k in FITTED])
                   + hydrostatic * np.asarray(log_a_grad))
        return float(bulk) + vac, g_theta * self.theta_start


def finite_difference_gradient(fit, z, frac):
    """Central differences of L in z, each evaluation re-relaxing the vacancy (same start)."""
    g = np.zeros(len(z))
    for k in range(len(z)):
        dz = np.zeros(len(z))
        dz[k] = FD_STEP
        g[k] = (fit.value(z + dz, frac) - fit.value(z - dz, frac)) / (2 * FD_STEP)
    return g


# ------------------------------------------------------------------------ main
def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="targets (a) and (c) from the closed form, not ms.relax(relax_cell=True) and "
                        "ms.elastic_constants (skips compiling those)")
    p.add_argument("--iterations", type=int, default=40, help="at most this many BFGS steps")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()

    pot = ms.potentials.StillingerWeber()
    truth = np.array([float(pot.params[k]) for k in FITTED])
    theta_start = START * truth
    frac0, vacancy_system = vacancy_start()
    print(f"SW silicon; fitted {', '.join(SYMBOL[k] for k in FITTED)}; truth "
          + ", ".join(f"{SYMBOL[k]} = {v:g} {UNIT[k]}" for k, v in zip(FITTED, truth))
          + f"; start ×{START}")

    # ---------------------------------------------------------------- targets (truth)
    _, a_closed, C_closed, _, _ = bulk_terms(jnp.asarray(truth), dict(pot.params), 1.0, jnp.ones(3))
    a_closed, C_closed = float(a_closed), np.asarray(C_closed)
    timer(f"closed form at the truth: a₀ = {float(a_closed):.10f} Å, C11, C12, C44 = "
          + ", ".join(f"{c / GPa:.4f}" for c in C_closed) + " GPa")
    if args.quick:
        a_t, C_t = float(a_closed), C_closed
    else:
        crystal = ms.System.from_ase(bulk("Si", "diamond", a=LATTICE, cubic=True).repeat((2, 2, 2)))
        res_bulk = ms.relax(crystal, pot, relax_cell=True, fmax=FMAX, max_steps=100_000)
        if not res_bulk.converged:
            raise RuntimeError("cell relaxation did not converge")
        a_t = float(np.cbrt(abs(np.linalg.det(np.asarray(res_bulk.system.cell))))) / 2.0
        timer(f"target (a): ms.relax(relax_cell=True), 64 atoms: a₀ = {a_t:.10f} Å "
              f"(closed form differs by {a_t - float(a_closed):.1e} Å)")
        C = ms.elastic_constants(res_bulk, pot).relaxed
        C_t = np.array([C[ij] for ij in ELASTIC.values()])
        timer("target (c): ms.elastic_constants (relaxed-ion): " + ", ".join(
            f"{k} = {c / GPa:.4f} GPa" for k, c in zip(ELASTIC, C_t))
            + f" (closed form: largest relative difference {np.max(np.abs(C_closed / C_t - 1)):.1e})")
    res_t = relax_vacancy(pot, vacancy_system, params_with(pot.params, truth), a_t, frac0)
    R_t = np.asarray(res_t.system.positions)
    fit = Fit(pot, theta_start, (a_t, C_t, R_t), frac0, vacancy_system)
    timer(f"target (b): vacancy relaxed at the zero-stress cell, {res_t.system.n_atoms} atoms, "
          f"{res_t.steps} L-BFGS steps")

    # ---------------------------------------------------------------- gradient check and cost
    z0 = np.ones(len(FITTED))
    frac_start = fit.frac.copy()  # every check starts from here (the BFGS's first step too)
    ways = {"jax.grad": fit.value_and_grad, "observable_gradient": fit.value_and_grad_observable}
    for way in ways.values():  # compiles each way's programs (relaxation, reverse solves)
        way(z0, frac_start)
    fit.value(z0 + 1e-3, frac_start)  # and the finite differences' (primal only)
    timer("compiled: vacancy relaxation, jax.grad through ms.relax, ms.observable_gradient w.r.t. θ "
          "and strain, closed forms")
    grads = {name: way(z0, frac_start)[1] for name, way in ways.items()}
    g_fd = grads["central FD"] = finite_difference_gradient(fit, z0, frac_start)
    seconds = {name: _common.median_seconds(way, z0, frac_start, repeats=REPEATS) for name, way in ways.items()}
    seconds["central FD"] = _common.median_seconds(finite_difference_gradient, fit, z0, frac_start,
                                                   repeats=REPEATS)

    def relative(x, y):
        return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))

    agreement = relative(grads["jax.grad"], g_fd)
    agreement_observable = relative(grads["jax.grad"], grads["observable_gradient"])
    print("gradient at the start, dL/d(θ/θ_start):")
    for k, name in enumerate(FITTED):
        print(f"  {SYMBOL[name]}: " + ", ".join(f"{way} {g[k]:+.10e}" for way, g in grads.items()))
    print(f"gradient agreement, jax.grad vs central FD (max |Δ| / max |FD|): {agreement:.2e}")
    print("gradient agreement, jax.grad vs observable_gradient (max |Δ| / max |observable_gradient|): "
          f"{agreement_observable:.2e}")
    print("gradient agreement, observable_gradient vs central FD (max |Δ| / max |FD|): "
          f"{relative(grads['observable_gradient'], g_fd):.2e}")
    print(f"cost of one outer-step gradient (median of {REPEATS} after warm-up): "
          f"jax.grad {seconds['jax.grad']:.3f} s (1 relaxation, 1 reverse solve), "
          f"observable_gradient {seconds['observable_gradient']:.3f} s (1 relaxation, 2 reverse solves), "
          f"central FD {seconds['central FD']:.3f} s ({2 * len(FITTED)} re-relaxations)")
    ratio = seconds["jax.grad"] / seconds["central FD"]
    print(f"cost ratio jax.grad / FD: {ratio:.3f}")
    print(f"cost ratio observable_gradient / FD: {seconds['observable_gradient'] / seconds['central FD']:.3f}")

    # ---------------------------------------------------------------- BFGS
    history = []
    t_fit = time.perf_counter()

    def record(z, value, grad):
        theta = z * theta_start
        rel = theta / truth - 1.0
        history.append(dict(step=len(history), loss=value, **{k: theta[i] for i, k in enumerate(FITTED)},
                            **{f"rel_error_{k}": rel[i] for i, k in enumerate(FITTED)},
                            grad_norm=float(np.linalg.norm(grad)), seconds=time.perf_counter() - t_fit,
                            evaluations=fit.evaluations))
        h = history[-1]
        print(f"step {h['step']:3d}  L = {value:.3e}  "
              + "  ".join(f"{SYMBOL[k]} = {theta[i]:.10f} ({rel[i]:+.1e})" for i, k in enumerate(FITTED))
              + f"  |∇L| = {h['grad_norm']:.1e}  {h['seconds']:5.1f} s", flush=True)

    cache = {}

    def fun(z):
        key = tuple(np.asarray(z))
        if key not in cache:
            cache.clear()
            cache[key] = fit.value_and_grad(np.asarray(z))
        return cache[key]

    fit.frac, fit.evaluations = frac_start, 0
    recorded = [z0]
    record(z0, *fun(z0))

    def callback(z):
        recorded.append(np.array(z))
        record(recorded[-1], *fun(recorded[-1]))

    result = minimize(fun, z0, jac=True, method="BFGS", callback=callback,
                      options=dict(gtol=1e-11, maxiter=args.iterations))
    z_fit = np.asarray(result.x)
    if not np.array_equal(z_fit, recorded[-1]):  # a final point the callback did not see
        record(z_fit, *fun(z_fit))
    timer(f"BFGS: {len(history) - 1} outer steps, {fit.evaluations} loss+gradient evaluations "
          f"({result.message})")
    theta_fit = z_fit * theta_start
    for k, name in enumerate(FITTED):
        print(f"recovered {SYMBOL[name]} = {theta_fit[k]:.12g}{' ' + UNIT[name] if UNIT[name] else ''} "
              f"(true {truth[k]:g}), "
              f"relative error {abs(theta_fit[k] / truth[k] - 1):.2e}")
    worst = float(np.max(np.abs(theta_fit / truth - 1)))
    print(f"largest relative parameter error: {worst:.2e}")

    # ---------------------------------------------------------------- outputs
    path = out / "fit_potential.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    print(f"wrote {path}")
    fig = figure(history)
    _common.save_figure(fig, out, "fit_potential.png", timer, dpi=110)
    return dict(theta=theta_fit, truth=truth, agreement=agreement, agreement_observable=agreement_observable,
                ratio=ratio, gradients=grads, seconds=seconds)


def figure(history):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    step = [h["step"] for h in history]
    fig = Figure(figsize=(9.6, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.semilogy(step, [max(h["loss"], 1e-300) for h in history], "o-")
    ax1.set_xlabel("outer step (BFGS iteration)")
    ax1.set_ylabel("loss L (dimensionless)")
    ax1.set_title("weighted, normalized squared residuals")
    for name in FITTED:
        ax2.semilogy(step, [max(abs(h[f"rel_error_{name}"]), 1e-17) for h in history], "o-",
                     label=SYMBOL[name])
    ax2.set_xlabel("outer step (BFGS iteration)")
    ax2.set_ylabel("|θ/θ_true − 1| (relative error)")
    ax2.set_title("parameter error")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Fitting Stillinger–Weber ε, σ, λ to a₀, a relaxed vacancy and C11, C12, C44 "
                 "(reverse mode through ms.relax)")
    return fig


if __name__ == "__main__":
    main()
