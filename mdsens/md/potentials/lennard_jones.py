"""Lennard-Jones with ASE's smooth cutoff (``ase.calculators.lj.LennardJones(smooth=True)``).

    u(r) = 4 ε [(σ/r)¹² − (σ/r)⁶] · S(r²),

    S = 1                                                for r² < r_o²
    S = (r_c² − r²)² (r_c² + 2r² − 3r_o²) / (r_c² − r_o²)³  for r_o² ≤ r² < r_c²
    S = 0                                                for r ≥ r_c

This is ASE's ``cutoff_function`` (itself jax-md's ``multiplicative_isotropic_cutoff``,
after HOOMD-blue): the energy is *multiplied* by S, not shifted (ASE shifts only with
``smooth=False``), so energy and force are continuous at r_c. ASE's defaults
``rc = 3σ`` and ``ro = 0.66 rc`` are kept.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from mdsens.md.potentials.base import ParameterError
from mdsens.md.potentials.pair import PairPotential, resolve_species_params

#: ASE's defaults: rc = 3 σ, ro = 0.66 rc.
DEFAULT_CUTOFF_OVER_SIGMA = 3.0
DEFAULT_ONSET_OVER_CUTOFF = 0.66


def smooth_cutoff(r2, rc2, ro2):
    """ASE/jax-md multiplicative cutoff ``S`` on squared distances (C¹ at ro and rc)."""
    poly = (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, jnp.where(r2 < rc2, poly, 0.0))


class LennardJones(PairPotential):
    """Lennard-Jones 12-6 with ASE's smooth cutoff; Å and eV (or reduced units).

    Args:
      sigma: zero-crossing distance σ (Å): scalar, ``(S, S)`` matrix, or
        ``{symbol: σ}`` (Lorentz–Berthelot: arithmetic mean). Default 1.0 (ASE's).
      epsilon: well depth ε (eV): scalar, matrix or ``{symbol: ε}`` (geometric mean).
        Default 1.0 (ASE's).
      r_cutoff: cutoff r_c (Å), ASE's ``rc``. ``None`` (default): ``3 σ_ij``, *tied to
        σ at call time* (equal to ASE's default value, and it keeps the exact scaling
        laws E* ∝ ε, x* ∝ σ under differentiation). A number: fixed, stored in
        ``params["r_cutoff"]``.
      r_onset: onset r_o of the smooth cutoff (Å), ASE's ``ro``. ``None``:
        ``0.66 r_c`` (ASE's default). Must satisfy ``0 <= r_onset < r_cutoff``.
      symbols: species names for matrix parameters (e.g. ``("Ar", "Kr")``); default
        from dict keys, else species by index.

    ``params``: ``sigma``, ``epsilon`` (and ``r_cutoff``, ``r_onset`` if fixed), float64.

    Example (argon, ASE equivalent ``LennardJones(sigma=3.4, epsilon=0.0104, rc=10.2,
    smooth=True)``)::

        pot = LennardJones(sigma=3.4, epsilon=0.0104)
    """

    pair_keys = ("sigma", "epsilon")
    name = "LennardJones"
    ranges = {"sigma": (0.0, None, True), "epsilon": (0.0, None, True), "r_cutoff": (0.0, None, True),
              "r_onset": (0.0, None, False)}

    def __init__(
        self,
        sigma=1.0,
        epsilon=1.0,
        r_cutoff: Optional[float] = None,
        r_onset: Optional[float] = None,
        *,
        symbols=None,
    ):
        params, self.symbols, self.n_species = resolve_species_params(
            self.name,
            {"sigma": sigma, "epsilon": epsilon},
            {"sigma": "arithmetic", "epsilon": "geometric"},
            symbols,
        )
        if r_cutoff is None and r_onset is not None:
            # ASE: rc defaults to 3σ (a number fixed at construction), ro given.
            r_cutoff = DEFAULT_CUTOFF_OVER_SIGMA * float(np.max(params["sigma"]))
        self.tied_cutoff = r_cutoff is None
        if not self.tied_cutoff:
            if r_onset is None:
                r_onset = DEFAULT_ONSET_OVER_CUTOFF * float(r_cutoff)
            params["r_cutoff"] = jnp.asarray(float(r_cutoff), jnp.float64)
            params["r_onset"] = jnp.asarray(float(r_onset), jnp.float64)
        self.params = params
        self._validate_params(params)

    def _check_values(self, params):
        if not self.tied_cutoff and not float(params["r_onset"]) < float(params["r_cutoff"]):
            raise ParameterError(
                f"LennardJones: need 0 <= r_onset < r_cutoff; got r_onset={float(params['r_onset'])}, "
                f"r_cutoff={float(params['r_cutoff'])}."
            )

    def _cutoffs(self, sigma_ij, params):
        if self.tied_cutoff:
            rc = DEFAULT_CUTOFF_OVER_SIGMA * sigma_ij
            return rc, DEFAULT_ONSET_OVER_CUTOFF * rc
        return params["r_cutoff"], params["r_onset"]

    def cutoff(self, params=None) -> float:
        params = self.params if params is None else params
        if self.tied_cutoff:
            return DEFAULT_CUTOFF_OVER_SIGMA * float(np.max(np.asarray(params["sigma"])))
        return float(params["r_cutoff"])

    def pair_energy(self, r, pp, params):
        sigma, epsilon = pp["sigma"], pp["epsilon"]
        rc, ro = self._cutoffs(sigma, params)
        r2 = r * r
        c6 = (sigma * sigma / r2) ** 3
        lj = 4.0 * epsilon * (c6 * c6 - c6)
        return lj * smooth_cutoff(r2, rc * rc, ro * ro)
