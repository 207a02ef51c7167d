"""``ms.relax_batch``: many structures of one layout relaxed as one program, sharded.

Ensembles (random initial conditions), fitting sets and parameter scans relax a batch of
structures that share a layout (N, species, pbc). ``relax_batch`` runs them as one
compiled program: the on-device relaxation of ``ms.relax`` (the traced path: dense
energy, the pure minimizer, the rigid modes as null space) vmapped over the batch. With
several local devices the batch axis is sharded across all of them with
``jax.sharding`` (a ``NamedSharding`` over a one-axis ``Mesh``); the batch is padded to a
multiple of the device count and the padding dropped. Across hosts, initialize
``jax.distributed`` first: ``jax.devices()`` then spans them and the same code shards
over all.

The result is differentiable exactly like ``ms.relax`` (implicit differentiation per
structure, forward and reverse mode), so ``jax.grad`` of a loss summed over the batch
costs one adjoint solve per structure, all in the same program.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mdsens.errors import OptionError
from mdsens.md import cache
from mdsens.md.driver import DEFAULT_FMAX, DEFAULT_MAX_STEPS
from mdsens.md.errors import StructureError
from mdsens.md.options import DEFAULT_MINIMIZER, as_minimizer
from mdsens.md.progress import Stages, traced_progress
from mdsens.md.relaxation import make_relax
from mdsens.md.system import System

__all__ = ["BatchRelaxResult", "relax_batch"]


class BatchRelaxResult(NamedTuple):
    """Result of :func:`relax_batch`: arrays with a leading batch axis ``B``.

    Attributes:
      positions: ``(B, N, d)`` relaxed positions (Å).
      cells: ``(B, d, d)`` cells (the inputs'; ``None`` for free systems).
      energy: ``(B,)`` (eV); forces: ``(B, N, d)`` (eV/Å); stress: ``(B, n_voigt)``
        (ASE sign, eV/Å³) or ``None``.
      fmax, steps, converged: ``(B,)`` diagnostics (no derivative).
      template: a ``System`` of the layout (species, symbols, pbc).
    """

    positions: jax.Array
    cells: Optional[jax.Array]
    energy: jax.Array
    forces: jax.Array
    stress: Optional[jax.Array]
    fmax: jax.Array
    steps: jax.Array
    converged: jax.Array
    template: System

    @property
    def systems(self) -> list:
        """The relaxed structures as ``System`` objects (host)."""
        cells = [None] * len(self.positions) if self.cells is None else list(self.cells)
        return [self.template.replace(positions=R, cell=C) for R, C in zip(self.positions, cells)]


def _stacked(systems: Sequence[System]):
    systems = list(systems)
    if not systems or not all(isinstance(s, System) for s in systems):
        raise StructureError("relax_batch needs a non-empty sequence of ms.System of one layout.")
    template = systems[0]
    key = cache.layout_key(template)
    for k, s in enumerate(systems):
        if cache.layout_key(s) != key:
            raise StructureError(
                f"relax_batch needs structures of one layout (N, dimension, pbc, species order); structure "
                f"{k} is {s!r} with another layout than {template!r}. Relax different layouts in separate batches."
            )
    R = jnp.stack([s.positions for s in systems])
    C = None if not template.pbc else jnp.stack([s.cell for s in systems])
    return template, R, C


def _batched_params(pot, template, params, size):
    """``(params, batched)``: one shared pytree, or a list of ``size`` stacked on axis 0."""
    if params is None or isinstance(params, dict):
        return pot.check(template, pot.params if params is None else params), False
    params = list(params)
    if len(params) != size:
        raise OptionError(f"relax_batch got {len(params)} parameter sets for {size} structures; give one "
                          "shared dict, or one dict per structure.")
    checked = [pot.check(template, p) for p in params]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *checked), True


def _padded(tree, size):
    """Pad every leaf's batch axis to ``size`` by repeating its last entry."""
    def pad(x):
        extra = size - x.shape[0]
        return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])

    return jax.tree_util.tree_map(pad, tree)


