"""Where linearised uncertainty propagation starts to fail, as the parameter covariance grows.

``ms.propagate_uncertainty`` carries a parameter covariance Σ to a relaxed observable
through its implicit derivative: mean O(θ₀), variance gᵀ Σ g. That is exact for a
linear response and good while the covariance is small. This script measures how small:
the formation energy E_f of a Stillinger–Weber silicon vacancy (fixed cell, 63 atoms by
default) under independent relative standard deviations s on ε, σ and λ, for s from
0.5 % to 4 %, against Monte Carlo of re-relaxations (``ms.relax`` warm-started from the
relaxed structure) at parameters drawn from the same covariance.

The same standard-normal draws serve every s (common random numbers), and every draw
is also pushed through the linear model. The ratio of the re-relaxed to the linear
spread *on the same draws* is then free of sampling noise at small s (both are the same
linear function of the draws) and shows the nonlinearity alone; the Monte Carlo standard
error of the spread, std/√(2(M−1)), is drawn for scale. The mean shift of the re-relaxed
E_f from E_f(θ₀), in units of the linearised std, is the curvature's bias that a
first-order model cannot have.

Printed: per s, the linearised std, the Monte Carlo mean and std with their standard
errors, the same-draw ratio and the mean shift; and the largest s up to which the
linearised mean and std are within two Monte Carlo standard errors. At the fixed cell of
the perfect crystal a change of σ also strains the lattice, which dominates the spread
(θ·dE_f/dθ is −65 eV for σ, a few eV for ε and λ). Figure ``uncertainty_growth.png``
(ratio and mean shift against s; histograms at the smallest and largest s), CSV
``uncertainty_growth.csv`` (one row per s).

Run: ``python examples/uncertainty_growth.py --out out/`` (about 45 s on 2 cores).
"""

from __future__ import annotations

import _common

_common.headless()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.md.sensitivity import parameter_labels  # noqa: E402
from silicon_vacancy import FMAX, FixedCellBulk, energy_observable, flat, vacancy_setting, write_csv  # noqa: E402

#: The uncertain parameters; each gets the same relative standard deviation s.
UNCERTAIN = ("epsilon", "sigma", "lam")
SCALES = (0.005, 0.01, 0.02, 0.04)


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2, help="cubic 8-atom cells per axis (2: 63 atoms, 3: 215)")
    p.add_argument("--samples", type=int, default=200, help="Monte Carlo re-relaxations per s")
    p.add_argument("--scales", type=str, default=",".join(f"{s:g}" for s in SCALES),
                   help="comma-separated relative standard deviations s (0.01 = 1 %%)")
    p.add_argument("--seed", type=int, default=0, help="seed of the standard-normal draws")
    args = p.parse_args(argv)
    scales = sorted(float(s) for s in args.scales.split(","))
    if args.samples < 3:
        p.error("--samples must be at least 3 (a standard deviation and its error)")
    if not all(0 < s < 0.3 for s in scales):
        p.error("--scales must lie in (0, 0.3)")
    pot, theta0, perfect, start, _, c_n = vacancy_setting(p, args.size)
    out = _common.out_dir(args.out)
    timer = _common.Timer()
    bulk = FixedCellBulk(pot, perfect)
    res = ms.relax(start, pot, fmax=FMAX, max_steps=100_000)
    if not res.converged:
        raise RuntimeError("the vacancy relaxation did not converge")
    E_f0 = float(res.energy) - c_n * bulk(theta0)
    timer(f"SW Si vacancy, {res.system.n_atoms} atoms, fixed cell: E_f(θ₀) = {E_f0:.6f} eV")

    # The linearised response at θ₀: one gradient g of E_f, then std(s) = s · √(Σ_k (θ_k g_k)²).
    E_vac = energy_observable(pot, res, theta0)
    values = flat(theta0)
    labels = list(parameter_labels(theta0))  # ravel_pytree order, the covariance's
    cov1 = np.zeros((values.size, values.size))
    for name in UNCERTAIN:
        j = labels.index(name)
        cov1[j, j] = values[j] ** 2  # relative std 1 (scaled by s² below)
    unc = ms.propagate_uncertainty(res, pot, cov1, {"E_f": lambda R, q, c: E_vac(R, q, c) - c_n * bulk.traced(q)},
                                   mode="forward")
    gradient = np.asarray(unc["E_f"].jacobian[0])
    std_unit = float(unc["E_f"].std)  # the linearised std at s = 1 (100 %): std(s) = s · std_unit
    timer(f"linearised E_f: dE_f/dθ along {', '.join(UNCERTAIN)} (ms.propagate_uncertainty)")

    z = np.random.default_rng(args.seed).standard_normal((args.samples, len(UNCERTAIN)))
    rows, samples = [], {}
    for s in scales:
        exact, linear = [], []
        for zk in z:
            q = dict(theta0)
            for name, zi in zip(UNCERTAIN, zk):
                q[name] = jnp.asarray(float(theta0[name]) * (1.0 + s * zi), jnp.float64)
            r = ms.relax(res.system, pot, params=q, fmax=FMAX, max_steps=100_000)
            if not r.converged:
                raise RuntimeError(f"a re-relaxation at s = {s:g} did not converge")
            exact.append(float(r.energy) - c_n * bulk(q))
            linear.append(E_f0 + float(gradient @ (flat(q) - values)))
        exact, linear = np.array(exact), np.array(linear)
        samples[s] = exact
        M = exact.size
        std_mc = float(np.std(exact, ddof=1))
        row = dict(s=s, std_linearised=s * std_unit, mean_mc=float(exact.mean()), sem_mean=std_mc / np.sqrt(M),
                   std_mc=std_mc, sem_std=std_mc / np.sqrt(2.0 * (M - 1)),
                   same_draw_ratio=std_mc / float(np.std(linear, ddof=1)),
                   mean_shift=(float(exact.mean()) - E_f0) / (s * std_unit))
        rows.append(row)
        timer(f"s = {100 * s:g} %: {M} re-relaxations")
        print(f"s = {100 * s:g} %: linearised std {row['std_linearised']:.4g} eV; Monte Carlo std {std_mc:.4g} "
              f"± {row['sem_std']:.2g} eV, mean − E_f(θ₀) {row['mean_mc'] - E_f0:+.3g} ± {row['sem_mean']:.2g} eV; "
              f"mean shift {row['mean_shift']:+.3f} linearised std")
        print(f"same-draw std ratio at s = {100 * s:g} %: {row['same_draw_ratio']:.6f}")

    within = [r["s"] for r in rows if abs(r["std_mc"] - r["std_linearised"]) <= 2.0 * r["sem_std"]
              and abs(r["mean_mc"] - E_f0) <= 2.0 * r["sem_mean"]]
    agreed = max((s for s in within if all(t in within for t in scales if t <= s)), default=None)
    print("largest s with the linearised mean and std within 2 Monte Carlo standard errors: "
          + ("none" if agreed is None else f"{100 * agreed:g} %"))
    worst = rows[-1]
    print(f"at s = {100 * worst['s']:g} %: std ratio {worst['same_draw_ratio']:.3f}, "
          f"mean shift {worst['mean_shift']:+.2f} linearised std")

    write_csv(out / "uncertainty_growth.csv", rows)
    fig = figure(rows, samples, E_f0, std_unit, res.system.n_atoms)
    _common.save_figure(fig, out, "uncertainty_growth.png", timer)
    return rows


