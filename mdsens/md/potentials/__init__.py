"""Parameterized potentials on jax-md (see `base.Potential` for the contract).

Every potential holds differentiable parameters in ``pot.params`` (dict of float64
arrays) and returns pure energy functions ``E(positions, params, cell, neighbor=None)``.
"""

from mdsens.md.errors import CutoffError, ParameterError, PotentialError, SpeciesError
from mdsens.md.potentials.base import Potential
from mdsens.md.potentials.custom import (CustomPotential, displacement, from_energy_fn, from_jax_md, neighbor_displacements,
                                           split_nnx)
from mdsens.md.potentials.eam import EAM, ZhouEAM, read_eam
from mdsens.md.potentials.lennard_jones import LennardJones
from mdsens.md.potentials.morse import Morse
from mdsens.md.potentials.soft_sphere import SoftSphere
from mdsens.md.potentials.stillinger_weber import StillingerWeber
from mdsens.md.potentials.tersoff import Tersoff, read_lammps_tersoff

__all__ = [
    "Potential",
    "PotentialError",
    "SpeciesError",
    "CutoffError",
    "ParameterError",
    "LennardJones",
    "SoftSphere",
    "Morse",
    "StillingerWeber",
    "Tersoff",
    "read_lammps_tersoff",
    "EAM",
    "ZhouEAM",
    "read_eam",
    "CustomPotential",
    "from_energy_fn",
    "from_jax_md",
    "split_nnx",
    "displacement",
    "neighbor_displacements",
]