def relax_batch(systems: Sequence[System], pot, *, params=None, fmax: float = DEFAULT_FMAX,
                max_steps: int = DEFAULT_MAX_STEPS, minimizer=DEFAULT_MINIMIZER, solve=None,
                on_failure: str = "raise", devices: Optional[Sequence] = None,
                progress: Optional[bool] = None) -> BatchRelaxResult:
    """Relax structures of one layout as one program, sharded over ``devices``.

    Args:
      systems: ``B`` structures with the same N, species order and boundary conditions.
      pot: the potential.
      params: ``None`` (``pot.params`` for all), one params dict shared by all, or a list
        of ``B`` params dicts (one per structure).
      fmax, max_steps, minimizer, solve, on_failure: as :func:`mdsens.relax`.
      devices: devices to shard the batch over (default ``jax.devices()``: all local
        devices, or all devices of a ``jax.distributed`` run).
      progress: show a bar on stderr (the whole batch is one program, so it says
        "relaxing B structures" until all are done, not per structure); default:
        when stderr is a terminal. Off under jit/vmap, where ``True`` raises
        :class:`~mdsens.OptionError`.

    Returns:
      :class:`BatchRelaxResult`, differentiable w.r.t. ``params`` (and the cells) like
      ``ms.relax``. Energies are dense (all pairs): neighbor lists are built on the host,
      one structure at a time, so batches are meant for up to a few thousand atoms.

    Warns:
      NotConvergedWarning: some structures did not converge (their ``converged`` is False).
    """
    template, R, C = _stacked(systems)
    size = R.shape[0]
    progress = traced_progress(progress, (R, C, params, fmax, max_steps), "ms.relax_batch")
    with Stages(progress, f"relax_batch B={size} N={template.n_atoms}", 1) as stages:
        outputs = _relaxed(template, R, C, size, pot, params, fmax, max_steps, minimizer, solve, on_failure,
                           devices, stages)
    return BatchRelaxResult(*outputs, template)


def _relaxed(template, R, C, size, pot, params, fmax, max_steps, minimizer, solve, on_failure, devices, stages):
    """The outputs of :class:`BatchRelaxResult` but ``template``: the batch as one program."""
    params, batched = _batched_params(pot, template, params, size)
    minimizer = as_minimizer(minimizer)
    devices = list(jax.devices() if devices is None else devices)
    relax_fn = cache.memoized(
        ("relax_batch", pot.cache_key(), cache.layout_key(template), minimizer, cache.hashable(solve), on_failure),
        lambda: make_relax(pot, template, minimizer=minimizer, neighbor_list=False, solve=solve, stability=False,
                           on_failure=on_failure))

    def one(R, C, p, fmax, max_steps):
        r = relax_fn(template.replace(positions=R, cell=C), p, fmax=fmax, max_steps=max_steps)
        return r.system.positions, r.energy, r.forces, r.stress, r.fmax, r.steps, r.converged

    run = cache.memoized(
        ("relax_batch_program", pot.cache_key(), cache.layout_key(template), minimizer, cache.hashable(solve),
         on_failure, batched),
        lambda: jax.jit(jax.vmap(one, in_axes=(0, None if C is None else 0, 0 if batched else None, None, None))))
    inputs = (R, C, params)
    padded = -(-size // len(devices)) * len(devices)
    if len(devices) > 1:
        sharded = NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))
        R, C = _padded((R, C), padded)
        R = jax.device_put(R, sharded)
        C = None if C is None else jax.device_put(C, sharded)
        if batched:
            params = jax.device_put(_padded(params, padded), sharded)
        inputs = (R, C, params)
    # one program for the whole batch: nothing to report between structures
    stages.start(f"relaxing {size} structure{'s' if size != 1 else ''} (one program)")
    positions, energy, forces, stress, fmax_out, steps, converged = run(*inputs, fmax, max_steps)
    if stages.shown:  # end the stage when the program does (without a bar, stay asynchronous)
        jax.block_until_ready(positions)
    outputs = (positions, inputs[1], energy, forces, stress, fmax_out, steps, converged)
    if padded != size:  # drop the padding (the results of the repeated last structure)
        outputs = jax.tree_util.tree_map(lambda x: x[:size], outputs)
    return outputs
