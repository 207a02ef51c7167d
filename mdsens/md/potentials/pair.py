"""Shared machinery for isotropic pair potentials with per-species parameters.

A per-species parameter can be given as

* a scalar: the same for every pair (stored as a 0-d float64 array);
* an ``(S, S)`` symmetric matrix (stored as is; symmetrized inside the energy, so the
  gradient w.r.t. it is symmetric): species by index, or named by ``symbols=``;
* a dict ``{symbol: value}``: per-species values combined by the potential's mixing
  rule into an ``(S, S)`` matrix (``symbols`` are the dict keys, in order).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from mdsens.md.potentials.base import ParameterError, Potential, pair_table, safe_norm

MIXING_RULES = {
    "arithmetic": lambda a, b: 0.5 * (a + b),
    "geometric": lambda a, b: np.sqrt(a * b),
}


def resolve_species_params(name: str, values: dict, mixing: dict, symbols: Optional[tuple]):
    """Turn user inputs into float64 arrays, plus the species names and table size.

    Args:
      name: potential name for messages.
      values: ``{param_name: scalar | (S, S) matrix | {symbol: value}}``.
      mixing: ``{param_name: "arithmetic" | "geometric"}`` for dict inputs.
      symbols: species names, or ``None``.

    Returns:
      ``(params, symbols, n_species)``; ``n_species`` is ``None`` if all are scalars.

    Raises:
      ParameterError: inconsistent species, non-square/asymmetric matrices, NaN/inf.
    """
    dict_keys = [tuple(v.keys()) for v in values.values() if isinstance(v, dict)]
    if dict_keys:
        keys = dict_keys[0]
        if any(set(k) != set(keys) for k in dict_keys):
            raise ParameterError(
                f"{name}: per-species dicts must name the same species; got {dict_keys}."
            )
        if symbols is None:
            symbols = tuple(keys)
        elif set(symbols) != set(keys):
            raise ParameterError(
                f"{name}: symbols={tuple(symbols)} but per-species dicts name {keys}."
            )
    symbols = None if symbols is None else tuple(str(s) for s in symbols)
    params = {}
    n_species = None if symbols is None else len(symbols)
    for key, value in values.items():
        if isinstance(value, dict):
            vec = np.array([float(value[s]) for s in symbols], dtype=np.float64)
            rule = MIXING_RULES[mixing[key]]
            arr = rule(vec[:, None], vec[None, :])
        else:
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim == 2:
                if arr.shape[0] != arr.shape[1]:
                    raise ParameterError(f"{name}: {key} matrix must be square; got {arr.shape}.")
                if not np.allclose(arr, arr.T, rtol=1e-12, atol=0):
                    raise ParameterError(
                        f"{name}: {key} matrix must be symmetric (pair parameters "
                        f"are the same for i-j and j-i); got {arr.tolist()}."
                    )
                if n_species is None:
                    n_species = arr.shape[0]
                elif n_species != arr.shape[0]:
                    raise ParameterError(
                        f"{name}: {key} is {arr.shape} but the potential has {n_species} "
                        f"species{'' if symbols is None else ' ' + str(symbols)}."
                    )
            elif arr.ndim != 0:
                raise ParameterError(
                    f"{name}: {key} must be a scalar, an (S, S) matrix or a {{symbol: value}} "
                    f"dict; got shape {arr.shape}."
                )
        if not np.all(np.isfinite(arr)):
            raise ParameterError(f"{name}: {key} contains NaN or inf: {arr.tolist()}.")
        params[key] = jnp.asarray(arr, dtype=jnp.float64)
    if symbols is not None and n_species is None:
        n_species = len(symbols)
    return params, symbols, n_species


class PairPotential(Potential):
    """``E = ½ Σ_i Σ_{j≠i} u(r_ij; p_{s_i s_j})`` over minimum-image pairs.

    Subclasses set ``pair_keys`` (the per-species params) and implement
    ``pair_energy(r, pp, params)`` returning ``u`` (zero beyond the cutoff) for pair
    distances ``r (N, M)`` and per-pair parameters ``pp`` (each ``(N, M)`` or scalar).
    """

    pair_keys: tuple = ()
    pairwise = True

    def pair_energy(self, r, pp, params):
        raise NotImplementedError

    def _local_energy(self, params, dR, mask, species_i, species_j):
        r = safe_norm(dR, mask)
        pp = {k: pair_table(params[k], species_i, species_j) for k in self.pair_keys}
        u = self.pair_energy(r, pp, params)
        return 0.5 * jnp.sum(jnp.where(mask, u, 0.0))

    def pair_values(self, r, params=None, species=(0, 0)):
        """``u(r)`` for one species pair, ``r`` any shape (Å) -> eV; for plots and tests."""
        params = self._validate_params(self.params if params is None else params)
        r = jnp.asarray(r, jnp.float64)
        si = jnp.full((1,), species[0], jnp.int32)
        sj = jnp.full((1, 1), species[1], jnp.int32)
        pp = {k: jnp.reshape(pair_table(params[k], si, sj), ()) for k in self.pair_keys}
        return self.pair_energy(r, pp, params)

    def __repr__(self):
        items = ", ".join(f"{k}={np.asarray(v).tolist()}" for k, v in self.params.items())
        sym = "" if self.symbols is None else f", symbols={self.symbols}"
        return f"{type(self).__name__}({items}{sym})"
