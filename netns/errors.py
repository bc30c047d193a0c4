"""Errors raised by the lab (re-exported by ``netns.lab`` and ``netns``)."""

from __future__ import annotations


class LabError(RuntimeError):
    pass


class NetemUnavailableError(LabError):
    """The kernel has no ``sch_netem``: delay cannot be modelled (tests skip with this message)."""
