"""Regenerate the bundled structures in data/ (their provenance is in data/README.md).

    python data/make_data.py

Every structure is built from its textbook definition with a fixed random seed, so the
files are reproducible bit for bit. Nothing here is relaxed: relaxing them is the demo's
job (``mdsens demo``).
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mdsens  # noqa: E402,F401  (float64)
from mdsens.md.io import write  # noqa: E402
from mdsens.md.system import System  # noqa: E402


def lj13_icosahedron(sigma=3.4, rattle=0.05, seed=0) -> System:
    """13-atom Ar icosahedron (centre + 12 vertices), free, rattled by ``rattle`` Å."""
    phi = (1 + 5**0.5) / 2
    vertices = []
    for a in (-1, 1):
        for b in (-phi, phi):
            vertices += [(0, a, b), (a, b, 0), (b, 0, a)]
    vertices = np.array(vertices, float)
    # Centre-vertex distance 2^(1/6) sigma: the LJ pair minimum; the relaxed LJ13 is ~3% tighter.
    vertices *= 2 ** (1 / 6) * sigma / np.linalg.norm(vertices[0])
    positions = np.vstack([np.zeros(3), vertices])
    positions += np.random.default_rng(seed).normal(scale=rattle, size=positions.shape)
    return System(positions=positions, symbols=("Ar",), pbc=False)


def fcc_vacancy(a=5.26, reps=4, symbol="Ar") -> System:
    """fcc ``reps``^3 conventional cells with the atom at the origin removed."""
    from ase.build import bulk

    atoms = bulk(symbol, "fcc", a=a, cubic=True).repeat(reps)
    del atoms[0]
    return System.from_ase(atoms)


def diamond_si(a=5.431, reps=2, rattle=0.03, seed=0) -> System:
    """Diamond Si, ``reps``^3 conventional (8-atom) cells, rattled by ``rattle`` Å."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=a, cubic=True).repeat(reps)
    atoms.positions += np.random.default_rng(seed).normal(scale=rattle, size=atoms.positions.shape)
    return System.from_ase(atoms)


def soft_sphere_packing_2d(n=128, phi=0.90, diameters=(1.0, 1.4), seed=0) -> System:
    """2D 50:50 binary packing at packing fraction ``phi``, random positions (reduced units)."""
    rng = np.random.default_rng(seed)
    species = np.repeat(np.arange(2), n // 2).astype(np.int32)
    radii = np.asarray(diameters)[species] / 2
    side = np.sqrt(np.sum(np.pi * radii**2) / phi)
    positions = rng.uniform(0, side, size=(n, 2))
    return System(positions=positions, cell=side * np.eye(2), species=species, symbols=("A", "B"), pbc=True)


# The diamond structure as a crystallographer writes it: one Si site (8a) in Fd-3m,
# origin choice 1; readers expand it to the 8-atom conventional cell.
SI_CIF = """data_Si_diamond
_cell_length_a    5.431
_cell_length_b    5.431
_cell_length_c    5.431
_cell_angle_alpha 90
_cell_angle_beta  90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'F d -3 m'
_symmetry_Int_Tables_number 227
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Si1 Si 0.0 0.0 0.0
"""


def main():
    write(os.path.join(HERE, "lj13_ar.xyz"), lj13_icosahedron())
    write(os.path.join(HERE, "ar_fcc_vacancy.xyz"), fcc_vacancy())
    write(os.path.join(HERE, "si_diamond_2x2x2.vasp"), diamond_si(), format="vasp")
    with open(os.path.join(HERE, "si_diamond.cif"), "w") as fd:
        fd.write(SI_CIF)
    write(os.path.join(HERE, "soft_spheres_2d.xyz"), soft_sphere_packing_2d())


if __name__ == "__main__":
    main()
