"""Physics layer: systems, potentials, relaxation, sensitivities.

A client of :mod:`mdsens.implicit`, used exactly the way user code would use it.
"""

from mdsens.md import neighbors, potentials, zero_modes
from mdsens.md.elastic import ElasticConstants, elastic_constants, make_elastic_constants
from mdsens.md.implicit_relax import relax, rigid_null_space
from mdsens.md.io import StructureFileError, read, write
from mdsens.md.relax import (
    MinimizeResult,
    NotConvergedWarning,
    RelaxError,
    RelaxResult,
    fire_minimize,
    gradient_descent_map,
    gradient_descent_minimize,
    make_relax,
)
from mdsens.md.sensitivity import (
    Sensitivity,
    make_observable_gradient,
    make_sensitivity,
    observable_gradient,
    sensitivity,
)
from mdsens.md.system import StructureError, System
from mdsens.md.zero_modes import NearSingularWarning, SaddlePointError
