"""The jax-md modules mdsens uses, imported without running jax-md's package initializer.

``import jax_md.space`` runs ``jax_md/__init__.py`` first, which imports every jax-md
module. Two of them cost most of a cold start: ``jax_md.rigid_body`` builds example
shapes at import time with ~120 eager (one-by-one compiled) JAX operations, and
``jax_md.energy`` pulls in the neural-network stack (``e3nn_jax``, ``scipy.signal``).
mdsens needs neither; together they were 11 of the 14 s that ``import mdsens`` took on a
2-core CPU. So when nothing has imported jax-md yet, the package is registered without
executing its initializer, and only the submodules mdsens names are loaded.

Nothing changes for user code: a submodule (``jax_md.energy``, ``from jax_md import
rigid_body``) is imported on first access, and the first access to any other attribute
runs jax-md's own ``__init__`` once, as a plain ``import jax_md`` would have.
"""

from __future__ import annotations

import importlib.util
import sys


def _register_lean_package() -> None:
    if "jax_md" in sys.modules:
        return
    spec = importlib.util.find_spec("jax_md")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # an unusual installation: the plain import below handles it
    package = importlib.util.module_from_spec(spec)

    def load_on_first_use(name):
        # ``from jax_md import x`` (in jax-md's own modules too) probes hasattr first.
        if importlib.util.find_spec(f"jax_md.{name}") is not None:
            return importlib.import_module(f"jax_md.{name}")
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = load_on_first_use
    sys.modules["jax_md"] = package


_register_lean_package()

from jax_md import minimize, partition, space  # noqa: E402

__all__ = ["minimize", "partition", "space"]
