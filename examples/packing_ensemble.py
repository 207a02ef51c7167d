"""jax-md's meta-optimization experiment (the bubble raft) with implicit gradients.

The paper's binary soft-sphere packing (reduced units: energy ε, length σ_BB; N = 128,
half of diameter D (A), half of diameter 1 (B), σ_AB = (1 + D)/2, ε = 1, α = 2, packing
fraction φ = 0.98, box side L(D) = sqrt(N π (1 + D²) / 8 / φ), see
``paper_md_sensitivity.py``) is relaxed with FIRE from many uniformly random initial
conditions (seeds), for D on a grid in [0.4, 1.0]. The average relaxed energy ⟨E*⟩(D)
and its slope ⟨dE*/dD⟩ are what jax-md's notebook meta-optimizes, there by
differentiating through thousands of unrolled FIRE steps.

Here every seed and every D is relaxed in **one** compiled program, ``ms.relax_batch``,
and dE*/dD is the forward-mode derivative of that program (``jax.jvp`` w.r.t. D, one
implicit solve per structure inside the same program; no FIRE step is differentiated).
The box follows D at fixed φ and fixed fractional coordinates, so dE*/dD is the total
derivative including the box. Because E* is stationary in the positions, the implicit
positions response drops out of dE*/dD (envelope theorem):

    dE*/dD = ∂E/∂D|_{R, L} + (d ln L/dD) · V (σ_xx + σ_yy),     d ln L/dD = D / (1 + D²),

with ∂E/∂D at fixed Cartesian positions and box (D enters σ_AA and σ_AB) and σ the
stress (ASE sign, dE/dε_I = V σ_I for a strain at fixed fractional coordinates). The
script computes it both ways and reports the agreement; on a few structures it also
takes it from ``ms.sensitivity``'s ``denergy`` along dσ/dD − (d ln L/dD) σ (the
scaling E(sR; sσ, sL) = E(R; σ, L) turns the box growth into a change of σ), which
equals the partial derivative at a minimum.

Checks, printed with stable labels: central finite differences of E* at D ± h with the
same seeds, warm-started from R* (scaled with the box), per seed; a seed whose ±h
relaxations land in different minima (basin jump) is reported and left out. The
finite-difference slope of ⟨E*⟩ on the D grid (cold starts) is shown too: it is coarse
(step of the grid) and noisy (seeds change basin as D moves). Truncated unrolling: the
derivative of the energy after K steps of jax-md's ``fire_descent`` (``lax.scan``,
``jax.jvp`` w.r.t. D, same initial conditions, the notebook's FIRE settings) is biased
for small K and approaches the converged ⟨dE*/dD⟩ as K grows, up to the seeds whose
unrolled FIRE ends in another minimum than mdsens' FIRE.

Figure: (a) ⟨E*⟩(D) with standard errors over seeds; (b) ⟨dE*/dD⟩ implicit against the
finite differences and the unrolled estimates at each K; (c) the unrolled bias against K.
CSV: one row per D.

Run: ``python examples/packing_ensemble.py --out out/`` (N = 128, 40 seeds, 7 values of D,
unrolls of 10, 100, 1000 steps on 8 seeds per D: dense energies of 280 structures in
lockstep, long on 2 CPU cores, tens of minutes by extrapolation; a GPU runs the batch as
one program). ``--n 32 --seeds 8 --points 3`` takes ~1.5 min on 2 shared cores, mostly
compilation (the test's size).
"""

from __future__ import annotations

import _common

_common.headless()

import csv  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax_md import minimize as jax_md_minimize  # noqa: E402

import mdsens as ms  # noqa: E402
from paper_md_sensitivity import SIGMA_TANGENT, box_side, dlog_box_side, packing, params_at  # noqa: E402

#: A seed whose D ± h relaxations differ by more than this (σ_BB, after removing the
#: affine scaling and the net translation) changed minimum: the regular response is
#: |dR*/dD| · 4h ≲ 1e-5 at h ≤ 1e-6 (the 2h step included), a basin jump moves particles by ~0.1.
JUMP_THRESHOLD = 1e-3


