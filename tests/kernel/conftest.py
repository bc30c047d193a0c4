"""Kernel-lab fixtures (helpers: kernellab.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netns.lab import Lab
from netns.mesh import mesh_lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab whose agents get SIGTERM together before the lab closes (see netns.mesh.stop_agents)."""
    with mesh_lab(stop_timeout=30) as lab:
        yield lab
