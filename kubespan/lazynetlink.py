"""pyroute2 without the cost of its package ``__init__``.

pyroute2's ``__init__`` imports every family it supports (IPDB, NDB, ethtool, nl80211, IPVS, plan9...)
so that ``from pyroute2 import X`` works for any X; the mesh uses a handful of submodules. That cost
each agent ~45 ms of CPU at start (a fifth of its imports), which N agents starting together on one
machine pay N times (bench/mesh_cold_start.py, issue 18). :func:`install` registers a stand-in
``pyroute2`` package: submodules import as usual from the package's directory, and the real
``__init__`` runs, into the same module object, the first time anything asks the package itself for a
name it lacks (PEP 562 module ``__getattr__``), so ``from pyroute2 import IPRoute`` keeps working for
any caller. Our own code imports pyroute2 names from their submodules (a unit test checks).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

PACKAGE = "pyroute2"


def install() -> None:
    """Registers the stand-in unless pyroute2 is already imported (or absent: its import error then
    comes from the real import, where it is used)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    pkg = importlib.util.module_from_spec(spec)

    def lookup(name: str) -> object:
        if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
            return importlib.import_module(f"{PACKAGE}.{name}")  # a submodule: the rest is not needed
        _load_all(pkg)
        try:
            return pkg.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    pkg.__dict__["__getattr__"] = lookup
    sys.modules[PACKAGE] = pkg


def _load_all(pkg: ModuleType) -> None:
    """Runs the real ``__init__`` into the stand-in; the hook goes first, so this happens once."""
    pkg.__dict__.pop("__getattr__", None)
    assert pkg.__spec__ is not None and pkg.__spec__.loader is not None
    pkg.__spec__.loader.exec_module(pkg)
