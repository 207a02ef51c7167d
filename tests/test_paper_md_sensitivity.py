"""The paper's molecular-dynamics setting (Blondel et al. 2022, §4; jax-md's bubble raft).

A 2D periodic binary soft-sphere packing, half of diameter D (A), half of diameter 1 (B),
σ_AB = (1 + D)/2, ε = 1, α = 2, packing fraction 0.98, relaxed with FIRE; dR*/dD with the
box fixed (D through σ_AA and σ_AB) and with the box side following D at fixed packing
fraction, L(D) = sqrt(N π (1 + D²) / 8 / φ). Truths independent of the code under test:

* a dense pseudo-inverse, −H⁺ ∂(∇_R E)/∂D, with H from ``jax.hessian`` at R*;
* central finite differences of FIRE re-relaxations at D ± h;
* forward against reverse mode: ⟨u, J v⟩ from ``ms.sensitivity`` (jvp) equals the one from
  ``ms.observable_gradient`` (vjp).

Derivatives are compared modulo the translational zero mode (all re-centred). The
example script runs as a subprocess in the slow suite (its cost is compilation).
"""

import functools
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import mdsens as ms  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402
from mdsens import plot  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "paper_md_sensitivity.py"

N = 16  # small: the cost of these tests is compilation, not N
DIAMETER = 0.6
PACKING_FRACTION = 0.98
SIGMA_TANGENT = np.array([[1.0, 0.5], [0.5, 0.0]])  # dσ/dD
FMAX = 1e-12
H_FD = 1e-6  # FD truncation error ~h² dominates above (measured 1e-5 at h = 1e-5, N = 128)
DLOG_L = DIAMETER / (1 + DIAMETER**2)  # d ln L/dD


def box_side(d):
    return jnp.sqrt(N * jnp.pi * (1 + d**2) / 8 / PACKING_FRACTION)


def sigma_of(d):
    return jnp.array([[d, (1 + d) / 2], [(1 + d) / 2, 1.0]], dtype=jnp.float64)


def recentred(x):
    x = np.asarray(x)
    return x - x.mean(axis=0)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


PROBE = recentred(np.random.default_rng(1).normal(size=(N, 2)))  # centred: blind to the gauge


