"""Shared test helpers: the bundled data, and independent references used by several files.

Tests do not depend on the working directory: bundled files come from :data:`DATA`.
"""

import os

import mdsens as ms

#: The bundled data folder (``mdsens/data``), wherever mdsens is installed.
DATA = str(ms.data.path("README.md").parent)


def data_file(name: str) -> str:
    """Path of a bundled file (``"lj13_ar.xyz"``, ``"potentials/Si.tersoff"``)."""
    return os.path.join(DATA, *name.split("/"))
