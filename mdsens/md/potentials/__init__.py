"""Parameterized potentials on jax-md (see `base.Potential` for the contract)."""

from mdsens.md.potentials.base import Potential
