"""The built wheel (not the editable checkout) carries its data and runs the demo.

The wheel is built offline from the checkout, installed without dependencies into a
fresh virtual environment whose only other import path is the test environment's
site-packages (for jax, ase, ...), and ``mdsens demo`` runs from a directory outside the
checkout: every bundled file must come from the installed package.
"""

import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# Three minutes (a wheel build, a fresh install, the whole demo): the slow suite, which CI runs.
@pytest.mark.slow
def test_wheel_installs_and_the_demo_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(REPO)], timeout=600)
    (wheel,) = wheels.glob("mdsens-*.whl")
    env = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], timeout=120)
    env_python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(env_python), "install", "--no-deps", "-q", str(wheel)],
         timeout=300)
    # The dependencies come from the test environment, appended after the wheel.
    env_site = _run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    pathlib.Path(env_site, "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = _run([str(env_python), "-c", "import mdsens; print(mdsens.__file__); print(mdsens.data.path('lj13_ar.xyz'))"],
                 cwd=work, env=clean, timeout=300).stdout.split()
    assert all(str(env) in p and str(REPO) not in p for p in where), where

    demo = _run([str(env / "bin" / "mdsens"), "demo"], cwd=work, env=clean, timeout=1200)
    rows = [line for line in demo.stdout.splitlines() if line.endswith(tuple("0123456789")) and " yes " in line]
    assert len(rows) == 5, demo.stdout
    assert (work / "out" / "packing_sensitivity.png").stat().st_size > 10_000
