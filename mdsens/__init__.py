"""mdsens: sensitivity analysis of relaxed atomistic structures by implicit differentiation.

``import mdsens`` turns on JAX float64 (opt out with ``MDSENS_ENABLE_X64=0``; see
:mod:`mdsens._config`). The public API is flat: everything below is ``ms.<name>``.
"""

from mdsens._config import enable_x64_if_requested

enable_x64_if_requested()

from mdsens import data, linear_solve  # noqa: E402
from mdsens.errors import (  # noqa: E402
    LinearSolveError,
    LinearSolveWarning,
    InfeasibleProblemError,
    InfeasibleProblemWarning,
    MdsensError,
    MdsensWarning,
    MissingFileError,
    NullSpaceError,
    NullSpaceWarning,
    OptimalityStructureError,
    OptionError,
    PrecisionError,
    NonFiniteError,
    RootError,
    RootWarning,
    SingularJacobianError,
)
from mdsens.implicit import (  # noqa: E402
    SolveInfo,
    custom_fixed_point,
    custom_root,
    root_jvp,
    root_vjp,
)
from mdsens import jacobian_error, optim  # noqa: E402  (clients of the core, like md)
from mdsens.md import (  # noqa: E402
    FIRE,
    BatchRelaxResult,
    Calculator,
    CutoffError,
    ElasticConstants,
    GradientDescent,
    LBFGS,
    NearSingularWarning,
    NeighborListError,
    NeighborListOptions,
    NotConvergedError,
    NotConvergedWarning,
    ObservableUncertainty,
    ParameterError,
    ParameterJacobian,
    PotentialError,
    Prediction,
    RelaxError,
    RelaxResult,
    ResultMismatchError,
    SaddlePointError,
    GradientInfo,
    Sensitivity,
    SpeciesError,
    StabilityOptions,
    StructureError,
    StructureFileError,
    UnknownParameterError,
    Uncertainty,
    System,
    elastic_constants,
    make_elastic_constants,
    make_observable_gradient,
    make_relax,
    make_sensitivity,
    observable_gradient,
    parameter_jacobian,
    potentials,
    predict,
    propagate_uncertainty,
    read,
    relax,
    relax_batch,
    sensitivity,
    write,
)

__version__ = "0.1.0"
