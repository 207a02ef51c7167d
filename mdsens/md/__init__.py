"""Physics layer: systems, potentials, relaxation, sensitivities (a client of `implicit`)."""

from mdsens.md.system import StructureError, System