@functools.lru_cache(maxsize=None)
def relaxed_packing():
    """``(relax_fn, result, pot)``: the packing relaxed with FIRE from uniform random positions."""
    side = float(box_side(DIAMETER))
    positions = np.random.default_rng(0).uniform(size=(N, 2)) * side
    system = ms.System(positions=positions, cell=side * np.eye(2), species=np.repeat([0, 1], N // 2),
                       symbols=("A", "B"), pbc=True)
    pot = ms.potentials.SoftSphere(sigma=np.asarray(sigma_of(DIAMETER)), epsilon=1.0, alpha=2.0,
                                   symbols=("A", "B"))
    relax_fn = ms.make_relax(pot, system, minimizer=ms.FIRE())
    result = relax_fn(system, fmax=FMAX, max_steps=200_000)
    assert result.converged and result.fmax < FMAX
    return relax_fn, result, pot


def directions(pot):
    """Tangents in parameter space: ``"D"`` is dσ/dD; ``"D, scaled"`` is dσ/dD − σ d ln L/dD.

    The soft-sphere energy depends on lengths only through r/σ, so E(sR; sσ, sL) = E(R; σ, L)
    and R*(σ, L) = (L/L₀) R*(σ L₀/L, L₀): with the box following D,
    dR*/dD = (d ln L/dD) R* + [fixed-box response along "D, scaled"], modulo a translation.
    """
    fixed = {k: np.zeros(np.shape(v)) for k, v in pot.params.items()}
    fixed["sigma"] = SIGMA_TANGENT
    scaled = dict(fixed, sigma=SIGMA_TANGENT - DLOG_L * np.asarray(pot.params["sigma"]))
    return {"D": fixed, "D, scaled": scaled}


def translation_blind_probe(R, params, cell):
    """⟨u, R⟩ for a fixed centred u: the reverse-mode probe (one function, one compilation)."""
    return jnp.vdot(PROBE, R)


@functools.lru_cache(maxsize=None)
def dense_reference():
    """``(fixed_box, box_following, eigenvalues)`` from a dense pseudo-inverse of the Hessian."""
    _, result, pot = relaxed_packing()
    s = result.system
    energy = pot.energy_fn(s, neighbor_list=False)

    def gradient(d, follow):
        cell = s.cell * (box_side(d) / box_side(DIAMETER) if follow else 1.0)
        return jax.grad(energy)(s.positions, dict(pot.params, sigma=sigma_of(d)), cell)

    @jax.jit
    def pieces(d):
        H = jax.hessian(energy)(s.positions, dict(pot.params, sigma=sigma_of(d)), s.cell).reshape(2 * N, 2 * N)
        return H, [jax.jacfwd(lambda x: gradient(x, f))(d).ravel() for f in (False, True)]

    H, (b_fixed, b_follow) = pieces(jnp.float64(DIAMETER))
    H = np.asarray(H)
    H_pinv = np.linalg.pinv(H, rcond=1e-10, hermitian=True)
    return ((-H_pinv @ np.asarray(b_fixed)).reshape(N, 2), (-H_pinv @ np.asarray(b_follow)).reshape(N, 2),
            np.linalg.eigvalsh(H))


def finite_difference(follow):
    """Central differences of FIRE re-relaxations at D ± h (box rescaled when ``follow``)."""
    relax_fn, result, pot = relaxed_packing()
    s = result.system
    cell0 = np.asarray(s.cell)
    frac = np.asarray(s.positions) @ np.linalg.inv(cell0)
    ends = []
    for d in (DIAMETER + H_FD, DIAMETER - H_FD):
        cell = cell0 * (float(box_side(d) / box_side(DIAMETER)) if follow else 1.0)
        r = relax_fn(s.replace(positions=frac @ cell, cell=cell), params=dict(pot.params, sigma=sigma_of(d)),
                     fmax=FMAX / 10, max_steps=200_000)
        assert r.converged
        shift = np.asarray(r.system.positions) @ np.linalg.inv(cell) - frac
        ends.append((frac + shift - np.round(shift)) @ cell)  # the image nearest R*
    return recentred((ends[0] - ends[1]) / (2 * H_FD))


def test_no_soft_modes_beyond_translations():
    """At φ = 0.98 the packing is far above jamming: only the two translations are zero
    modes, so the rigid modes are the whole null space (``stability=False`` below is exact)."""
    *_, eigenvalues = dense_reference()
    zero = np.abs(eigenvalues) <= 1e-10 * eigenvalues.max()
    assert zero.sum() == 2 and eigenvalues[~zero].min() > 1e-4 * eigenvalues.max()


def test_dR_dD_matches_pseudo_inverse_fd_and_reverse_mode():
    """Fixed box, and box following D through the scaling identity (one implicit call)."""
    _, result, pot = relaxed_packing()
    tangents = directions(pot)
    sens = ms.sensitivity(result, pot, wrt=tangents, stability=False)
    fixed, scaled = sens.dpositions
    np.testing.assert_allclose(fixed.sum(axis=0), 0.0, atol=1e-10)  # the gauge: no net translation
    following = recentred(scaled + DLOG_L * np.asarray(result.system.positions))

    dense_fixed, dense_following, _ = dense_reference()
    assert rel(fixed, dense_fixed) < 1e-8  # measured ~1e-12
    assert rel(following, dense_following) < 1e-8
    fd_fixed, fd_following = finite_difference(follow=False), finite_difference(follow=True)
    assert rel(fixed, fd_fixed) < 1e-5  # measured ~1e-7
    assert rel(following, fd_following) < 1e-5
    assert rel(fixed, fd_following) > 0.05  # the box's growth matters: two distinct checks

    # reverse mode: one vjp gives ⟨u, dR*/dθ⟩ for every θ; contract with each direction
    grad = ms.observable_gradient(result, pot, translation_blind_probe, stability=False)
    for name, dR in zip(sens.names, sens.dpositions):
        reverse = sum(float(np.vdot(grad[k], tangents[name][k])) for k in grad)
        assert reverse == pytest.approx(float(np.vdot(PROBE, dR)), rel=1e-9), name


@pytest.mark.slow  # ~25 s CPU beyond the test above: two compilations of strain derivatives
def test_box_following_through_cell_derivatives():
    """The example's route: the cell-derivative machinery (strain at fixed fractional
    coordinates, affine part included) and the chain rule through L(D), forward and reverse."""
    _, result, pot = relaxed_packing()
    tangents = directions(pot)
    fixed, scaled = ms.sensitivity(result, pot, wrt=tangents, stability=False).dpositions
    strain = ms.sensitivity(result, pot, wrt="cell", stability=False).dpositions  # (xx, yy, xy)
    following = recentred(fixed + DLOG_L * (strain[0] + strain[1]))  # isotropic: ε_xx = ε_yy = d ln L

    _, dense, _ = dense_reference()
    assert rel(following, dense) < 1e-8
    assert rel(following, finite_difference(follow=True)) < 1e-5
    assert rel(following, recentred(scaled + DLOG_L * np.asarray(result.system.positions))) < 1e-8

    g_params = ms.observable_gradient(result, pot, translation_blind_probe, stability=False)
    g_strain = ms.observable_gradient(result, pot, translation_blind_probe, wrt="cell", stability=False)
    reverse = (sum(float(np.vdot(g_params[k], tangents["D"][k])) for k in g_params)
               + DLOG_L * float(g_strain[0] + g_strain[1]))
    assert reverse == pytest.approx(float(np.vdot(PROBE, following)), rel=1e-9)


# ------------------------------------------------------------------------ the plot option
def test_sensitivity_arrows_whole_discs_with_periodic_images():
    system = types.SimpleNamespace(positions=np.array([[0.2, 2.0], [3.0, 1.5], [2.0, 3.0]]),
                                   cell=4.0 * np.eye(2), species=np.array([0, 1, 0]), symbols=("A", "B"), pbc=True)
    D = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    dcell = 0.1 * np.eye(2)

    clipped = plot.sensitivity_arrows(system, D, radii=0.5, scale=0.25)  # the default is unchanged
    (discs,) = [c for c in clipped.axes[0].collections if isinstance(c, PatchCollection)]
    assert discs.get_clip_path() is not None
    assert len([c for c in clipped.axes[0].collections if isinstance(c, Quiver)]) == 1

    fig = plot.sensitivity_arrows(system, D, radii=0.5, scale=0.25, clip_to_cell=False, dcell=dcell)
    (ax,) = fig.axes
    (discs,) = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert discs.get_clip_path() is None and len(discs.get_paths()) == 4  # one image, across x = 0
    particles, images = [c for c in ax.collections if isinstance(c, Quiver)]
    np.testing.assert_allclose(particles.U, D[:, 0])
    assert images.N == 1
    np.testing.assert_allclose(images.X, [4.2])
    np.testing.assert_allclose(images.Y, [2.0])
    # the image one cell to the right also moves with the cell: D + dcell[0]
    np.testing.assert_allclose([images.U[0], images.V[0]], D[0] + dcell[0])
    assert ax.get_xlim()[0] < -0.3 + 1e-9 and ax.get_xlim()[1] > 4.7  # whole discs in view
    assert ax.get_aspect() == 1.0

    with pytest.raises(ValueError, match="dcell"):
        plot.sensitivity_arrows(system, D, radii=0.5, clip_to_cell=False, dcell=np.zeros(2))


# ------------------------------------------------------------------------ the example
def run_example(out, *args, timeout=1200):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    assert proc.returncode == 0, f"the example failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    figure = out / "paper_md_sensitivity.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    return proc.stdout


def agreement(text, against, case):
    label = f"relative error (implicit vs {against}, {case}):"
    m = re.search(re.escape(label) + r"\s*([-+0-9.eE]+)", text)
    assert m, f"no {label!r} in the output:\n{text}"
    return float(m.group(1))


def assert_agreements(text):
    for case in ("fixed box", "box following"):
        assert agreement(text, "finite differences", case) < 1e-5, text  # measured 3e-7 .. 7e-7
        assert agreement(text, "dense pseudo-inverse", case) < 1e-8, text  # measured ~1e-11
    assert re.search(r"relaxed: \d+ FIRE steps", text), text


@pytest.mark.slow  # ~50 s CPU at N = 32, nearly all of it compilation
def test_example_at_reduced_size(tmp_path):
    assert_agreements(run_example(tmp_path, "--n", "32"))


@pytest.mark.slow  # ~60 s CPU (2 min wall on the shared 2-core machine): the paper's N = 128
def test_example_in_the_papers_setting(tmp_path):
    text = run_example(tmp_path)
    assert "N=128" in text and "φ = 0.98" in text and "D = 0.6" in text
    assert_agreements(text)
