"""Morse pair potential in ASE's convention (``ase.calculators.morse.MorsePotential``).

    u(r) = ε [e^{−2ρ₀(r/r₀ − 1)} − 2 e^{−ρ₀(r/r₀ − 1)}] · f_c(r)

with ε the well depth (eV), r₀ the minimum (Å), ρ₀ the dimensionless stiffness
(force constant 2ε(ρ₀/r₀)²), and ASE's C² quintic smooth-step cutoff

    s = 1 − (r − r₁)/(r₂ − r₁),  f_c = 1 (s ≥ 1), 6s⁵ − 15s⁴ + 10s³ (0 < s < 1), 0 (s ≤ 0)

between r₁ = rcut1·r₀ and r₂ = rcut2·r₀ (cutoffs relative to r₀, as in ASE, so they move
with r₀). ASE defaults: ε = 1, ρ₀ = 6, r₀ = 1, rcut1 = 1.9, rcut2 = 2.7.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mdsens.md.potentials.base import ParameterError
from mdsens.md.potentials.pair import PairPotential, resolve_species_params


def quintic_cutoff(r, r1, r2):
    """ASE's ``fcut``: 1 below r1, 0 above r2, C² smooth-step in between."""
    s = 1.0 - (r - r1) / (r2 - r1)
    inner = 6.0 * s**5 - 15.0 * s**4 + 10.0 * s**3
    return jnp.where(s >= 1.0, 1.0, jnp.where(s > 0.0, inner, 0.0))


class Morse(PairPotential):
    """Morse potential, ASE conventions; Å and eV.

    Args:
      epsilon: well depth ε (eV): scalar, ``(S, S)`` matrix or ``{symbol: ε}``
        (geometric mean). Default 1.0.
      r0: equilibrium distance r₀ (Å): scalar, matrix or ``{symbol: r₀}`` (arithmetic
        mean). Default 1.0.
      rho0: stiffness ρ₀ (dimensionless): scalar, matrix or ``{symbol: ρ₀}``
        (arithmetic mean). Default 6.0.
      rcut1, rcut2: smooth-cutoff start and end in units of r₀ (scalars, dimensionless,
        ``0 < rcut1 < rcut2``). Defaults 1.9 and 2.7 (ASE's).
      symbols: species names for matrix parameters.

    ``params``: ``epsilon``, ``r0``, ``rho0``, ``rcut1``, ``rcut2`` (float64).
    Interaction range: ``rcut2 · max r₀``.
    """

    pair_keys = ("epsilon", "r0", "rho0")
    name = "Morse"
    ranges = {"epsilon": (0.0, None, True), "r0": (0.0, None, True), "rho0": (0.0, None, True),
              "rcut1": (0.0, None, True)}

    def __init__(self, epsilon=1.0, r0=1.0, rho0=6.0, rcut1=1.9, rcut2=2.7, *, symbols=None):
        params, self.symbols, self.n_species = resolve_species_params(
            self.name,
            {"epsilon": epsilon, "r0": r0, "rho0": rho0},
            {"epsilon": "geometric", "r0": "arithmetic", "rho0": "arithmetic"},
            symbols,
        )
        params["rcut1"] = jnp.asarray(float(rcut1), jnp.float64)
        params["rcut2"] = jnp.asarray(float(rcut2), jnp.float64)
        self.params = params
        self._validate_params(params)

    def _check_values(self, params):
        if not float(params["rcut1"]) < float(params["rcut2"]):
            raise ParameterError(
                f"Morse: need 0 < rcut1 < rcut2; got rcut1={float(params['rcut1'])}, "
                f"rcut2={float(params['rcut2'])}."
            )

    def cutoff(self, params=None) -> float:
        params = self.params if params is None else params
        return float(params["rcut2"]) * float(np.max(np.asarray(params["r0"])))

    def pair_energy(self, r, pp, params):
        epsilon, r0, rho0 = pp["epsilon"], pp["r0"], pp["rho0"]
        expf = jnp.exp(rho0 * (1.0 - r / r0))
        fc = quintic_cutoff(r, params["rcut1"] * r0, params["rcut2"] * r0)
        return epsilon * expf * (expf - 2.0) * fc