# ------------------------------------------------------------------------ batched relaxations
def batch_relax(diameters, fractional, template, pot, phi, fmax, max_steps, minimizer):
    """Relax every (D, seed) start as one ``ms.relax_batch`` program: structure k = i·S + s
    has diameter ``diameters[i]`` and starts at ``fractional[s]`` scaled by L(D).

    Returns ``(energy, positions, stress, converged, steps)``, each with a leading axis
    of n_D·S; differentiable w.r.t. ``diameters`` (implicitly, through ``relax_batch``).
    """
    n, dim = template.n_atoms, template.dim
    systems, params = [], []
    for d in diameters:
        side = box_side(n, d, phi)
        for f in fractional:
            systems.append(template.replace(positions=f * side, cell=side * jnp.eye(dim)))
            params.append(params_at(pot, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.NotConvergedWarning)  # counted and reported below
        r = ms.relax_batch(systems, pot, params=params, fmax=fmax, max_steps=max_steps, minimizer=minimizer)
    return r.energy, r.positions, r.stress, r.converged, r.steps


def restart_relax(positions, diameters_from, diameters_to, template, pot, phi, fmax, max_steps, minimizer):
    """``relax_batch`` of relaxed packings moved to new diameters: positions scaled with the
    box (fixed fractional coordinates), as for the D ± h finite differences."""
    n, dim = template.n_atoms, template.dim
    systems, params = [], []
    for R, d0, d in zip(positions, diameters_from, diameters_to):
        side = box_side(n, d, phi)
        systems.append(template.replace(positions=R * (side / box_side(n, d0, phi)), cell=side * jnp.eye(dim)))
        params.append(params_at(pot, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.NotConvergedWarning)
        return ms.relax_batch(systems, pot, params=params, fmax=fmax, max_steps=max_steps, minimizer=minimizer)


def envelope_derivative(energy, positions, stress, diameters, pot, n, phi):
    """dE*/dD = ∂E/∂D|_{R,L} + (d ln L/dD) V (σ_xx + σ_yy), per structure (no linear solve)."""
    def partial(R, d):
        side = box_side(n, d, phi)  # held fixed: only σ(D) moves in this term
        return jax.grad(lambda x: energy(R, params_at(pot, x), side * jnp.eye(2)))(d)

    d = jnp.asarray(diameters)
    partials = jax.jit(jax.vmap(partial))(positions, d)
    volume = box_side(n, d, phi) ** 2
    return np.asarray(partials + dlog_box_side(d) * volume * (stress[:, 0] + stress[:, 1]))


def sensitivity_derivative(system, pot, diameter):
    """``(total, partial)`` dE*/dD from ``ms.sensitivity``'s ``denergy`` and
    ``denergy_partial`` (∂E/∂θ at fixed R), by another route than the stress: the energy
    depends on lengths only through r/σ, so E(sR; sσ, sL) = E(R; σ, L) and moving L with D
    at fixed fractional coordinates is the fixed-box direction dσ/dD − (d ln L/dD) σ."""
    tangent = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    params = params_at(pot, diameter)
    tangent["sigma"] = SIGMA_TANGENT - dlog_box_side(diameter) * np.asarray(params["sigma"])
    # the rigid translations are the only zero modes at φ = 0.98 (paper_md_sensitivity's test)
    sens = ms.sensitivity(system, pot, wrt={"D": tangent}, params=params, stability=False)
    return float(sens.denergy[0]), float(sens.denergy_partial[0])


# ------------------------------------------------------------------------ unrolled FIRE
def unrolled_energies(energy, fractional, diameters, pot, n, phi, steps):
    """``(E_k, R_steps), (dE_k/dD, dR_steps/dD)`` for k = 1..steps: the energy after k
    steps of jax-md's FIRE (the notebook's settings: unit mass, dt 0.1 → 0.4) from the
    same starts, and its derivative w.r.t. D by forward-mode differentiation through the
    unrolled steps (``jax.jvp``: the same derivative as ``jax.grad`` for one scalar D,
    without storing the trajectory)."""
    eye = jnp.eye(2)

    def trajectory(d, f):
        side = box_side(n, d, phi)
        params, cell = params_at(pot, d), side * eye

        def energy_of(R, **_):
            return energy(R, params, cell)

        # no wrapping: mdsens' energy takes minimum images of any positions
        init, apply = jax_md_minimize.fire_descent(energy_of, lambda R, dR, **_: R + dR)

        def body(state, _):
            state = apply(state)
            return state, energy_of(state.position)

        final, E = jax.lax.scan(body, init(f * side), None, length=steps)
        return E, final.position

    def one(d, f):
        return jax.jvp(lambda x: trajectory(x, f), (d,), (jnp.ones_like(d),))

    S = fractional.shape[0]
    d = jnp.repeat(jnp.asarray(diameters), S)
    f = jnp.tile(fractional, (len(diameters), 1, 1))
    return jax.jit(jax.vmap(one))(d, f)


# ------------------------------------------------------------------------ statistics
def mean_sem(x, mask):
    """Mean and standard error over seeds (axis 1) of the entries where ``mask``."""
    means, sems = [], []
    for row, m in zip(x, mask):
        v = row[m]
        means.append(v.mean() if v.size else np.nan)
        sems.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else np.nan)
    return np.array(means), np.array(sems)


def jumped(R_plus, R_minus, d_plus, d_minus, n, phi):
    """Per structure: did the D + h and D − h relaxations end in different minima?"""
    out = []
    for Rp, Rm, dp, dm in zip(R_plus, R_minus, d_plus, d_minus):
        fp, fm = Rp / float(box_side(n, dp, phi)), Rm / float(box_side(n, dm, phi))
        shift = fp - fm
        shift = shift - np.round(shift)  # nearest periodic image
        shift = (shift - shift.mean(axis=0)) * float(box_side(n, 0.5 * (dp + dm), phi))
        out.append(np.abs(shift).max() > JUMP_THRESHOLD)
    return np.array(out)


# ------------------------------------------------------------------------ figure
def figure(D, E, E_sem, dE, dE_sem, fd, fd_sem, grid_D, grid_slope, unrolled, bias_curve, n, S, phi):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15.5, 4.8), layout="constrained")
    ax_e, ax_d, ax_b = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1, 1.25, 1]))

    ax_e.errorbar(D, E, yerr=E_sem, marker="o", capsize=3, color="C0")
    ax_e.set_xlabel(r"diameter $D$ of species A ($\sigma_{BB}$)")
    ax_e.set_ylabel(r"$\langle E^*\rangle$ ($\varepsilon$)")
    ax_e.set_title(f"(a) mean relaxed energy, N = {n}, $\\phi$ = {phi:g}, {S} seeds\n"
                   "(error bars: standard error over seeds)", fontsize="medium")

    ax_d.errorbar(D, dE, yerr=dE_sem, marker="o", capsize=3, color="C0", lw=2,
                  label=r"implicit $\langle \mathrm{d}E^*/\mathrm{d}D\rangle$ (jvp of relax_batch)")
    ax_d.plot(D, fd, "x", color="k", ms=9, mew=2, label=r"finite differences at $D\pm h$ (same seeds)")
    if len(grid_D):
        ax_d.plot(grid_D, grid_slope, "s", mfc="none", color="C3", ms=8,
                  label=r"slope of $\langle E^*\rangle$ on the $D$ grid (cold starts)")
    # The scale is that of the converged derivative: long unrolls explode (panel c), and
    # would flatten everything else; their off-scale points sit on the edge as triangles.
    core = np.concatenate([np.asarray(dE) - np.asarray(dE_sem), np.asarray(dE) + np.asarray(dE_sem),
                           np.asarray(fd, float), np.asarray(grid_slope, float)])
    lo, hi = np.nanmin(core), np.nanmax(core)
    pad = 0.3 * ((hi - lo) or 1.0)
    lo, hi = lo - pad, hi + pad
    for j, (K, mean) in enumerate(unrolled.items()):
        mean, color = np.asarray(mean, float), f"C{j + 4}"
        above, below = mean > hi, mean < lo
        label = f"unrolled FIRE, K = {K} steps" + (" (triangles: off scale)" if np.any(above | below) else "")
        ax_d.plot(D, np.clip(mean, lo, hi), "--", marker=".", color=color, label=label)
        ax_d.plot(np.asarray(D)[above], np.full(int(above.sum()), hi), "^", color=color, ms=9)
        ax_d.plot(np.asarray(D)[below], np.full(int(below.sum()), lo), "v", color=color, ms=9)
    ax_d.set_ylim(lo, hi)
    ax_d.set_xlabel(r"diameter $D$ of species A ($\sigma_{BB}$)")
    ax_d.set_ylabel(r"$\langle \mathrm{d}E^*/\mathrm{d}D\rangle$ ($\varepsilon/\sigma_{BB}$)")
    ax_d.set_title("(b) slope of the mean relaxed energy, box following D", fontsize="medium")
    ax_d.legend(fontsize="small")

    K, bias = bias_curve
    ax_b.loglog(K, bias, color="C2")
    ax_b.set_xlabel("unrolled FIRE steps K")
    ax_b.set_ylabel(r"$\max_D |\langle \mathrm{d}E_K/\mathrm{d}D\rangle - \langle \mathrm{d}E^*_\infty/\mathrm{d}D"
                    r"\rangle|\,/\,\langle|\mathrm{d}E^*_\infty/\mathrm{d}D|\rangle$")
    ax_b.set_title("(c) bias of truncated unrolling against the converged\n"
                   r"derivative of the same trajectories, $E^*_\infty$", fontsize="medium")
    ax_b.grid(True, which="both", alpha=0.3)
    return fig


