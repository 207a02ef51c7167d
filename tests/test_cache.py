"""The simple calls reuse compiled programs across calls; a hit changes no number.

Truths: the exact LJ scaling law r* = 2^(1/6) σ (cutoff tied to σ), so d r*/dσ = 2^(1/6),
and dE*/dε = E*/ε.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens as ms
from mdsens.md import cache

TIED = 2 ** (1 / 6)


def _dimer():
    return ms.System(np.array([[0.0, 0.0, 0.0], [1.3, 0.0, 0.0]]))


def _bond(result):
    R = np.asarray(result.system.positions)
    return float(np.linalg.norm(R[1] - R[0]))


def test_second_calls_hit_the_cache_and_use_their_own_parameters():
    cache.clear()
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)
    first = ms.relax(_dimer(), pot, fmax=1e-10)
    assert cache.info() == {"entries": 1, "hits": 0, "misses": 1}
    assert _bond(first) == pytest.approx(TIED, rel=1e-8)
    # new parameter values, and a new potential object with other defaults: same program
    second = ms.relax(_dimer(), pot, params={**pot.params, "sigma": np.asarray(1.1)}, fmax=1e-10)
    other = ms.potentials.LennardJones(sigma=1.2, epsilon=2.0)
    third = ms.relax(_dimer(), other, fmax=1e-10)
    assert cache.info()["hits"] == 2 and cache.info()["misses"] == 1
    assert _bond(second) == pytest.approx(1.1 * TIED, rel=1e-8)
    assert _bond(third) == pytest.approx(1.2 * TIED, rel=1e-8)
    assert float(third.energy) == pytest.approx(-2.0, rel=1e-8)  # one pair at the minimum: −ε
    # another static description (a fixed cutoff) is another program
    ms.relax(_dimer(), ms.potentials.LennardJones(sigma=1.0, r_cutoff=3.0, r_onset=2.5), fmax=1e-10)
    assert cache.info()["misses"] == 2

    for pot_, result in ((pot, first), (other, third)):
        s = ms.sensitivity(result, pot_, wrt="epsilon")
        eps = float(pot_.params["epsilon"])
        assert float(s.denergy[0]) == pytest.approx(float(result.energy) / eps, rel=1e-9)
    assert cache.info()["misses"] == 3  # one sensitivity program for both


def test_the_cache_is_bounded():
    cache.clear()
    for k in range(cache.MAX_ENTRIES + 3):
        cache.memoized(("test", k), lambda: object())
    assert cache.info()["entries"] == cache.MAX_ENTRIES
    cache.clear()
    assert cache.info() == {"entries": 0, "hits": 0, "misses": 0}


def _compilations(caplog, fn):
    """``fn()`` and the number of XLA compilations it triggered."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        out = jax.block_until_ready(fn())
    return out, sum("Compiling" in r.getMessage() for r in caplog.records)


def test_gradients_through_relax_compile_once(caplog):
    """``jax.grad`` around ``ms.relax`` (a host solver): the implicit tangent and its
    transpose are compiled on the first call only, and every call's gradient is the
    closed form d r*/dσ = 2^(1/6)."""
    pot = ms.potentials.LennardJones(sigma=1.0, epsilon=1.0)

    def bond(sigma):
        R = ms.relax(_dimer(), pot, params={**pot.params, "sigma": sigma}, fmax=1e-11).system.positions
        return jnp.linalg.norm(R[1] - R[0])

    grad = jax.grad(bond)
    first, _ = _compilations(caplog, lambda: grad(jnp.asarray(1.0)))
    for sigma in (1.05, 0.95):
        g, compiled = _compilations(caplog, lambda: grad(jnp.asarray(sigma)))
        assert compiled == 0, [r.getMessage()[:120] for r in caplog.records if "Compiling" in r.getMessage()]
        assert float(g) == pytest.approx(TIED, rel=1e-8)
    assert float(first) == pytest.approx(TIED, rel=1e-8)