def percent_axis(ax, s):
    """A log axis with a plain tick at each s (%)."""
    ax.set_xscale("log")
    ax.set_xticks(s, [f"{v:g}" for v in s])
    ax.minorticks_off()


def figure(rows, samples, E_f0, std_unit, n_atoms):
    s = np.array([r["s"] for r in rows]) * 100
    fig = Figure(figsize=(15.0, 4.4), layout="constrained")
    ax_r, ax_m, ax_h = fig.subplots(1, 3)
    ratio = np.array([r["same_draw_ratio"] for r in rows])
    band = np.array([r["sem_std"] / r["std_linearised"] for r in rows])
    ax_r.fill_between(s, 1 - band, 1 + band, color="0.85", label="±1 Monte Carlo standard error of the std")
    ax_r.plot(s, np.array([r["std_mc"] / r["std_linearised"] for r in rows]), "s", mfc="none", color="C1",
              label="re-relaxed std / linearised std")
    ax_r.plot(s, ratio, "o-", color="C0", label="re-relaxed / linear model, same draws")
    ax_r.axhline(1.0, color="k", lw=0.8)
    percent_axis(ax_r, s)
    ax_r.set_xlabel("relative std s of ε, σ, λ (%)")
    ax_r.set_ylabel("std of E_f: ratio to the linearised value")
    ax_r.set_title("(a) spread", fontsize="medium")
    ax_r.legend(fontsize="small")

    shift = np.array([r["mean_shift"] for r in rows])
    err = np.array([r["sem_mean"] / r["std_linearised"] for r in rows])
    ax_m.errorbar(s, shift, yerr=err, marker="o", capsize=3, color="C0")
    ax_m.axhline(0.0, color="k", lw=0.8)
    percent_axis(ax_m, s)
    ax_m.set_xlabel("relative std s of ε, σ, λ (%)")
    ax_m.set_ylabel("(⟨E_f⟩ − E_f(θ₀)) / linearised std")
    ax_m.set_title("(b) mean shift: the curvature a first-order model misses", fontsize="medium")

    for k, key in enumerate((min(samples), max(samples))):
        x = samples[key]
        std = key * std_unit
        ax_h.hist(x - E_f0, bins=25, density=True, alpha=0.45, color=f"C{k}",
                  label=f"s = {100 * key:g} %: {x.size} re-relaxations")
        grid = np.linspace(-4 * std, 4 * std, 200)
        ax_h.plot(grid, np.exp(-0.5 * (grid / std) ** 2) / (std * np.sqrt(2 * np.pi)), color=f"C{k}",
                  label=f"s = {100 * key:g} %: linearised N(0, {std:.3g} eV)")
    ax_h.set_xlabel("E_f − E_f(θ₀) (eV)")
    ax_h.set_ylabel("probability density (1/eV)")
    ax_h.set_title("(c) distributions at the smallest and largest s", fontsize="medium")
    ax_h.legend(fontsize="small")
    fig.suptitle(f"Stillinger–Weber Si vacancy ({n_atoms} atoms, fixed cell): linearised uncertainty against "
                 "re-relaxations as the covariance grows")
    return fig


if __name__ == "__main__":
    main()
