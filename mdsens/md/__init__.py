"""Physics layer: systems, potentials, relaxation, sensitivities, elastic constants.

A client of :mod:`mdsens.implicit`, used exactly the way user code would use it. The
modules, from the bottom up (see ``docs/design.md``):

``errors``, ``options``, ``system``, ``io``, ``space``, ``strain``, ``neighbors``,
``potentials``, ``minimize`` (pure minimizers), ``driver`` (the host loop),
``zero_modes`` (stability), ``cell_relaxation`` and ``relaxation`` (``relax``),
``problem`` (the checked input of every derivative), ``sensitivity``, ``elastic``,
``calculator`` (an ASE calculator on any potential).
"""

from mdsens.md import neighbors, potentials, strain, zero_modes
from mdsens.md.batch import BatchRelaxResult, relax_batch
from mdsens.md.calculator import Calculator
from mdsens.md.driver import RelaxResult
from mdsens.md.elastic import ElasticConstants, elastic_constants, make_elastic_constants
from mdsens.md.errors import (
    CutoffError,
    NearSingularWarning,
    NeighborListError,
    NotConvergedError,
    NotConvergedWarning,
    ParameterError,
    PotentialError,
    RelaxError,
    ResultMismatchError,
    SaddlePointError,
    SpeciesError,
    StructureError,
    StructureFileError,
    UnknownParameterError,
)
from mdsens.md.io import read, write
from mdsens.md.prediction import ParameterJacobian, Prediction, parameter_jacobian, predict
from mdsens.md.options import FIRE, LBFGS, GradientDescent, NeighborListOptions, StabilityOptions
from mdsens.md.relaxation import make_relax, relax
from mdsens.md.sensitivity import (
    GradientInfo,
    Sensitivity,
    make_observable_gradient,
    make_sensitivity,
    observable_gradient,
    sensitivity,
)
from mdsens.md.system import System
from mdsens.md.uncertainty import ObservableUncertainty, Uncertainty, propagate_uncertainty
