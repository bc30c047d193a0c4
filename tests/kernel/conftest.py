"""Kernel-lab fixtures (helpers: kernellab.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kernellab import scenarios

from netns.lab import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab whose agents get SIGTERM together before the lab closes (see scenarios.stop_agents)."""
    with Lab() as lab:
        try:
            yield lab
        finally:
            scenarios.stop_agents(lab, timeout=30)