# ------------------------------------------------------------------------ main
def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="number of particles (even; half of each species)")
    p.add_argument("--seeds", type=int, default=40, help="random initial conditions per diameter")
    p.add_argument("--points", type=int, default=7, help="number of diameters on the grid")
    p.add_argument("--diameters", type=str, default=None,
                   help="comma-separated diameters (overrides --points; default: --points in [0.4, 1.0])")
    p.add_argument("--unroll-steps", type=str, default="10,100,1000",
                   help="comma-separated K: FIRE steps differentiated through for the unrolled estimate")
    p.add_argument("--unroll-seeds", type=int, default=8,
                   help="seeds per D differentiated through unrolled FIRE (the costly part; default 8)")
    p.add_argument("--packing-fraction", type=float, default=0.98, help="packing fraction φ")
    p.add_argument("--fmax", type=float, default=1e-12, help="force criterion of the relaxations")
    p.add_argument("--max-steps", type=int, default=100_000, help="FIRE step budget of the relaxations")
    p.add_argument("--h", type=float, default=1e-6,
                   help="finite-difference step in D (the error of central differences, ∝ h², is estimated from 2h)")
    p.add_argument("--loop-seeds", type=int, default=4, help="structures relaxed one by one for the timing")
    args = p.parse_args(argv)
    out = _common.out_dir(args.out)
    timer = _common.Timer()
    n, S, phi = args.n, args.seeds, args.packing_fraction
    if n % 2 or n < 8:
        p.error(f"--n must be an even number >= 8 (half of each species); got {n}.")
    if S < 2:
        p.error("--seeds must be at least 2 (standard errors).")
    D = (np.array([float(x) for x in args.diameters.split(",")]) if args.diameters
         else np.linspace(0.4, 1.0, args.points))
    Ks = sorted({int(k) for k in args.unroll_steps.split(",")})
    nD, B = len(D), len(D) * S
    fire = ms.FIRE()

    # Uniform random starts as jax-md's notebook; fractional coordinates, so the same seed
    # is the same initial condition at every D (the box follows D).
    template, pot = packing(n, float(D[0]), phi, 0)
    fractional = jnp.stack([packing(n, float(D[0]), phi, s)[0].positions / box_side(n, float(D[0]), phi)
                            for s in range(S)])
    print(f"N={n} particles (N/2 of diameter D, N/2 of diameter 1), φ = {phi:g}, D in {np.round(D, 4).tolist()}, "
          f"L(D) in [{float(box_side(n, D.min(), phi)):.4g}, {float(box_side(n, D.max(), phi)):.4g}]")
    print(f"number of seeds: {S}")

    # ---- one program: every (D, seed) relaxed and differentiated w.r.t. D (forward mode)
    def relaxed(diameters):
        return batch_relax(diameters, fractional, template, pot, phi, args.fmax, args.max_steps, fire)

    primal, tangent = jax.jvp(relaxed, (jnp.asarray(D),), (jnp.ones(nD),))
    energy, positions, stress, converged, steps = (np.asarray(x) for x in primal)
    dE_implicit = np.asarray(tangent[0])  # structure k depends on its own D only: the jvp is per structure
    timer(f"ms.relax_batch of {B} structures (N = {n}) and its jvp w.r.t. D, one program "
          f"(compilation included): {int(steps.max())} lockstep FIRE steps")
    conv = converged.reshape(nD, S)
    print(f"relaxations converged: {int(converged.sum())} of {B} (fmax < {args.fmax:g}; the others are excluded)")

    # ---- the envelope theorem: no linear solve needed for dE*/dD
    energy_fn = pot.energy_fn(template, neighbor_list=False)
    D_of = np.repeat(D, S)
    dE_envelope = envelope_derivative(energy_fn, positions, stress, D_of, pot, n, phi)
    ok = converged
    seed_scale = np.repeat(np.abs(dE_implicit).reshape(nD, S).mean(axis=1), S)  # typical |dE*/dD| at each D
    rel_env = np.abs(dE_implicit - dE_envelope)[ok] / seed_scale[ok]
    timer("envelope derivative ∂E/∂D|_R + (d ln L/dD) V tr σ (vmapped)")
    print(f"max relative difference (implicit jvp vs envelope, per structure): {rel_env.max():.3e}")

    # ---- ms.sensitivity on a few structures: denergy (total) equals denergy_partial at a minimum
    picks = sorted({0, nD // 2, nD - 1})
    diff_sens, diff_partial = [], []
    for i in picks:
        k = i * S  # seed 0 at D[i]
        side = box_side(n, float(D[i]), phi)
        system = template.replace(positions=positions[k], cell=side * np.eye(2))
        total, partial = sensitivity_derivative(system, pot, float(D[i]))
        scale = np.mean(np.abs(dE_implicit[i * S:(i + 1) * S]))
        diff_sens.append(abs(total - dE_implicit[k]) / scale)
        diff_partial.append(abs(total - partial) / scale)
    timer(f"ms.sensitivity along dσ/dD − (d ln L/dD) σ (the box scaling), {len(picks)} structures")
    print(f"max relative difference (ms.sensitivity denergy vs implicit jvp): {max(diff_sens):.3e}")
    print(f"max relative difference (ms.sensitivity denergy vs denergy_partial): {max(diff_partial):.3e}")

    # ---- finite differences at D ± h (and ± 2h for their error), warm-started from R*, same seeds
    h = args.h
    t0 = time.perf_counter()
    ends = {}
    for step in (h, -h, 2 * h, -2 * h):
        ends[step] = restart_relax(positions, D_of, D_of + step, template, pot, phi, args.fmax, args.max_steps, fire)
        if step == h:
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
    t_batch = (time.perf_counter() - t0) / 3  # compiled by now: the run time of one batch of warm starts
    fd = (np.asarray(ends[h].energy) - np.asarray(ends[-h].energy)) / (2 * h)
    fd2 = (np.asarray(ends[2 * h].energy) - np.asarray(ends[-2 * h].energy)) / (4 * h)
    jump = (jumped(np.asarray(ends[h].positions), np.asarray(ends[-h].positions), D_of + h, D_of - h, n, phi)
            | jumped(np.asarray(ends[2 * h].positions), np.asarray(ends[-2 * h].positions), D_of + 2 * h,
                     D_of - 2 * h, n, phi))
    fd_ok = ok & ~jump
    for r in ends.values():
        fd_ok &= np.asarray(r.converged)
    timer(f"finite differences: 4 × {B} re-relaxations at D ± h, D ± 2h (h = {h:g}), "
          f"{t_compile:.1f} s (compiling) + 3 × {t_batch:.1f} s")
    print(f"seeds that jumped basin under D ± 2h: {int(jump[ok].sum())} of {int(ok.sum())} (excluded)")
    fd_mask = fd_ok.reshape(nD, S)
    # Relative to the typical per-seed slope at each D, mean |dE*/dD|: the mean itself can
    # be near zero (D ≈ 1 at this φ), which would make a relative difference meaningless.
    scale = np.array([np.mean(np.abs(row[m])) for row, m in zip(dE_implicit.reshape(nD, S), fd_mask)])
    dE_mean_fdset, _ = mean_sem(dE_implicit.reshape(nD, S), fd_mask)
    fd_mean, fd_sem = mean_sem(fd.reshape(nD, S), fd_mask)
    fd2_mean, _ = mean_sem(fd2.reshape(nD, S), fd_mask)
    rel_fd = np.abs(dE_mean_fdset - fd_mean) / scale
    # central differences err by c h²: FD(2h) − FD(h) = 3 c h², so (FD(2h) − FD(h))/3 estimates FD(h)'s error
    fd_error = np.abs(fd2_mean - fd_mean) / 3 / scale
    print(f"max relative difference (⟨dE*/dD⟩ implicit vs FD slope of ⟨E*⟩ at D ± h): {np.nanmax(rel_fd):.3e}")
    print(f"estimated FD truncation error (relative, from D ± 2h): {np.nanmax(fd_error):.3e}")
    per_seed = np.abs(dE_implicit - fd)[fd_ok] / np.repeat(scale, S)[fd_ok]
    print(f"max relative difference per seed (implicit vs FD at D ± h): {per_seed.max():.3e}")

    # ---- averages over the converged seeds
    E_mean, E_sem = mean_sem(energy.reshape(nD, S), conv)
    dE_mean, dE_sem = mean_sem(dE_implicit.reshape(nD, S), conv)
    print(f"min E* over all converged relaxations: {energy[ok].min():.6g}")
    grid_D, grid_slope = D[1:-1], (E_mean[2:] - E_mean[:-2]) / (D[2:] - D[:-2])
    for i in range(nD):
        print(f"  D = {D[i]:.4f}: ⟨E*⟩ = {E_mean[i]:.6g} ± {E_sem[i]:.2g}, ⟨dE*/dD⟩ = {dE_mean[i]:.6g} "
              f"± {dE_sem[i]:.2g} (implicit), {fd_mean[i]:.6g} (FD at D ± h, {int(fd_mask[i].sum())} seeds)")
    if len(grid_D):
        # cold starts: the seeds' minima change as D moves by the grid step, so this is only
        # statistically comparable (in units of the standard errors)
        z = np.abs(grid_slope - dE_mean[1:-1]) / np.hypot(dE_sem[1:-1], np.hypot(E_sem[2:], E_sem[:-2])
                                                           / (D[2:] - D[:-2]))
        print(f"max |slope of ⟨E*⟩ on the D grid − ⟨dE*/dD⟩| in standard errors: {z.max():.2f}")

    # ---- truncated unrolling, against the limit of the same unrolled trajectories
    Kmax = max(Ks)
    Su = min(args.unroll_seeds, S)
    (E_K, R_K), (dE_K, _) = unrolled_energies(energy_fn, fractional[:Su], D, pot, n, phi, Kmax)
    E_K, dE_K = np.asarray(E_K), np.asarray(dE_K)  # (B, K): after 1..K steps
    timer(f"unrolled FIRE: {Kmax} steps of jax_md.minimize.fire_descent, jvp w.r.t. D, {Su} seeds × {nD} D")
    Du = np.repeat(D, Su)
    ok_u = ok.reshape(nD, S)[:, :Su].ravel()
    # The unrolled FIRE need not end in the minimum mdsens' FIRE found from the same start;
    # its own limit is what its derivative converges to: relax on from step Kmax (the
    # compiled batch program again) and take the envelope derivative there.
    limit = restart_relax(np.asarray(R_K), Du, Du, template, pot, phi, args.fmax, args.max_steps, fire)
    lim_ok = np.asarray(limit.converged)
    dE_limit = envelope_derivative(energy_fn, np.asarray(limit.positions), np.asarray(limit.stress), Du, pot, n, phi)
    timer("the unrolled trajectories relaxed on to their own minima (relax_batch) and their dE*/dD")
    lim_mask = lim_ok.reshape(nD, Su)
    lim_mean, lim_sem = mean_sem(dE_limit.reshape(nD, Su), lim_mask)
    lim_scale = np.mean(np.abs(dE_limit[lim_ok]))
    unrolled_mean = np.stack([mean_sem(dE_K[:, k].reshape(nD, Su), lim_mask)[0] for k in range(Kmax)], axis=1)
    bias_all = np.max(np.abs(unrolled_mean - lim_mean[:, None]), axis=0) / lim_scale
    unrolled = {K: unrolled_mean[:, K - 1] for K in Ks}
    for K in Ks:
        gap = np.mean(E_K[:, K - 1][lim_ok] - np.asarray(limit.energy)[lim_ok])
        print(f"unrolled bias at K = {K}: {bias_all[K - 1]:.3e} "
              f"(max over D of |⟨dE_K/dD⟩ − ⟨dE*/dD⟩| / mean |dE*/dD|, "
              f"same trajectories converged; ⟨E_K − E*⟩ = {gap:.3g})")
    energy_u = energy.reshape(nD, S)[:, :Su].ravel()
    same_min = np.abs(np.asarray(limit.energy) - energy_u) < 1e-9 * np.abs(energy_u)
    print(f"unrolled FIRE ends in mdsens' minimum for {int(same_min[lim_ok & ok_u].sum())} of "
          f"{int((lim_ok & ok_u).sum())} structures (energy within 1e-9)")
    z = np.abs(lim_mean - dE_mean) / np.hypot(lim_sem, dE_sem)
    print(f"max |⟨dE*/dD⟩ (unrolled FIRE's minima) − ⟨dE*/dD⟩ (mdsens FIRE's minima)| in standard errors: "
          f"{np.nanmax(z):.2f}")

    # ---- timing: the batch against a loop of ms.relax (both compiled; one run each)
    k_loop = min(args.loop_seeds, B)
    sides = [float(box_side(n, D_of[k] - h, phi)) for k in range(k_loop)]
    starts = [template.replace(positions=positions[k] * (sides[k] / float(box_side(n, D_of[k], phi))),
                               cell=sides[k] * np.eye(2)) for k in range(k_loop)]
    loop = lambda: [ms.relax(s, pot, params=params_at(pot, D_of[k] - h), fmax=args.fmax, max_steps=args.max_steps,
                             minimizer=fire, neighbor_list=False, stability=False).energy
                    for k, s in enumerate(starts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ms.NotConvergedWarning)
        loop()  # compiles
        t0 = time.perf_counter()
        loop()
    t_loop = time.perf_counter() - t0
    timer(f"loop of ms.relax over {k_loop} of the D − h starts: {t_loop:.2f} s after compilation")
    print(f"time of the batch ({B} structures): {t_batch:.2f} s; "
          f"loop of ms.relax: {t_loop / k_loop:.3f} s per structure")
    print(f"time ratio loop/batch (projected to {B} structures): {t_loop / k_loop * B / t_batch:.2f}")

    # ---- CSV and figure
    csv_path = out / "packing_ensemble.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["D", "L", "seeds_converged", "mean_E", "sem_E", "mean_dEdD_implicit", "sem_dEdD_implicit",
                    "seeds_fd", "mean_dEdD_fd", "sem_dEdD_fd", "grid_slope"] + [f"mean_dEdD_unrolled_K{K}" for K in Ks])
        for i in range(nD):
            grid = grid_slope[i - 1] if 0 < i < nD - 1 else np.nan
            w.writerow([D[i], float(box_side(n, D[i], phi)), int(conv[i].sum()), E_mean[i], E_sem[i], dE_mean[i],
                        dE_sem[i], int(fd_mask[i].sum()), fd_mean[i], fd_sem[i], grid]
                       + [unrolled[K][i] for K in Ks])
    print(f"wrote {csv_path}")
    fig = figure(D, E_mean, E_sem, dE_mean, dE_sem, fd_mean, fd_sem, grid_D, grid_slope, unrolled,
                 (np.arange(1, Kmax + 1), bias_all), n, S, phi)
    _common.save_figure(fig, out, "packing_ensemble.png", timer)
    return dict(rel_fd=float(np.nanmax(rel_fd)), rel_envelope=float(rel_env.max()),
                bias={K: float(bias_all[K - 1]) for K in Ks})


if __name__ == "__main__":
    main()
