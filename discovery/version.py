"""The project's version, read from the installed distribution's metadata.

The one place the version is written is ``[project] version`` in pyproject.toml; every daemon's
``--version`` prints what this returns.
"""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "kubespan-mesh"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def version_string(prog: str) -> str:
    return f"{prog} {version()}"
