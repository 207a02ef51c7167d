"""Your own potential: any JAX energy function, or a jax-md model, without subclassing.

Two constructors return a :class:`CustomPotential`, which relaxes, differentiates and
serves as an ASE calculator exactly like a built-in potential:

* :func:`from_energy_fn` wraps a function you wrote,

      energy_fn(positions, params, cell, neighbor) -> scalar energy (eV)
      energy_fn(positions, params, cell, neighbor, species)      (with ``symbols=``)

  - ``positions``: ``(N, d)`` float64, **Cartesian** (Å), as the relaxation has them
    (not wrapped into the cell);
  - ``params``: your pytree (nested dicts, lists, tuples of arrays), every leaf a float64
    array of the shape you gave;
  - ``cell``: ``(d, d)`` float64 lattice vectors as **rows** (Å, ASE's convention) for a
    periodic system, ``None`` for a free one. Periodic images are minimum images;
    :func:`neighbor_displacements` and :func:`displacement` compute them;
  - ``neighbor``: ``(N, M)`` int32 neighbor indices in jax-md's ``Dense`` format: row
    ``i`` holds every atom ``j ≠ i`` closer than ``cutoff`` (and possibly farther ones:
    lists carry a skin), each pair in both rows, empty slots equal to ``N``. Small
    systems get all pairs (``M = N − 1``); from ``neighbor_list_min_atoms`` atoms a
    neighbor list. The function must not depend on which of the two it gets: cut every
    interaction smoothly at ``cutoff`` yourself;
  - ``species``: ``(N,)`` int32 indices into ``symbols`` (only when ``symbols`` is given).

  It must return a float64 scalar and be a pure function of its arguments (traceable by
  ``jax.jit``, ``jax.grad``, ``jax.jvp``; no side effects).

* :func:`from_jax_md` wraps a jax-md model, an NNX energy function
  (``energy.behler_parrinello_neighbor_list(...)``, ``energy.graph_network_neighbor_list``:
  ``energy_fn.model``) or a functional one ``energy_fn(params, R, neighbor, **kwargs)``
  with its parameters. Build the model with :func:`displacement` as its displacement
  function and ``format=partition.Dense``; mdsens then calls it with Cartesian positions,
  a ``Dense`` neighbor list of its own and, for periodic systems, ``cell=`` (rows, Å).
  :func:`split_nnx` turns an NNX model into ``apply(params, R, neighbor, **kwargs)`` and
  its weights, to compose it with other terms (a physical baseline plus a network).

**Parameters.** ``pot.params`` is a *flat* dict of float64 arrays, one entry per leaf of
your pytree, named by its path joined with ``/`` (``{"mlp": {"layers_0": {"kernel": w}}}``
→ ``"mlp/layers_0/kernel"``); scalar parameters in sensitivities are labelled
``"mlp/layers_0/kernel[3,2]"`` and ``wrt=`` takes either form. That flat dict is what every
mdsens routine passes and returns (``ms.observable_gradient`` returns one like it);
:meth:`CustomPotential.tree` gives your pytree back and :meth:`CustomPotential.flatten`
turns one into the flat dict. Wherever mdsens takes ``params=``, your pytree is accepted
too. Leaves are converted to float64 (float32 weights are upcast exactly).

**Cutoff.** ``cutoff`` (Å, required) is the range beyond which a pair no longer changes
the energy. mdsens allocates neighbor lists for it and, for derivatives, keeps only the
pairs within ``1.01 · cutoff``. It is a promise that cannot be checked cheaply: a
``cutoff`` shorter than the function's real range silently drops interactions (energies
that depend on the list, derivatives that miss terms). For a graph network with several
message-passing steps it is the *edge* cutoff (information travels along edges).

**Hessians** come from forward-over-reverse autodiff (the block form of built-in
potentials needs their per-atom decomposition, which an arbitrary function does not
promise), so derivative solves cost a few gradient evaluations per iteration.

Failure modes: :class:`~mdsens.PotentialError` for a missing or invalid ``cutoff``, an
energy that is not a scalar, not float64 or (on concrete values) NaN/inf;
:class:`~mdsens.ParameterError` for a pytree of another structure, non-float leaves,
NaN/inf values or leaf names that cannot be labels; :class:`~mdsens.SpeciesError` for
species not in ``symbols``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._config import require_x64
from mdsens.md import neighbors
from mdsens.md._jax_md import partition
from mdsens.md.errors import ParameterError, PotentialError
from mdsens.md.potentials.base import Potential, check_finite_params
from mdsens.md.system import System

__all__ = [
    "CustomPotential",
    "from_energy_fn",
    "from_jax_md",
    "split_nnx",
    "displacement",
    "neighbor_displacements",
    "EMPTY_SLOT_LENGTH",
    "DEFAULT_NEIGHBOR_LIST_MIN_ATOMS",
]

#: Length (Å) of the stand-in displacement :func:`neighbor_displacements` puts in empty
#: slots: far beyond any cutoff, non-zero so that norms and their gradients stay finite.
EMPTY_SLOT_LENGTH = 1.0e3
#: Neighbor lists from this many atoms by default. An unknown function may hold
#: three-body terms, whose all-pairs path is O(N³) (Stillinger–Weber switches at 32).
DEFAULT_NEIGHBOR_LIST_MIN_ATOMS = 64
#: Characters a leaf name cannot hold: they delimit element labels in ``wrt=``.
_LABEL_CHARACTERS = "[],"


# --------------------------------------------------------------------------- geometry
def displacement(Ra, Rb, cell=None, **unused_kwargs):
    """Minimum-image displacement ``Ra − Rb`` (Å), a jax-md ``DisplacementFn``.

    Args:
      Ra, Rb: ``(d,)`` Cartesian positions (Å).
      cell: ``(d, d)`` lattice vectors as rows (Å) for a periodic system; ``None`` (free
        space) gives ``Ra − Rb``.
      unused_kwargs: ignored (jax-md passes e.g. ``t=`` when it probes the function).

    Returns:
      ``(d,)`` Å. Periodic: ``wrap(s) @ cell`` with ``s = (Ra − Rb) @ inv(cell)`` and each
      component wrapped into ``[−1/2, 1/2]``, the minimum image whenever the range is
      below half of every perpendicular width (``pot.check`` refuses cells that are too
      small). Plain arithmetic, so derivatives w.r.t. positions and cell are exact (jax-md's
      ``periodic_general`` custom JVP is not used; ``docs/design.md`` §10).
    """
    d = Ra - Rb
    if cell is None:
        return d
    s = d @ jnp.linalg.inv(cell)
    return (s - jnp.round(s)) @ cell


def neighbor_displacements(positions, cell, neighbor):
    """``(dR, mask)`` for a ``neighbor`` index array, as :func:`from_energy_fn` passes it.

    Args:
      positions: ``(N, d)`` Cartesian (Å).
      cell: ``(d, d)`` rows (Å) or ``None`` (free).
      neighbor: ``(N, M)`` int indices, empty slots ``N``.

    Returns:
      ``dR (N, M, d)``: ``dR[i, m]`` the minimum image of ``R_i − R_{neighbor[i, m]}`` (Å);
      ``mask (N, M)``: ``True`` for real neighbors. Empty slots hold the constant vector
      ``(EMPTY_SLOT_LENGTH, 0, ...)``: finite norms and zero gradients, but multiply
      their terms by ``mask`` all the same (a potential without a cutoff would count them).
    """
    positions = jnp.asarray(positions)
    n = positions.shape[0]
    mask = neighbor < n
    # jnp.take, not positions[neighbor]: the gradient of a 2-D-index gather lowers to a
    # scatter that XLA's CPU backend runs ~10x slower (docs/design.md §10).
    others = jnp.take(positions, jnp.minimum(neighbor, n - 1), axis=0)
    dR = positions[:, None, :] - others
    if cell is not None:
        cell = jnp.asarray(cell)
        s = dR @ jnp.linalg.inv(cell)
        dR = (s - jnp.round(s)) @ cell
    empty = jnp.zeros((positions.shape[-1],), dR.dtype).at[0].set(EMPTY_SLOT_LENGTH)
    return jnp.where(mask[..., None], dR, empty), mask


# --------------------------------------------------------------------------- pytrees
def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_names(paths) -> tuple:
    """``"a/b/0"`` per key path, checked: unique, and usable inside ``"name[i,j]"`` labels."""
    names = tuple("/".join(_key_name(k) for k in path) or "params" for path in paths)
    for name in names:
        if any(c in name for c in _LABEL_CHARACTERS) or any(c.isspace() for c in name):
            raise ParameterError(
                f"parameter leaf {name!r}: names of pytree leaves (their key paths joined with '/') "
                f"must not contain whitespace or any of {_LABEL_CHARACTERS!r}, which delimit element "
                "labels such as 'w[3,2]'. Rename the key."
            )
    seen = set()
    for name in names:
        if name in seen:
            raise ParameterError(
                f"two parameter leaves are both named {name!r} (key paths joined with '/'); rename "
                "one of the keys."
            )
        seen.add(name)
    return names


def _float64_leaf(name: str, value):
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ParameterError(
            f"parameter leaf {name!r} has dtype {dtype}; parameters are differentiated, so every "
            "leaf must be a real floating-point array. Close over integer or boolean settings "
            "in the energy function instead of passing them as parameters."
        )
    return jnp.asarray(value, jnp.float64)


# --------------------------------------------------------------------------- potential
class CustomPotential(Potential):
    """A potential from a user energy function; built by :func:`from_energy_fn` or
    :func:`from_jax_md` (see the module docstring for the calling convention).

    Attributes:
      params: flat dict ``{"a/b/c": float64 array}``, one entry per leaf of the pytree.
      symbols: species names passed as indices to the function, or ``None``.
      name: for messages.
    """

    pairwise = False

    def __init__(self, energy_fn: Callable, params, cutoff: float, *, symbols: Optional[Sequence[str]] = None,
                 dims: Sequence[int] = (2, 3), neighbor_list_min_atoms: int = DEFAULT_NEIGHBOR_LIST_MIN_ATOMS,
                 name: str = "custom potential"):
        self.name = str(name)
        if not callable(energy_fn):
            raise PotentialError(f"{self.name}: energy_fn must be a function; got {type(energy_fn).__name__}.")
        self._energy = energy_fn
        self._cutoff = _checked_cutoff(cutoff, self.name)
        self.symbols = None if symbols is None else tuple(str(s) for s in symbols)
        self.n_species = None if symbols is None else len(self.symbols)
        self.dims = tuple(int(d) for d in dims)
        self.neighbor_list_min_atoms = int(neighbor_list_min_atoms)
        paths_leaves, self._treedef = jax.tree_util.tree_flatten_with_path(params)
        self._names = _leaf_names([p for p, _ in paths_leaves])
        flat = {n: _float64_leaf(n, v) for n, (_, v) in zip(self._names, paths_leaves)}
        check_finite_params(flat, self.name)
        self.params = flat

    # -- the pytree ----------------------------------------------------------------------
    def tree(self, params=None):
        """The user's pytree for flat ``params`` (default ``self.params``); a pytree is
        returned as given."""
        flat = self._as_flat(self.params if params is None else params)
        return jax.tree_util.tree_unflatten(self._treedef, [flat[n] for n in self._names])

    def flatten(self, tree) -> dict:
        """The flat dict ``{"a/b/c": leaf}`` of a pytree shaped like the original params.

        Raises:
          ParameterError: another tree structure.
        """
        structure = jax.tree_util.tree_structure(tree)
        if structure != self._treedef:
            raise ParameterError(
                f"{self.name}: params must be the flat dict pot.params (keys {list(self._names)[:6]}"
                f"{'...' if len(self._names) > 6 else ''}) or a pytree shaped like the original "
                f"params, {self._treedef}; got {structure}."
            )
        return dict(zip(self._names, jax.tree_util.tree_leaves(tree)))

    def _as_flat(self, params) -> dict:
        if isinstance(params, dict) and set(params) == set(self._names) and not any(
                isinstance(v, (dict, list, tuple)) for v in params.values()):
            return dict(params)
        return self.flatten(params)

    # -- the Potential hooks --------------------------------------------------------------
    def cutoff(self, params=None) -> float:
        """Interaction range (Å), as declared (the same for every ``params``)."""
        return self._cutoff

    def _validate_params(self, params) -> dict:
        flat = {n: _float64_leaf(n, v) for n, v in self._as_flat(params).items()}
        return super()._validate_params(flat)

    def _shape_check_only(self, params):
        return {n: _float64_leaf(n, v) for n, v in self._as_flat(params).items()}

    def _local_energy(self, params, dR, mask, species_i, species_j):
        raise PotentialError(f"{self.name}: a custom potential has no per-atom decomposition.")

    def energy_fn(self, system: System, *, neighbor_list: bool | None = None, params=None) -> Callable:
        """Pure energy function ``E(positions, params, cell, neighbor=None)`` for ``system``,
        in the contract of :meth:`Potential.energy_fn` (``params`` flat or the pytree).

        ``E`` calls the user function with the module docstring's convention: the cell only
        for periodic systems (``None`` otherwise), the neighbor indices (all pairs when
        ``neighbor`` is ``None`` on the dense path), the species indices with ``symbols``.
        It carries no Hessian-block hooks: Hessian products come from autodiff.

        Raises:
          PotentialError: (when traced) the function returns a non-scalar or a dtype other
            than float64; (concrete calls) a NaN/inf energy; a periodic system without a
            cell; no ``neighbor`` in neighbor-list mode.
        """
        require_x64(f"{self.name} energies")
        self.check(system, params)
        n = system.n_atoms
        use_nl = self.uses_neighbor_list(system) if neighbor_list is None else bool(neighbor_list)
        periodic = bool(system.pbc)
        species = None if self.symbols is None else np.asarray(self.species_indices(system), np.int32)
        # Row i: every j != i, in order (the dense path's "neighbor list").
        others = np.nonzero(~np.eye(n, dtype=bool))[1].reshape(n, max(n - 1, 0)).astype(np.int32)
        user_fn, to_flat, tree = self._energy, self._shape_check_only, self.tree
        name = self.name

        def energy(positions, params, cell=None, neighbor=None):
            p = tree(to_flat(params))
            positions = jnp.asarray(positions, jnp.float64)
            if periodic:
                if cell is None:
                    raise PotentialError(f"{name}: this system is periodic; pass its cell (d, d).")
                cell = jnp.asarray(cell, jnp.float64)
            else:
                cell = None
            if neighbor is None:
                if use_nl:
                    raise PotentialError(
                        f"{name}: this energy function was built for neighbor lists (N={n}); pass "
                        "neighbor=pot.neighbor_list(system, params), or build it with "
                        "energy_fn(system, neighbor_list=False) for the all-pairs path.")
                idx = jnp.asarray(others)
            else:
                neighbors.refuse_overflowed(neighbor, f"the {name} energy")
                idx = jnp.asarray(neighbors.neighbor_idx(neighbor), jnp.int32)
            args = (positions, p, cell, idx) if species is None else (positions, p, cell, idx, jnp.asarray(species))
            (e,) = neighbors.nan_if_overflowed(neighbor, _checked_energy(user_fn(*args), name))
            return e

        return energy

    def __repr__(self):
        size = sum(int(np.size(v)) for v in self.params.values())
        sym = "" if self.symbols is None else f", symbols={self.symbols}"
        return (f"CustomPotential({self.name!r}, cutoff={self._cutoff:g}, {len(self._names)} leaves, "
                f"{size} parameters{sym})")


def _checked_cutoff(cutoff, name: str) -> float:
    if cutoff is None:
        raise PotentialError(
            f"{name}: give cutoff= (Å), the range beyond which a pair no longer changes the energy. "
            "mdsens allocates neighbor lists for it and keeps the pairs within it for derivatives; "
            "for a jax-md model it is the model's own cutoff (e.g. sym_kwargs['cutoff_distance'] "
            "of behler_parrinello, r_cutoff of graph_network).")
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise PotentialError(f"{name}: cutoff must be a number (Å); got {cutoff!r}.") from None
    if not (np.isfinite(value) and value > 0):
        raise PotentialError(f"{name}: cutoff must be positive and finite (Å); got {value}.")
    return value


def _checked_energy(e, name: str):
    """The energy as a float64 scalar, or a :class:`PotentialError` naming what is wrong.

    Shape and dtype are static, so they are checked on every trace; values only when
    concrete (inside ``jit`` a NaN reaches the relaxation's and derivatives' own checks).
    """
    e = jnp.asarray(e)
    if e.shape != ():
        raise PotentialError(
            f"{name}: the energy function must return a scalar total energy (eV); it returned "
            f"shape {e.shape}. Per-atom energies? Return their sum.")
    if e.dtype != jnp.float64:
        raise PotentialError(
            f"{name}: the energy function returned dtype {e.dtype}; mdsens needs float64 (derivatives "
            "of relaxed structures are differences of nearly equal numbers). Usual causes: float32 "
            "constants or weights inside the function (build them with jnp.float64), or a model "
            "initialized in float32 that was not converted.")
    if not isinstance(e, jax.core.Tracer) and not np.isfinite(float(e)):
        raise PotentialError(
            f"{name}: the energy function returned {float(e)}. Usual causes: two atoms at the same "
            "position (a norm or 1/r at r = 0; mask the empty slots and the self-pair), or "
            "parameters outside the function's range.")
    return e


def from_energy_fn(energy_fn: Callable, params, *, cutoff: Optional[float] = None,
                   symbols: Optional[Sequence[str]] = None, dims: Sequence[int] = (2, 3),
                   neighbor_list_min_atoms: int = DEFAULT_NEIGHBOR_LIST_MIN_ATOMS,
                   name: str = "custom potential") -> CustomPotential:
    """A potential from ``energy_fn(positions, params, cell, neighbor[, species]) -> eV``.

    Args:
      energy_fn: the energy, in the convention of the module docstring (Cartesian Å
        positions ``(N, d)``; your ``params`` pytree; ``cell`` rows or ``None``; ``(N, M)``
        neighbor indices with empty slots ``N``; ``species`` ``(N,)`` with ``symbols``).
      params: a pytree of floating-point arrays (converted to float64): the default
        parameters and the structure every later ``params=`` must have.
      cutoff: interaction range (Å), required (see the module docstring).
      symbols: species names; when given, the function receives ``species`` (indices into
        ``symbols``) and systems with other species raise :class:`~mdsens.SpeciesError`.
      dims: the spatial dimensions the function is defined in.
      neighbor_list_min_atoms: neighbor lists from this many atoms (else all pairs).
      name: for messages.

    Returns:
      :class:`CustomPotential`; ``pot.params`` is the flat dict (module docstring).

    Raises:
      PotentialError: missing or invalid ``cutoff``; ``energy_fn`` not callable.
      ParameterError: non-float leaves, NaN/inf values, leaf names that cannot be labels.
    """
    return CustomPotential(energy_fn, params, cutoff, symbols=symbols, dims=dims,
                           neighbor_list_min_atoms=neighbor_list_min_atoms, name=name)


def split_nnx(energy_fn):
    """``(apply, params)``: a jax-md NNX model as a pure function and its parameters.

    jax-md's network models (``energy.behler_parrinello_neighbor_list``,
    ``energy.graph_network_neighbor_list``, ...) keep their weights inside an
    ``nnx.Module`` (``energy_fn.model``). This takes them out, so that the model can be
    composed with other terms (a physical baseline, several networks) in one functional
    model for :func:`from_jax_md`.

    Args:
      energy_fn: the model's energy function (with ``.model``), or the module itself.

    Returns:
      ``apply(params, R, neighbor=None, **kwargs) -> energy``, the module's ``__call__`` with
      its ``nnx.Param`` leaves replaced by ``params``; and ``params``, those leaves as a
      nested dict of float64 arrays keyed like the module's attributes
      (``{"mlp": {"layers_0": {"kernel": (F, H), "bias": (H,)}, ...}}``). Other state
      (RNG counters, statistics) stays as it was.

    Raises:
      PotentialError: not an NNX model.
      ParameterError: ``apply`` called with a tree of another structure.
    """
    module = getattr(energy_fn, "model", energy_fn)
    from flax import nnx  # only here: flax is heavy and only jax-md's networks need it

    if not isinstance(module, nnx.Module):
        raise PotentialError(
            f"split_nnx needs a jax-md NNX model (an energy function with .model, an nnx.Module); got "
            f"{type(module).__name__}.")
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    paths_leaves, state_def = jax.tree_util.tree_flatten_with_path(state)

    def path_name(path):
        keys = [_key_name(k) for k in path]
        return "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)  # Param.value

    state_names = [path_name(p) for p, _ in paths_leaves]
    tree = {}
    for name, (_, leaf) in zip(state_names, paths_leaves):
        node = tree
        *parents, last = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = _float64_leaf(name, leaf)
    treedef = jax.tree_util.tree_structure(tree)
    names = _leaf_names([p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]])
    order = [names.index(n) for n in state_names]

    def apply(params, R, neighbor=None, **kwargs):
        if jax.tree_util.tree_structure(params) != treedef:
            raise ParameterError(f"the model's parameters must be shaped like {treedef}; got "
                                 f"{jax.tree_util.tree_structure(params)}.")
        leaves = jax.tree_util.tree_leaves(params)
        state_now = jax.tree_util.tree_unflatten(state_def, [leaves[i] for i in order])
        return nnx.merge(graphdef, state_now, rest)(R, neighbor, **kwargs)

    return apply, tree


def from_jax_md(model, params=None, *, cutoff: Optional[float] = None, mask_self: bool = True,
                dims: Sequence[int] = (3,), neighbor_list_min_atoms: int = DEFAULT_NEIGHBOR_LIST_MIN_ATOMS,
                name: str = "jax-md model") -> CustomPotential:
    """A potential from a jax-md energy model (neural networks included).

    Build the model with :func:`displacement` (``mdsens.potentials.displacement``) and
    ``format=partition.Dense``, e.g.::

        _, nn = energy.behler_parrinello_neighbor_list(
            ms.potentials.displacement, 1.0, key=jax.random.PRNGKey(0), mlp_sizes=(16,),
            sym_kwargs=dict(cutoff_distance=4.0), format=partition.Dense)
        pot = ms.potentials.from_jax_md(nn, cutoff=4.0)

    mdsens calls it as ``model(R, neighbor, **kw)`` with Cartesian ``R (N, d)`` (Å), a
    jax-md ``Dense`` ``NeighborList`` of its own (only ``idx`` and ``format`` are real:
    its ``neighbor_fn`` is never used) and ``kw = {"cell": cell}`` (rows, Å) for periodic
    systems, which jax-md passes on to the displacement. Species are whatever the model
    was built with (``species=``, ``nodes=``), in the system's atom order; mdsens does
    not check them. Caution (jax-md 0.2.29): ``behler_parrinello_neighbor_list`` with
    ``species=`` drops the keyword arguments in its angular terms, so a periodic system
    would get free-space angles there; with species, use it for free systems only.

    Args:
      model: one of
        * an NNX energy function (``energy_fn.model`` is an ``nnx.Module``: the
          ``*_neighbor_list`` models of jax-md ≥ 0.2.29), or the ``(neighbor_fn,
          energy_fn)`` pair they come in. Its ``nnx.Param`` leaves are the parameters,
          as a nested dict (``"mlp/layers_0/kernel"``), converted to float64;
        * a functional model ``energy_fn(params, R, neighbor, **kwargs)``, or the
          ``(neighbor_fn, init_fn, energy_fn)`` triple, with ``params`` given.
      params: the functional model's parameters (e.g. ``init_fn(key, R, neighbor)``);
        for an NNX model, optionally its parameters as the nested dict (default: the
        module's own).
      cutoff: the model's interaction range (Å), required: the neighbor-list cutoff it
        was built with (``sym_kwargs["cutoff_distance"]``, default 8.0 for
        Behler–Parrinello; ``r_cutoff`` for graph networks).
      mask_self: ``False`` for models whose lists list each atom as its own neighbor
        (jax-md's ``graph_network_neighbor_list`` builds its list with
        ``mask_self=False``, and its graph has the self edges): row ``i`` then starts
        with ``i``. Default ``True``: no self pairs, as jax-md's ``neighbor_list``.
      dims, neighbor_list_min_atoms, name: as :func:`from_energy_fn`.

    Returns:
      :class:`CustomPotential`.

    Raises:
      PotentialError: no ``cutoff``; a functional model without ``params``; a model
        built for ``Sparse`` lists; a non-scalar or non-float64 energy (when traced).
    """
    if isinstance(model, tuple):
        if len(model) not in (2, 3):
            raise PotentialError(
                f"{name}: a jax-md model tuple is (neighbor_fn, energy_fn) or (neighbor_fn, init_fn, "
                f"energy_fn); got {len(model)} items.")
        model = model[-1]
    if not callable(model):
        raise PotentialError(f"{name}: model must be a jax-md energy function; got {type(model).__name__}.")
    module = getattr(model, "model", None)
    if module is not None:
        if getattr(module, "format", partition.Dense) is not partition.Dense:
            raise PotentialError(
                f"{name}: the model was built for {module.format} neighbor lists; mdsens passes Dense "
                "ones. Build it with format=partition.Dense.")
        apply, own = split_nnx(module)
        params = own if params is None else params
    elif params is None:
        raise PotentialError(
            f"{name}: a functional jax-md model energy_fn(params, R, neighbor) needs its params "
            "(e.g. init_fn(key, R, neighbor)); pass params=.")
    else:
        apply = model

    def energy(positions, p, cell, idx):
        n = positions.shape[0]
        if not mask_self:
            idx = jnp.concatenate([jnp.arange(n, dtype=idx.dtype)[:, None], idx], axis=1)
        neighbor = partition.NeighborList(
            idx=idx, reference_position=positions,
            error=partition.PartitionError(jnp.zeros((), jnp.uint8)), cell_list_capacity=None,
            max_occupancy=int(idx.shape[1]), format=partition.Dense, cell_size=None, cell_list_fn=None,
            update_fn=None)
        kwargs = {} if cell is None else {"cell": cell}
        return apply(p, positions, neighbor, **kwargs)

    return CustomPotential(energy, params, cutoff, dims=dims, neighbor_list_min_atoms=neighbor_list_min_atoms,
                           name=name)
