"""The data shipped with mdsens: the demo's structures, potential files and a small table.

Read them with :func:`path` (``importlib.resources``), which works from a clone and from
an installed wheel alike; ``README.md`` in this folder gives each file's provenance.
:func:`diabetes` loads the regression data of the physics-agnostic examples, and
:func:`digits` the 8×8 handwritten digits of the dataset-distillation example.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from mdsens.errors import MissingFileError

__all__ = ["path", "names", "diabetes", "digits", "DIABETES_COLUMNS"]

#: Columns of ``diabetes.csv``: the 10 baseline variables, then the response ``Y``.
DIABETES_COLUMNS = ("AGE", "SEX", "BMI", "BP", "S1", "S2", "S3", "S4", "S5", "S6", "Y")


def path(name: str) -> Path:
    """The file ``name`` (e.g. ``"lj13_ar.xyz"``, ``"potentials/Si.tersoff"``) on disk.

    Raises:
      MissingFileError: no such bundled file (a ``FileNotFoundError``); the message
        lists those there are.
    """
    ref = resources.files(__name__).joinpath(*str(name).split("/"))
    if not ref.is_file():
        raise MissingFileError(f"mdsens ships no data file {name!r}; it has {', '.join(names())}.")
    return Path(str(ref))


def names() -> tuple:
    """The bundled data files: structures, potentials, tables (paths relative to this package)."""
    root = resources.files(__name__)
    found = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name == "potentials":
            found += [f"potentials/{e.name}" for e in entry.iterdir() if e.is_file()]
        elif entry.is_file() and not entry.name.endswith((".py", ".md", ".pyc")):
            found.append(entry.name)
    return tuple(sorted(found))


def diabetes():
    """The diabetes data of Efron, Hastie, Johnstone & Tibshirani (2004), un-standardized.

    442 patients. ``X`` holds the 10 baseline variables in the order of
    :data:`DIABETES_COLUMNS` (age in years, sex coded 1/2, BMI, mean blood pressure and
    six serum measurements, in their original units); ``y`` is the disease progression
    one year later. Standardize ``X`` before fitting (the columns' scales differ by 10⁴).

    Returns:
      ``(X, y)``: float64 NumPy arrays of shapes ``(442, 10)`` and ``(442,)``.
    """
    table = np.loadtxt(path("diabetes.csv"), delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, :-1], table[:, -1]


def digits():
    """The 8×8 handwritten digits of Alpaydin & Kaynak (UCI, 1998), as scikit-learn ships them.

    The 1797 images of the UCI test set: each pixel counts the set pixels of a 4×4 block
    of a normalized 32×32 bitmap, an integer 0..16 (row-major 8×8, 64 columns). Divide by
    16 for intensities in [0, 1]. Provenance in ``README.md``.

    Returns:
      ``(images, labels)``: NumPy ``uint8`` arrays of shapes ``(1797, 64)`` and ``(1797,)``
      (digits 0..9).
    """
    with np.load(path("digits.npz")) as archive:
        return archive["images"], archive["labels"]
