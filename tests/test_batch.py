"""Batches of one layout relax as one program, sharded over devices (jax.sharding).

Run in a subprocess with four host devices (XLA_FLAGS must be set before JAX starts).
Truths: each structure relaxed alone by ms.relax; the exact LJ laws x* ∝ σ and
dE*/dε = E*/ε (cutoff tied to σ).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import mdsens as ms

    assert len(jax.devices()) == 4
    start = ms.read(ms.data.path("lj13_ar.xyz"))
    rng = np.random.default_rng(0)
    systems = [start.replace(positions=start.positions + rng.normal(scale=0.05, size=(13, 3))) for _ in range(6)]
    pot = ms.potentials.LennardJones(sigma=3.4, epsilon=0.0104)

    out = ms.relax_batch(systems, pot, fmax=1e-10)                       # 6 structures, padded to 8
    assert bool(np.all(out.converged)) and out.positions.shape == (6, 13, 3)
    for k in (0, 5):
        alone = ms.relax(systems[k], pot, fmax=1e-10)
        assert abs(float(alone.energy) - float(out.energy[k])) < 1e-12 * abs(float(alone.energy))
        assert float(jnp.max(jnp.abs(alone.system.positions - out.positions[k]))) < 1e-9

    eight = ms.relax_batch(systems + systems[:2], pot, fmax=1e-10)      # no padding: stays sharded
    assert len(eight.positions.sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(eight.energy[:6]), np.asarray(out.energy), rtol=1e-12)

    # one parameter set per structure: x* scales with σ exactly
    sigmas = [3.0, 3.4, 3.8, 4.2]
    scaled = [start.replace(positions=start.positions * s / 3.4) for s in sigmas]
    per = ms.relax_batch(scaled, pot, params=[{**pot.params, "sigma": s} for s in sigmas], fmax=1e-10)
    ref = np.asarray(per.positions[1]) - np.asarray(per.positions[1]).mean(0)
    for k, s in enumerate(sigmas):
        r = np.asarray(per.positions[k]) - np.asarray(per.positions[k]).mean(0)
        gram = lambda x: x @ x.T
        np.testing.assert_allclose(gram(r), gram(ref) * (s / 3.4) ** 2, rtol=1e-8, atol=1e-8)

    # reverse mode through the sharded batch: d(sum E*)/dε = sum E*/ε
    total = lambda eps: ms.relax_batch(systems, pot, params={**pot.params, "epsilon": eps}, fmax=1e-10).energy.sum()
    g = jax.grad(total)(pot.params["epsilon"])
    assert abs(float(g) - float(out.energy.sum()) / 0.0104) < 1e-8 * abs(float(g)), (float(g),)
    print("batch ok")
''')


def test_relax_batch_sharded_over_four_host_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "batch ok" in proc.stdout, proc.stderr[-4000:]


def test_relax_batch_refuses_mixed_layouts():
    import numpy as np
    import pytest

    import mdsens as ms

    a = ms.System(np.zeros((2, 3)) + [[0, 0, 0], [1.2, 0, 0]])
    b = ms.System(np.zeros((3, 3)) + [[0, 0, 0], [1.2, 0, 0], [0, 1.2, 0]])
    with pytest.raises(ms.StructureError, match="one layout"):
        ms.relax_batch([a, b], ms.potentials.LennardJones())
    with pytest.raises(ms.OptionError, match="parameter sets"):
        ms.relax_batch([a, a], ms.potentials.LennardJones(), params=[ms.potentials.LennardJones().params])
