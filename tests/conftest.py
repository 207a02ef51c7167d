"""Shared test helpers: the bundled data, and independent references used by several files.

Tests do not depend on the working directory: bundled files come from :data:`DATA`.
"""

import os
import pathlib
import re
import subprocess
import sys

# The command's persistent compilation cache stays off in tests: each test measures
# its own behaviour, and nothing is written to the user's cache directory.
os.environ.setdefault("MDSENS_COMPILATION_CACHE", "0")

import numpy as np  # noqa: E402

import mdsens as ms  # noqa: E402

#: The bundled data folder (``mdsens/data``), wherever mdsens is installed.
DATA = str(ms.data.path("README.md").parent)


def data_file(name: str) -> str:
    """Path of a bundled file (``"lj13_ar.xyz"``, ``"potentials/Si.tersoff"``)."""
    return os.path.join(DATA, *name.split("/"))


#: The example scripts run by the example tests.
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, out, *args, timeout=900):
    """Run ``examples/<name> --out out *args`` in a fresh interpreter; its stdout."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(EXAMPLES.parent))
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def number_after(text, label):
    """The number printed after ``label`` in ``text``."""
    m = re.search(re.escape(label) + r"\s*([-+0-9.eE]+)", text)
    assert m, f"no {label!r} in the output:\n{text}"
    return float(m.group(1))


def assert_figure(path):
    """``path`` is a PNG with content (not an empty canvas)."""
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def triangular_vacancy(nx=6, ny=8, a=1.12):
    """Triangular 2D crystal with one vacancy (N = nx·ny − 1), its perfect lattice and cell."""
    pts = np.array([((i + 0.5 * (j % 2)) * a, j * a * np.sqrt(3) / 2) for j in range(ny) for i in range(nx)])
    return pts[1:], pts, np.diag([nx * a, ny * a * np.sqrt(3) / 2])


def min_image(D, cell):
    """Displacements ``D`` (N, d) wrapped to their minimum image in ``cell`` (rows)."""
    frac = np.asarray(D) @ np.linalg.inv(cell)
    return (frac - np.round(frac)) @ cell
